"""What a training step costs in time and memory, beyond the data set and torch itself (Linux, CPU).

:func:`step_time_ms` is the median wall time of ``rule.step`` after warm-up steps, on the threads
the caller allows: run alone on a quiet machine, it is a cleaner speed figure than epoch times of
runs that share the CPU. The probe prints the mean as well (``ms_per_step_mean``): a rule whose
steps are not all alike (GAIT-prop refactorises every few steps) has its amortised cost there.
A process's lifetime peak RSS is dominated by the data set and the torch
runtime, so it hides the differences between rules; :func:`training_footprint` measures around
real training steps:

* ``footprint_mb``: peak RSS during the first steps minus RSS right before them (gradients,
  optimiser state, activations and temporaries; the kernel's peak is reset with clear_refs);
* ``step_peak_mb``: the same over later steps, after warm-up (activations and temporaries, as
  far as the allocator returns memory);
* ``saved_activations_mb``: the largest total size of tensors autograd holds for backward at one
  time during a step (saved_tensors_hooks; parameters excluded): what detaching blocks frees.

Run each measurement in a fresh process (``python -m localcredit.probe ...`` prints one JSON
line), so nothing one rule allocated is left over for the next.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import statistics
import time
from pathlib import Path
from typing import Iterable, Sequence

import torch

from .rules.base import Rule


def _status_kb(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS


class SavedTensorMeter:
    """Peak total bytes of the non-parameter tensors autograd keeps for backward."""

    def __init__(self, parameters: Iterable[torch.Tensor]):
        self.parameter_ptrs = {p.data_ptr() for p in parameters}
        self.live = 0
        self.peak = 0

    def pack(self, tensor: torch.Tensor):
        if tensor.data_ptr() in self.parameter_ptrs or tensor.untyped_storage().data_ptr() in self.parameter_ptrs:
            return tensor
        meter, size = self, tensor.numel() * tensor.element_size()  # a batch is a view of the whole data set

        class Held:
            def __init__(self):
                self.tensor = tensor
                meter.live += size
                meter.peak = max(meter.peak, meter.live)

            def __del__(self):
                meter.live -= size

        return Held()

    @staticmethod
    def unpack(held):
        return held.tensor if not isinstance(held, torch.Tensor) else held


def training_footprint(rule: Rule, batches: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
    """Memory figures (MB) of ``rule.step`` over ``batches`` (at least 3; the first two warm up)."""
    if len(batches) < 3:
        raise ValueError("training_footprint needs at least 3 batches")
    before = _status_kb("VmRSS")
    _reset_peak()
    for x, y in batches[:2]:
        rule.step(x, y)
    footprint = _status_kb("VmHWM") - before
    steady = _status_kb("VmRSS")
    _reset_peak()
    for x, y in batches[2:]:
        rule.step(x, y)
    step_peak = _status_kb("VmHWM") - steady
    meter = SavedTensorMeter(rule.parameters())
    with torch.autograd.graph.saved_tensors_hooks(meter.pack, meter.unpack):
        rule.step(*batches[0])
    return {"footprint_mb": footprint / 1024, "step_peak_mb": step_peak / 1024,
            "saved_activations_mb": meter.peak / 2**20,
            "trainable_parameters": sum(p.numel() for p in rule.parameters() if p.requires_grad)}


def step_times_ms(rule: Rule, batches: Sequence[tuple[torch.Tensor, torch.Tensor]], warmup: int = 3) -> list[float]:
    """Milliseconds of each ``rule.step`` over ``batches`` after ``warmup`` untimed steps."""
    for x, y in batches[:warmup]:
        rule.step(x, y)
    times = []
    for x, y in batches[warmup:]:
        start = time.perf_counter()
        rule.step(x, y)
        times.append(1000 * (time.perf_counter() - start))
    return times


def step_time_ms(rule: Rule, batches: Sequence[tuple[torch.Tensor, torch.Tensor]], warmup: int = 3) -> float:
    """Median milliseconds of one ``rule.step`` over ``batches`` after ``warmup`` untimed steps."""
    return statistics.median(step_times_ms(rule, batches, warmup))


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m localcredit.probe --rule R --data D [network options of train] [--batch-size B]``: one JSON line."""
    from . import spec as spec_options
    from .experiment import RunSpec, build_rule, load_data
    from .train import TrainSpec

    parser = argparse.ArgumentParser(description=main.__doc__)
    # The run's options (rule, data, network, optimiser, seed, batch size); not the rest of the recipe.
    recipe = tuple(f.name for f in dataclasses.fields(TrainSpec) if f.name not in ("seed", "batch_size"))
    spec_options.add_arguments(parser, RunSpec, exclude=recipe)
    parser.add_argument("--steps", type=int, default=6, help="steps of the memory measurement")
    parser.add_argument("--timed-steps", type=int, default=30, help="steps timed after them")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    spec = RunSpec(**spec_options.given(args, RunSpec))
    data = load_data(spec)
    rule = build_rule(spec, data)
    b = spec.batch_size
    batches = [(data.x_train[i * b:(i + 1) * b], data.y_train[i * b:(i + 1) * b])
               for i in range(args.steps + args.timed_steps)]
    memory = training_footprint(rule, batches[:args.steps])
    milliseconds = step_times_ms(rule, batches[args.steps:], warmup=0)  # the memory steps warmed it up
    print(json.dumps({"rule": spec.rule, "arch": rule.net.arch, "batch_size": b, "threads": args.threads,
                      "load_average_1min": os.getloadavg()[0],  # what else used the CPU while it timed
                      **memory, "ms_per_step": statistics.median(milliseconds),
                      # A rule with periodic work (a refactorisation every k steps) hides it from the median.
                      "ms_per_step_mean": statistics.fmean(milliseconds), "timed_steps": args.timed_steps}))


if __name__ == "__main__":
    main()
