"""Learning without forgetting (Li & Hoiem 2017, TPAMI 40(12), "Learning without Forgetting").

At the end of each task the network is copied; while later tasks are learned, the copy's outputs
on the current inputs are the targets for the old outputs. Here they enter as soft targets, so
that every rule receives them through its own class losses (its head, its local classifiers, its
similarity targets, its output error) with no backward pass added:

    target = (1 - w) * onehot(y) + w * softmax(z_old / T) on the old outputs,

with w = t / (t + 1) when task t (0-based) is learned (the old tasks' share, as van de Ven et al.
weigh the distillation term), T the temperature. Class-incremental: the old outputs are the
classes of the earlier tasks; domain-incremental: every output. The one departure from Li &
Hoiem: the student's logits are not divided by T, because a rule's losses see its plain outputs.

Task-incremental learning is refused: its old heads are separate softmaxes, which one soft target
over the shared output layer cannot stand for.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ...errors import UserError
from ...spec import option
from ..scenarios import Task
from .base import Batch, Strategy, register


@dataclass
class LwFConfig:
    temperature: float = option(2.0, "T: the old model's logits are divided by T before the softmax")
    weight: float = option(-1.0, "w: share of the old model's target (-1: t / (t + 1) at task t, 0-based)")

    def validate(self) -> None:
        if self.temperature <= 0:
            raise UserError(f"option temperature must be positive, got {self.temperature}")
        if not (self.weight == -1 or 0 <= self.weight <= 1):
            raise UserError(f"option weight must be in [0, 1] (or -1 for t / (t + 1)), got {self.weight}")


@register("lwf")
class LearningWithoutForgetting(Strategy):
    """Learning without forgetting (Li & Hoiem 2017): the previous model's outputs as soft targets."""

    Config = LwFConfig
    kinds = ("domain", "class")

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.teacher: torch.nn.Module | None = None

    def batch(self, batch: Batch, task: Task) -> Batch:
        if self.teacher is None:
            return batch
        old = self.stream.head(task.index - 1, task.index - 1)  # None: every output (domain-IL)
        with torch.no_grad():
            logits = self.teacher(batch.x)
            old_index = torch.arange(logits.shape[1]) if old is None else torch.tensor(old)
            soft = F.softmax(logits[:, old_index] / self.config.temperature, dim=1)
        w = task.index / (task.index + 1) if self.config.weight == -1 else self.config.weight
        target = torch.zeros(len(batch.y), self.stream.outputs, dtype=soft.dtype)
        target[:, old_index] = w * soft
        target[torch.arange(len(batch.y)), batch.y] += 1 - w
        return Batch(batch.x, target, batch.task)

    def end_task(self, task: Task) -> None:
        self.teacher = copy.deepcopy(self.rule.net).eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)

    def extra_state(self) -> dict[str, Any]:
        return {"teacher": None if self.teacher is None else self.teacher.state_dict()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        if state["teacher"] is not None:
            self.teacher = copy.deepcopy(self.rule.net).eval()
            self.teacher.load_state_dict(state["teacher"])
            for p in self.teacher.parameters():
                p.requires_grad_(False)
