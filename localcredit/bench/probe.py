"""What a training step costs in time and memory (CPU or CUDA): one JSON line per rule.

:func:`step_time_ms` is the median wall time of ``rule.step`` after warm-up steps, on the threads
the caller allows: run alone on a quiet machine, it is a cleaner speed figure than epoch times of
runs that share the CPU. The probe prints the mean as well (``ms_per_step_mean``): a rule whose
steps are not all alike (GAIT-prop refactorises every few steps) has its amortised cost there.

Memory comes from :mod:`localcredit.bench.memory`, which counts every tensor a step creates the same way
for every rule, whoever holds it (autograd, the rule's own lists, a cache):

* ``step_memory_mb``: the most memory of tensors made by training steps alive at one time during
  a step: activations, temporaries and what the rule carries between steps; weights, buffers
  (fixed feedback matrices), gradients, optimiser state and the data set left out;
* ``step_gradient_mb``: the gradients and optimiser state (left out of the figure above);
* ``step_kept_mb``: what the rule carries from step to step (in the first figure);
* ``cuda_step_peak_mb`` (CUDA only): ``torch.cuda.max_memory_allocated`` during a step minus the
  allocation before it, the allocator's cross-check (it includes the step's gradients).

Whole-process peak RSS is not reported here: the data set and torch dominate it, so it hides the
differences between rules. Run each probe in a fresh process (``python -m localcredit.bench.probe ...``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import statistics
import time
from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Any

import torch

from ..rules.base import Rule
from .memory import step_memory


def step_times_ms(rule: Rule, batches: Sequence[tuple[torch.Tensor, torch.Tensor]], warmup: int = 3) -> list[float]:
    """Milliseconds of each ``rule.step`` over ``batches`` after ``warmup`` untimed steps."""
    for x, y in batches[:warmup]:
        rule.step(x, y)
    return [timed_step_ms(rule, x, y) for x, y in batches[warmup:]]


def timed_step_ms(rule: Rule, x: torch.Tensor, y: torch.Tensor,
                  guard: AbstractContextManager[Any] | None = None) -> float:
    """Milliseconds of one ``rule.step(x, y)``, the device's queued work finished before and after it.

    ``guard`` is entered around the step alone (not the waits): e.g. a check that the step makes
    the host wait for nothing (``benchmarks/gpu_speed.py``)."""
    _finish(x.device)
    start = time.perf_counter()
    with guard if guard is not None else contextlib.nullcontext():
        rule.step(x, y)
    _finish(x.device)
    return 1000 * (time.perf_counter() - start)


def _finish(device: torch.device) -> None:
    """Wait until ``device`` has done the work queued so far. A step no longer waits for its own
    kernels (its figures stay unread tensors), so on CUDA the wall time of ``rule.step`` alone
    would be the launches only."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_time_ms(rule: Rule, batches: Sequence[tuple[torch.Tensor, torch.Tensor]], warmup: int = 3) -> float:
    """Median milliseconds of one ``rule.step`` over ``batches`` after ``warmup`` untimed steps."""
    return statistics.median(step_times_ms(rule, batches, warmup))


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m localcredit.bench.probe --rule R --data D [network options of train] [--batch-size B]``: one JSON line."""
    from .. import spec as spec_options
    from ..data.streaming import StreamedDataset
    from ..errors import UserError
    from ..experiment import RunSpec, build_rule, load_data
    from ..training.config import TrainSpec

    parser = argparse.ArgumentParser(description=main.__doc__)
    # The run's options (rule, data, network, optimiser, seed, batch size); not the rest of the recipe.
    recipe = tuple(f.name for f in dataclasses.fields(TrainSpec) if f.name not in ("seed", "batch_size"))
    spec_options.add_arguments(parser, RunSpec, exclude=recipe)
    parser.add_argument("--steps", type=int, default=6, help="steps of the memory measurement (the first 2 warm up)")
    parser.add_argument("--timed-steps", type=int, default=30, help="steps timed after them")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    spec = RunSpec(**spec_options.given(args, RunSpec))
    data = load_data(spec)
    if isinstance(data, StreamedDataset):  # its batches are slices of in-memory tensors
        raise UserError(f"the probe needs data that fits in memory; {spec.data} is streamed from disk")
    rule = build_rule(spec, data)
    rule.start_epoch(0, spec.epochs)  # the steps of a run's first epoch (a layer-wise schedule needs it)
    b = spec.batch_size
    batches = [(data.x_train[i * b:(i + 1) * b], data.y_train[i * b:(i + 1) * b])
               for i in range(args.steps + args.timed_steps)]
    memory = step_memory(rule, batches[:args.steps])
    memory["trainable_parameters"] = sum(p.numel() for p in rule.parameters() if p.requires_grad)
    milliseconds = step_times_ms(rule, batches[args.steps:], warmup=0)  # the memory steps warmed it up
    print(json.dumps({"rule": spec.rule, "arch": rule.net.arch, "batch_size": b, "threads": args.threads,
                      "load_average_1min": os.getloadavg()[0],  # what else used the CPU while it timed
                      **memory, "ms_per_step": statistics.median(milliseconds),
                      # A rule with periodic work (a refactorisation every k steps) hides it from the median.
                      "ms_per_step_mean": statistics.fmean(milliseconds), "timed_steps": args.timed_steps}))


if __name__ == "__main__":
    main()
