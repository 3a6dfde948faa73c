"""Task streams for continual learning, as Avalanche defines its benchmark scenarios.

* ``permuted``: every task is the whole data set under its own fixed, seeded permutation of the
  input features (pixels, across channels); all tasks share the same classes.
* ``split-class`` (class-incremental): task t holds two classes; one shared head, no task id at test.
* ``split-task`` (task-incremental): the same splits, but each task has its own head and the task
  id is given at training and test time (:attr:`Task.head_classes`).

Split tasks take the classes in their natural order: task 0 = {0, 1}, task 1 = {2, 3}, ...
Every stream works on any :class:`~localcredit.data.Dataset`, including ``npz:`` ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..data.base import Dataset
from ..errors import UserError

SCENARIOS = ("permuted", "split-class", "split-task")
CLASSES_PER_SPLIT = 2


@dataclass
class Task:
    """One experience of a stream: its own train/test data, and the head to use (None: all outputs)."""

    index: int
    data: Dataset
    classes: list[int]
    head_classes: list[int] | None = None


def make_stream(data: Dataset, scenario: str, tasks: int, seed: int = 0) -> list[Task]:
    """The ``tasks`` tasks of ``scenario`` built from ``data``."""
    if scenario not in SCENARIOS:
        raise UserError(f"unknown --scenario {scenario!r}; choose from {', '.join(SCENARIOS)}")
    if tasks < 1:
        raise UserError(f"--tasks must be at least 1, got {tasks}")
    if scenario == "permuted":
        return permuted(data, tasks, seed)
    return split(data, tasks, task_incremental=scenario == "split-task")


def permuted(data: Dataset, tasks: int, seed: int = 0) -> list[Task]:
    """Each task permutes the input features with its own permutation drawn from ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    features = data.x_train[0].numel()
    stream = []
    for t in range(tasks):
        order = torch.randperm(features, generator=generator)
        stream.append(Task(t, _permute(data, order, t), classes=list(range(data.num_classes))))
    return stream


def _permute(data: Dataset, order: torch.Tensor, t: int) -> Dataset:
    def apply(x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)[:, order].reshape(x.shape)

    return Dataset(name=f"{data.name}/permuted-{t}", x_train=apply(data.x_train), y_train=data.y_train,
                   x_test=apply(data.x_test), y_test=data.y_test, num_classes=data.num_classes)


def split(data: Dataset, tasks: int, task_incremental: bool) -> list[Task]:
    """Task t holds classes {2t, 2t+1}; with ``task_incremental`` each task predicts among its own classes."""
    needed = CLASSES_PER_SPLIT * tasks
    if needed > data.num_classes:
        raise UserError(f"--tasks {tasks} needs {needed} classes ({CLASSES_PER_SPLIT} per task) but "
                        f"{data.name} has {data.num_classes}")
    stream = []
    for t in range(tasks):
        classes = list(range(CLASSES_PER_SPLIT * t, CLASSES_PER_SPLIT * (t + 1)))
        stream.append(Task(t, _select(data, classes, t), classes=classes,
                           head_classes=classes if task_incremental else None))
    return stream


def _select(data: Dataset, classes: list[int], t: int) -> Dataset:
    wanted = torch.tensor(classes)
    train = torch.isin(data.y_train, wanted)
    test = torch.isin(data.y_test, wanted)
    if not train.any() or not test.any():
        raise UserError(f"task {t} (classes {classes}) has no training or no test samples in {data.name}")
    return Dataset(name=f"{data.name}/classes-{'-'.join(map(str, classes))}", x_train=data.x_train[train],
                   y_train=data.y_train[train], x_test=data.x_test[test], y_test=data.y_test[test],
                   num_classes=data.num_classes)
