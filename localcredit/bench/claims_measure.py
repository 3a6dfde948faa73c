"""Measurements of the claims suite that a training run's result.json does not hold (issue 28).

Each runs in a process of its own, started by the suite through the bench's process pool (so a stop
signal reaches it), and writes one JSON file when it ends, nothing before: an interrupted measurement
is simply run again. ``python -m localcredit.bench.claims_measure KIND [run options] --out FILE``:

* ``memory``: what a training step of a rule costs in memory and in memory traffic, on the run's
  network and batch size. The step memory is :mod:`localcredit.bench.memory`'s meter (the largest total
  of tensors made by training steps alive at one time); the traffic is :class:`TrafficCounter`'s count
  of the bytes each aten operation of a step reads and writes, with the bytes of weights (parameters and
  buffers: fixed feedback matrices, fixed classifiers) read counted apart; the activations kept for the
  backward pass are autograd's saved tensors (``saved_tensors_hooks``), weights left out.
* ``align-curve``: per-layer cosine between the rule's update and BP's gradient on 256 fixed training
  images, at chosen steps of a training run made here (the same spec, seed, data order and batches as
  ``localcredit train``, without augmentation), and the test accuracy at its end.
* ``readout``: where an LFNN network's prediction is read from: its head (what ``train`` reports) against
  the mean of each block's workers (logits, or probabilities), on the test split, for a finished run.
* ``align-run``: per-layer cosine with BP at initialisation and with the trained weights of a finished run.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .memory import _tensors, gradient_and_state_tensors, step_memory, storage_key

MB = 2**20


# ----- memory traffic of a step ------------------------------------------------------------------
class TrafficCounter(TorchDispatchMode):
    """Bytes read and written by every aten operation while active, those of the optimisers' updates apart.

    Every tensor an operation takes counts as read and every tensor it returns as written, at the
    tensor's own size (a slice counts its elements, not its storage's); operations that only make a
    view (``t``, ``view``, ``detach``, ...) move nothing and are not counted. This is what the
    operations ask of memory, not what caches serve: an upper bound on DRAM traffic, the same bound
    for every rule. ``weights``: tensors whose reads are also counted apart (parameters, buffers).
    While ``in_optimizer`` is set (:meth:`watch_optimizers`), operations count as the optimisers'.
    """

    def __init__(self, weights: Iterable[torch.Tensor] = ()):
        super().__init__()
        self.weight_keys = {key for key in map(storage_key, weights) if key is not None}
        self.in_optimizer = False
        zero = {"read": 0, "written": 0, "weight_read": 0, "ops": 0}
        self.phases = {"credit": dict(zero), "optimizer": dict(zero)}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if getattr(func, "is_view", False):
            return out
        phase = self.phases["optimizer" if self.in_optimizer else "credit"]
        phase["ops"] += 1
        for tensor in _tensors((args, kwargs)):
            size = tensor.numel() * tensor.element_size()
            phase["read"] += size
            if storage_key(tensor) in self.weight_keys:
                phase["weight_read"] += size
        phase["written"] += sum(t.numel() * t.element_size() for t in _tensors(out))
        return out

    @contextlib.contextmanager
    def watch_optimizers(self, optimizers: Sequence[torch.optim.Optimizer]) -> Iterator[None]:
        """Count what each optimiser's ``step`` moves as the optimisers' (an instance attribute over the method)."""

        def watched(optimizer):
            original = optimizer.step

            def step(*args, **kwargs):
                self.in_optimizer = True
                try:
                    return original(*args, **kwargs)
                finally:
                    self.in_optimizer = False
            return step

        for optimizer in optimizers:
            optimizer.step = watched(optimizer)  # type: ignore[method-assign]  # undone below
        try:
            yield
        finally:
            for optimizer in optimizers:
                del optimizer.step


def saved_activation_bytes(rule, x: torch.Tensor, y: torch.Tensor, weights: set[int]) -> int:
    """Bytes of the tensors autograd saves for backward passes during one ``rule.step`` (each storage once),
    weights left out: the activations a backward pass needs kept."""
    seen: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        key = storage_key(tensor)
        if key is not None and key not in weights:
            seen[key] = max(seen.get(key, 0), tensor.untyped_storage().nbytes())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        rule.step(x, y)
    return sum(seen.values())


def memory_figures(rule, batches: Sequence[tuple[torch.Tensor, torch.Tensor]], warmup: int = 2) -> dict[str, Any]:
    """Step memory (the meter), traffic and saved activations of ``rule``'s steps, in MB, per step."""
    memory_steps = warmup + 2
    figures = step_memory(rule, batches[:memory_steps], warmup=warmup)
    weights = [*rule.state_dict(keep_vars=True).values()]
    weight_keys = {key for key in map(storage_key, weights) if key is not None}
    counters = []
    for x, y in batches[memory_steps:memory_steps + 2]:
        # Gradients and optimiser state are rewritten every step: their reads count as traffic, not as weights.
        counter = TrafficCounter(weights)
        with counter.watch_optimizers(rule.optimizers), counter:
            rule.step(x, y)
        counters.append(counter)
    kept = weight_keys | {key for key in map(storage_key, gradient_and_state_tensors(rule)) if key is not None}
    saved = [saved_activation_bytes(rule, x, y, kept) for x, y in batches[memory_steps + 2:memory_steps + 4]]

    def per_step(phase: str, key: str) -> float:
        return sum(c.phases[phase][key] for c in counters) / len(counters)

    credit = {"credit_bytes_moved_mb": (per_step("credit", "read") + per_step("credit", "written")) / MB,
              "credit_weight_bytes_read_mb": per_step("credit", "weight_read") / MB,
              "credit_ops_per_step": per_step("credit", "ops"),
              "optimizer_bytes_moved_mb": (per_step("optimizer", "read") + per_step("optimizer", "written")) / MB}
    return {**figures, **credit,
            "bytes_moved_mb": credit["credit_bytes_moved_mb"] + credit["optimizer_bytes_moved_mb"],
            "saved_activations_mb": max(saved) / MB,
            "weights_mb": sum(t.numel() * t.element_size() for t in weights) / MB}


def _spec(args: argparse.Namespace):
    from .. import spec as spec_options
    from ..experiment import RunSpec

    return RunSpec(**spec_options.given(args, RunSpec))


def _batches(data, spec, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    from ..training.config import epoch_order

    order = epoch_order(len(data.y_train), spec.seed, 0)
    b = spec.batch_size
    return [(data.x_train[order[i * b:(i + 1) * b]], data.y_train[order[i * b:(i + 1) * b]]) for i in range(count)]


def measure_memory(args: argparse.Namespace) -> dict[str, Any]:
    from ..experiment import build_rule, load_data

    spec = _spec(args)
    data = load_data(spec)
    rule = build_rule(spec, data)
    rule.start_epoch(0, spec.epochs)
    figures = memory_figures(rule, _batches(data, spec, 8))
    return {"rule": spec.rule, "arch": rule.net.arch, "options": list(spec.options), "batch_size": spec.batch_size,
            **figures}


def accuracy(rule, x: torch.Tensor, y: torch.Tensor, chunk: int = 1000) -> float:
    correct = sum(int((rule.predict(x[i:i + chunk]) == y[i:i + chunk]).sum()) for i in range(0, len(y), chunk))
    return correct / len(y)


def measure_align_curve(args: argparse.Namespace) -> dict[str, Any]:
    """Train ``spec`` here, measuring the per-layer cosine with BP at the chosen steps."""
    from ..data import Dataset
    from ..errors import UserError
    from ..experiment import build_rule, load_data
    from ..rules.alignment import alignment
    from ..training.config import epoch_order

    spec = _spec(args)
    data = load_data(spec)
    if not isinstance(data, Dataset):
        raise UserError(f"align-curve needs data held in memory; {spec.data} is streamed from disk")
    data = data.limited(spec.limit_train)
    rule = build_rule(spec, data)
    n = len(data.y_train)
    fixed = epoch_order(n, spec.seed, 0)[:args.align_batch]
    x_fixed, y_fixed = data.x_train[fixed], data.y_train[fixed]
    steps_per_epoch = -(-n // spec.batch_size)
    total = spec.epochs * steps_per_epoch
    marks = sorted({s for s in range(0, total + 1) if s % args.every == 0 or (s < args.dense_until and
                                                                              s % args.dense_every == 0)} | {total})
    curve = []
    step = 0
    start = time.perf_counter()
    for epoch in range(spec.epochs):
        rule.start_epoch(epoch, spec.epochs)
        order = epoch_order(n, spec.seed, epoch)
        for i in range(steps_per_epoch):
            if step in marks:
                curve.append({"step": step, "epoch": step / steps_per_epoch, "cosine": alignment(rule, x_fixed, y_fixed)})
            index = order[i * spec.batch_size:(i + 1) * spec.batch_size]
            rule.step(data.x_train[index], data.y_train[index])
            step += 1
    curve.append({"step": step, "epoch": float(spec.epochs), "cosine": alignment(rule, x_fixed, y_fixed)})
    return {"rule": spec.rule, "arch": rule.net.arch, "data": spec.data, "seed": spec.seed, "lr": spec.lr,
            "steps": total, "steps_per_epoch": steps_per_epoch, "align_batch": len(fixed), "curve": curve,
            "test_accuracy": accuracy(rule, data.x_test, data.y_test), "seconds": time.perf_counter() - start}


def measure_readout(args: argparse.Namespace) -> dict[str, Any]:
    """Test accuracy of a trained LFNN read from its head, and from the mean of each block's workers."""
    from .align import trained_rule

    _, data, trained, _ = trained_rule(args.run)
    rule: Any = trained  # an LFNN rule: worker_logits is a method (nn.Module's attributes are typed as tensors)
    if not hasattr(rule, "worker_logits"):
        raise SystemExit(f"claims_measure readout: {args.run} trained {type(rule).__name__}, which has no workers")
    rule.eval()
    x, y = data.x_test, data.y_test
    logits_right = [0] * len(rule.net.blocks)
    probs_right = [0] * len(rule.net.blocks)
    with torch.no_grad():
        for i in range(0, len(y), 1000):
            xb, yb = x[i:i + 1000], y[i:i + 1000]
            for l, _, h in rule.net.walk(xb):
                if l == len(rule.net.blocks):
                    break
                workers = rule.worker_logits(l, h)  # (B, N, C)
                logits_right[l] += int((workers.mean(1).argmax(1) == yb).sum())
                probs_right[l] += int((workers.softmax(2).mean(1).argmax(1) == yb).sum())
    return {"run": str(args.run), "head": accuracy(rule, x, y),
            "workers_mean_logits": [c / len(y) for c in logits_right],
            "workers_mean_probabilities": [c / len(y) for c in probs_right]}


def measure_align_run(args: argparse.Namespace) -> dict[str, Any]:
    """Per-layer cosine with BP at initialisation (the run's seed) and with the run's trained weights."""
    from ..experiment import build_rule
    from ..rules.alignment import alignment
    from ..training.config import epoch_order
    from .align import trained_rule

    spec, data, rule, _ = trained_rule(args.run)
    fixed = epoch_order(len(data.y_train), spec.seed, 0)[:args.align_batch]
    x, y = data.x_train[fixed], data.y_train[fixed]
    fresh = build_rule(spec, data)
    return {"run": str(args.run), "rule": spec.rule, "align_batch": len(fixed), "init": alignment(fresh, x, y),
            "final": alignment(rule, x, y)}


KINDS = {"memory": measure_memory, "align-curve": measure_align_curve, "readout": measure_readout,
         "align-run": measure_align_run}


def parser() -> argparse.ArgumentParser:
    from .. import spec as spec_options
    from ..experiment import RunSpec

    top = argparse.ArgumentParser(prog="python -m localcredit.bench.claims_measure", description=__doc__.split("\n")[0])
    sub = top.add_subparsers(dest="kind", required=True)
    for kind in KINDS:
        p = sub.add_parser(kind)
        if kind in ("memory", "align-curve"):
            spec_options.add_arguments(p, RunSpec)
        else:
            p.add_argument("--run", required=True, help="a finished run folder (config.yaml, checkpoint.pt)")
        if kind in ("align-curve", "align-run"):
            p.add_argument("--align-batch", type=int, default=256)
        if kind == "align-curve":
            p.add_argument("--every", type=int, default=100, help="measure every N steps")
            p.add_argument("--dense-every", type=int, default=25, help="... and every M steps before --dense-until")
            p.add_argument("--dense-until", type=int, default=200)
        p.add_argument("--threads", type=int, default=1)
        p.add_argument("--out", required=True, help="the JSON file to write")
    return top


def main(argv: Sequence[str] | None = None) -> int:
    from ..errors import UserError
    from ..training.checkpoint import atomic_write_bytes

    args = parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # as `train` does by default
    start = time.perf_counter()
    try:
        payload = KINDS[args.kind](args)
    except UserError as exc:
        print(f"localcredit: error: {exc}", file=sys.stderr)
        return 2
    payload.update(kind=args.kind, wall_seconds=time.perf_counter() - start, load_average_1min=os.getloadavg()[0])
    text = (json.dumps(payload, default=_plain) + "\n").encode()
    atomic_write_bytes(Path(args.out), lambda handle: handle.write(text))
    return 0


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    return str(value)


if __name__ == "__main__":
    raise SystemExit(main())
