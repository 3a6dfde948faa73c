"""A fixed-size memory of past samples, for experience replay and A-GEM.

Two ways to choose what stays (Chaudhry et al. 2019, "On tiny episodic memories in continual learning"):

* ``reservoir``: every sample seen so far has the same chance to be in the memory (Vitter's
  algorithm R over the stream of training samples, in a seeded random order per task);
* ``class-balanced``: the memory is shared equally among the classes (targets) seen so far; when
  a new class arrives, each old class gives up its surplus, the most recently added first.

Samples enter at the end of each task (``add``), so that the task being learned is never replayed.
:class:`MemoryStrategy` is what the strategies that keep such a memory (``replay``, ``agem``) share:
the options, the memory, the check that it fits the data, filling it and checkpointing it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

from ..errors import UserError
from ..spec import option
from .scenarios import Stream, Task
from .strategies.base import Batch, Strategy, task_samples

SELECTIONS = ("reservoir", "class-balanced")


class SampleBuffer:
    def __init__(self, size: int, selection: str, generator: torch.Generator):
        if selection not in SELECTIONS:
            raise ValueError(f"unknown selection {selection!r}")
        self.size, self.selection, self.generator = size, selection, generator
        self.x: torch.Tensor | None = None
        self.y = torch.empty(0, dtype=torch.long)
        self.task = torch.empty(0, dtype=torch.long)
        self.seen = 0  # samples offered so far (reservoir sampling's count)

    def __len__(self) -> int:
        return len(self.y)

    def add(self, samples: Batch) -> None:
        """Offer a task's training samples to the memory."""
        order = torch.randperm(len(samples.y), generator=self.generator)
        samples = Batch(samples.x[order], samples.y[order], samples.task[order])
        if self.selection == "reservoir":
            self._reservoir(samples)
        else:
            self._balanced(samples)

    def _reservoir(self, samples: Batch) -> None:
        keep: list[tuple[int | None, int]] = []  # (slot to replace or None to append, sample)
        for i in range(len(samples.y)):
            if len(self) + len(keep) < self.size:
                keep.append((None, i))
            else:
                draw = int(torch.randint(self.seen + 1, (1,), generator=self.generator))
                if draw < self.size:
                    keep.append((draw, i))
            self.seen += 1
        self._write([i for slot, i in keep if slot is None], samples)
        assert self.x is not None  # _write has made it
        for slot, i in keep:
            if slot is not None:
                self.x[slot], self.y[slot], self.task[slot] = samples.x[i], samples.y[i], samples.task[i]

    def _balanced(self, samples: Batch) -> None:
        # A class is a (task, label) pair: in domain-incremental split tasks the labels 0 and 1 recur in
        # every task, and each task's pair must keep its share.
        mine, theirs = _class_keys(self.y, self.task), _class_keys(samples.y, samples.task)
        quota = self.size // len(set(mine.tolist()) | set(theirs.tolist()))
        self._take(_first_of_each(mine, quota))
        self._write(_first_of_each(theirs, quota)[:self.size - len(self)], samples)

    def _take(self, index: list[int]) -> None:
        index_t = torch.tensor(index, dtype=torch.long)
        if self.x is not None:
            self.x, self.y, self.task = self.x[index_t], self.y[index_t], self.task[index_t]

    def _write(self, index: list[int], samples: Batch) -> None:
        index_t = torch.tensor(index, dtype=torch.long)
        x = samples.x[index_t]
        self.x = x if self.x is None else torch.cat([self.x, x])
        self.y = torch.cat([self.y, samples.y[index_t]])
        self.task = torch.cat([self.task, samples.task[index_t]])

    def sample(self, count: int) -> Batch:
        """``count`` samples drawn uniformly (without replacement when the memory holds enough)."""
        if count >= len(self):
            index = torch.randperm(len(self), generator=self.generator)
        else:
            index = torch.randperm(len(self), generator=self.generator)[:count]
        assert self.x is not None  # only sampled when it holds samples (replay and A-GEM check)
        return Batch(self.x[index], self.y[index], self.task[index])

    def state_dict(self) -> dict[str, Any]:
        return {"x": self.x, "y": self.y, "task": self.task, "seen": self.seen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.x, self.y, self.task, self.seen = state["x"], state["y"], state["task"], state["seen"]


def _class_keys(y: torch.Tensor, task: torch.Tensor) -> torch.Tensor:
    return task * 1_000_000 + y  # labels are output units: far fewer than a million


def _first_of_each(keys: torch.Tensor, quota: int) -> list[int]:
    """Indices of the first ``quota`` samples of each key, in their original order."""
    return sorted(int(i) for key in keys.unique() for i in (keys == key).nonzero().flatten()[:quota])


@dataclass
class MemoryOptions:
    size: int = option(1000, "samples the memory holds (all tasks together)")
    selection: Literal["class-balanced", "reservoir"] = option(
        "class-balanced", "which samples stay: an equal share per class, or a uniform sample of all seen")

    def validate(self) -> None:
        if self.size < 1:
            raise UserError(f"option size must be at least 1, got {self.size}")


class MemoryStrategy(Strategy):
    """A strategy with a fixed-size memory of past tasks' samples, filled at the end of each task."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.memory = SampleBuffer(self.config.size, self.config.selection, self.generator)

    def check(self, stream: Stream) -> None:
        """A memory larger than the data it could ever hold is a mistake, not a setting."""
        super().check(stream)
        past = sum(len(task.data.y_train) for task in stream.tasks[:-1])
        if self.config.size > past:
            raise UserError(f"strategy {self.name}: a memory of {self.config.size} samples is larger than the data "
                            f"of the tasks it could hold ({past} training samples before the last task); "
                            f"use size <= {past}")

    def end_task(self, task: Task) -> None:
        self.memory.add(task_samples(task))

    def extra_state(self) -> dict[str, Any]:
        return {"memory": self.memory.state_dict()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.memory.load_state_dict(state["memory"])
