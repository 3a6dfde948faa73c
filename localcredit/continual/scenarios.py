"""Task streams for continual learning, in the three scenarios of van de Ven, Tuytelaars & Tolias (2022).

A scenario says what the network is asked at test time:

* task-incremental (``split-task``): the task id is given; each task has its own head, here the
  task's classes carved out of one shared output layer (the other outputs are masked).
* domain-incremental (``split-domain``, ``permuted``): no task id, and the same output units serve
  every task. Split: task t's two classes become outputs 0 and 1 ("first or second digit of the
  pair"); permuted: every task is the whole data set under its own fixed pixel permutation, same
  ten classes.
* class-incremental (``split-class``): no task id, one head that grows: after task t, the classes of
  tasks 0..t compete (van de Ven's "active classes"); a class not seen yet takes no part.

Split tasks take the classes in their natural order, ``num_classes / tasks`` per task (split MNIST:
five tasks of two digits). Every stream works on any in-memory :class:`~localcredit.data.Dataset`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..data.base import Dataset
from ..errors import UserError, did_you_mean

#: scenario name -> the kind of incremental learning it is
SCENARIOS = {"split-task": "task", "split-domain": "domain", "split-class": "class", "permuted": "domain"}


@dataclass
class Task:
    """One experience of a stream: its data (labels already mapped to output units) and the classes it holds."""

    index: int
    data: Dataset
    classes: list[int]
    #: the output units of this task's samples (task-IL: its own head; otherwise all of the task's labels)
    outputs: list[int] = field(default_factory=list)


@dataclass
class Stream:
    """The tasks of one scenario and how many output units the network needs."""

    scenario: str
    tasks: list[Task]
    outputs: int

    @property
    def kind(self) -> str:
        return SCENARIOS[self.scenario]

    def __len__(self) -> int:
        return len(self.tasks)

    def head(self, task: int, trained_up_to: int) -> list[int] | None:
        """The outputs that compete for a sample of ``task`` once tasks 0..``trained_up_to`` are learned."""
        if self.kind == "task":
            return self.tasks[task].outputs
        if self.kind == "class":
            return sorted({c for t in self.tasks[:trained_up_to + 1] for c in t.outputs})
        return None

    def training_mask(self, task_ids: torch.Tensor, current: int) -> Sequence[int] | torch.Tensor | None:
        """The heads of a training batch whose samples come from ``task_ids`` while task ``current`` is learned:
        None (all outputs), one list of outputs for the whole batch, or a (B, outputs) bool mask, one row per
        sample (task-IL batches that mix tasks: replayed samples answer in their own task's head)."""
        if self.kind != "task":
            return self.head(current, current)
        present = task_ids.unique()
        if len(present) == 1:
            return self.tasks[int(present[0])].outputs
        heads = torch.zeros(len(self.tasks), self.outputs, dtype=torch.bool)
        for task in self.tasks:
            heads[task.index, task.outputs] = True
        return heads[task_ids]


def make_stream(data: Dataset, scenario: str, tasks: int, seed: int = 0) -> Stream:
    """The ``tasks`` tasks of ``scenario`` built from ``data`` (the permutations drawn from ``seed``)."""
    if scenario not in SCENARIOS:
        raise UserError(f"unknown --scenario {scenario!r}{did_you_mean(scenario, SCENARIOS)}; "
                        f"choose from {', '.join(SCENARIOS)}")
    if tasks < 1:
        raise UserError(f"--tasks must be at least 1, got {tasks}")
    if scenario == "permuted":
        return Stream(scenario, permuted(data, tasks, seed), outputs=data.num_classes)
    per_task = classes_per_task(data, tasks)
    return Stream(scenario, split(data, tasks, per_task, relabel=SCENARIOS[scenario] == "domain"),
                  outputs=per_task if SCENARIOS[scenario] == "domain" else data.num_classes)


def classes_per_task(data: Dataset, tasks: int) -> int:
    """Classes per split task; a split that would leave tasks unequal or of one class is refused."""
    valid = [n for n in range(1, data.num_classes + 1) if data.num_classes % n == 0 and data.num_classes // n >= 2]
    if tasks not in valid:
        raise UserError(f"--tasks {tasks} does not split the {data.num_classes} classes of {data.name} into equal "
                        f"tasks of two or more classes; use {', '.join(map(str, valid))}")
    return data.num_classes // tasks


def permuted(data: Dataset, tasks: int, seed: int = 0) -> list[Task]:
    """Each task permutes the input features with its own permutation drawn from ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    features = data.x_train[0].numel()
    classes = list(range(data.num_classes))
    stream = []
    for t in range(tasks):
        order = torch.randperm(features, generator=generator)
        stream.append(Task(t, _permute(data, order, t), classes=classes, outputs=classes))
    return stream


def _permute(data: Dataset, order: torch.Tensor, t: int) -> Dataset:
    def apply(x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)[:, order].reshape(x.shape)

    return Dataset(name=f"{data.name}/permuted-{t}", x_train=apply(data.x_train), y_train=data.y_train,
                   x_test=apply(data.x_test), y_test=data.y_test, num_classes=data.num_classes)


def split(data: Dataset, tasks: int, per_task: int, relabel: bool) -> list[Task]:
    """Task t holds classes per_task*t .. per_task*(t+1)-1; ``relabel`` maps them to outputs 0..per_task-1."""
    stream = []
    for t in range(tasks):
        classes = list(range(per_task * t, per_task * (t + 1)))
        task_data = _select(data, classes, t, offset=classes[0] if relabel else 0,
                            num_classes=per_task if relabel else data.num_classes)
        stream.append(Task(t, task_data, classes=classes,
                           outputs=list(range(per_task)) if relabel else classes))
    return stream


def _select(data: Dataset, classes: list[int], t: int, offset: int, num_classes: int) -> Dataset:
    wanted = torch.tensor(classes)
    train = torch.isin(data.y_train, wanted)
    test = torch.isin(data.y_test, wanted)
    if not train.any() or not test.any():
        raise UserError(f"task {t} (classes {classes}) has no training or no test samples in {data.name}")
    return Dataset(name=f"{data.name}/classes-{'-'.join(map(str, classes))}", x_train=data.x_train[train],
                   y_train=data.y_train[train] - offset, x_test=data.x_test[test], y_test=data.y_test[test] - offset,
                   num_classes=num_classes)
