"""Joint training on every task so far: the upper bound of a continual-learning table."""

from __future__ import annotations

from ..scenarios import Task
from .base import Batch, Strategy, concat, register, task_samples


@register("joint")
class Joint(Strategy):
    """Joint (cumulative) training: task t trains on the data of tasks 0..t together (upper bound).

    The same number of steps per task as every other strategy, over the union of the tasks seen so
    far (van de Ven et al. 2022's "joint" baseline in its cumulative form).
    """

    def training_set(self, task: Task) -> Batch:
        return concat(*(task_samples(t) for t in self.stream.tasks[:task.index + 1]))
