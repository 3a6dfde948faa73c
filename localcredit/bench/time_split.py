"""Where a training step's time goes: priced arithmetic, unpriced aten work, and everything else.

The speed suite's *overhead* (time ratio / FLOP ratio) says how much of a rule's time its FLOPs do not
explain, but not why. :func:`step_time_split` runs a few real ``rule.step`` calls under
``torch.profiler`` and splits each step's wall time three ways:

* **priced**: the aten operations :mod:`localcredit.bench.flops` gives FLOPs to (matmuls, convolutions
  and their backward, solves), with everything they call (MKL-DNN's convolution kernel, the copies a
  matmul makes): the time the FLOP count stands for;
* **unpriced**: every other aten operation at the top of its call stack (activations, batch norm,
  pooling, losses, the optimiser's update, copies, views, allocations): memory-bound work that FLOP
  counts leave out by convention;
* **outside**: the rest of the step's wall time: Python, the autograd engine's own bookkeeping,
  hooks, and the profiler's cost per recorded event (which grows with the number of operations, so
  it falls on many-op rules harder).

Against BP's split on the same network this tells the two kinds of overhead apart:
``priced_overhead`` = (priced time / BP's) / (FLOPs / BP's) is 1 when the rule's arithmetic runs as
fast per FLOP as BP's (above 1: smaller or worse-shaped matmuls); the unpriced and outside
milliseconds against BP's show what the FLOP count cannot see. The profiler slows every step (each
event costs ~1 us), so the split's total is above the interleaved timing: read its shares, not its sum.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

from .flops import REGISTRY

#: the profiler's names of the priced operations ("aten::mm"), from the FLOP counter's own table
PRICED = frozenset("aten::" + str(op).removeprefix("aten.") for op in REGISTRY)


@dataclass
class TimeSplit:
    """Milliseconds per step (means over the profiled steps) by kind, and the unpriced operations' shares."""

    steps: int
    wall_ms: float
    priced_ms: float
    unpriced_ms: float
    #: the unpriced operations by name: milliseconds per step, largest first
    unpriced_by_op: dict[str, float] = field(default_factory=dict)

    @property
    def outside_ms(self) -> float:
        return max(0.0, self.wall_ms - self.priced_ms - self.unpriced_ms)

    def as_dict(self, top: int = 8) -> dict[str, Any]:
        return {"profiled_steps": self.steps, "wall_ms": self.wall_ms, "priced_ms": self.priced_ms,
                "unpriced_ms": self.unpriced_ms, "outside_ms": self.outside_ms,
                "unpriced_top_ms": dict(list(self.unpriced_by_op.items())[:top])}


def _has_ancestor(event: Any, names: frozenset[str] | None) -> bool:
    """Whether an enclosing event is priced (``names``) or, with ``names=None``, any aten operation."""
    parent = event.cpu_parent
    while parent is not None:
        if parent.name in names if names is not None else parent.name.startswith("aten::"):
            return True
        parent = parent.cpu_parent
    return False


def split_events(events: Sequence[Any]) -> tuple[float, float, dict[str, float]]:
    """(priced, unpriced) microseconds of profiler events, and the unpriced ones by name.

    Priced: inclusive time of each priced operation not inside another priced one. Unpriced: inclusive
    time of each aten operation not inside another aten operation, less the priced time inside it.
    """
    priced = 0.0
    top_level: dict[int, float] = {}  # id of a top-level aten event -> its inclusive time less priced inside
    names: dict[int, str] = {}
    for event in events:
        if not event.name.startswith("aten::"):
            continue
        if event.name in PRICED and not _has_ancestor(event, PRICED):
            priced += event.cpu_time_total
            top = _top_aten(event)
            if top is not event:
                top_level[id(top)] = top_level.get(id(top), top.cpu_time_total) - event.cpu_time_total
                names[id(top)] = top.name
            else:
                top_level[id(event)] = top_level.get(id(event), 0.0)
                names[id(event)] = event.name
        elif not _has_ancestor(event, None):
            top_level.setdefault(id(event), event.cpu_time_total)
            names[id(event)] = event.name
    by_name: dict[str, float] = {}
    for key, us in top_level.items():
        if names[key] not in PRICED:
            by_name[names[key]] = by_name.get(names[key], 0.0) + max(0.0, us)
    return priced, sum(by_name.values()), by_name


def _top_aten(event: Any) -> Any:
    """The outermost aten operation around ``event`` (itself if none encloses it)."""
    top, parent = event, event.cpu_parent
    while parent is not None:
        if parent.name.startswith("aten::"):
            top = parent
        parent = parent.cpu_parent
    return top


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """The profiler's C++ side prints a line to the process's stderr at every start and stop: hundreds in
    a speed run. Only its start and stop run in here, never the step."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def profile_step(rule: Any, x: torch.Tensor, y: torch.Tensor) -> TimeSplit:
    """One real ``rule.step(x, y)`` (the rule moves on) under the profiler, split by kind."""
    prof = profile(activities=[ProfilerActivity.CPU])
    with _quiet_stderr():
        prof.start()
    try:
        start = time.perf_counter()
        rule.step(x, y)
        wall = time.perf_counter() - start
    finally:
        with _quiet_stderr():
            prof.stop()
    priced, unpriced, names = split_events(prof.events())
    return TimeSplit(steps=1, wall_ms=1000 * wall, priced_ms=priced / 1000, unpriced_ms=unpriced / 1000,
                     unpriced_by_op={name: us / 1000 for name, us in names.items()})


def mean_split(splits: Sequence[TimeSplit]) -> TimeSplit:
    """The mean per step of several profiled steps; the unpriced operations largest first."""
    n = sum(split.steps for split in splits)
    by_name: dict[str, float] = {}
    for split in splits:
        for name, ms in split.unpriced_by_op.items():
            by_name[name] = by_name.get(name, 0.0) + ms * split.steps
    ordered = {name: ms / n for name, ms in sorted(by_name.items(), key=lambda item: -item[1])}
    return TimeSplit(steps=n, wall_ms=sum(s.wall_ms * s.steps for s in splits) / n,
                     priced_ms=sum(s.priced_ms * s.steps for s in splits) / n,
                     unpriced_ms=sum(s.unpriced_ms * s.steps for s in splits) / n, unpriced_by_op=ordered)


def step_time_split(rule: Any, batches: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> TimeSplit:
    """Profile ``rule.step(x, y)`` on each batch; the mean split per step."""
    return mean_split([profile_step(rule, x, y) for x, y in batches])


__all__ = ["PRICED", "TimeSplit", "mean_split", "profile_step", "split_events", "step_time_split"]
