"""Experience replay (Chaudhry et al. 2019, "On tiny episodic memories in continual learning"; Rolnick et
al. 2019, "Experience replay for continual learning").

A fixed-size memory of past tasks' samples (``localcredit.continual.memory``); at every step
``replay_batch`` samples drawn from it join the current batch, so the rule learns from both through
its own losses (a replayed sample answers in its own task's head in task-incremental learning).
"""

from __future__ import annotations

from dataclasses import dataclass

from ...errors import UserError
from ...spec import option
from ..memory import MemoryOptions, MemoryStrategy
from ..scenarios import Task
from .base import Batch, concat, register


@dataclass
class ReplayConfig(MemoryOptions):
    replay_batch: int = option(0, "replayed samples per step (0: as many as the batch size)")

    def validate(self) -> None:
        super().validate()
        if self.replay_batch < 0:
            raise UserError(f"option replay_batch must be at least 0, got {self.replay_batch}")


@register("replay")
class ExperienceReplay(MemoryStrategy):
    """Experience replay (Chaudhry 2019): a fixed-size memory of past samples mixed into each batch."""

    Config = ReplayConfig

    def batch(self, batch: Batch, task: Task) -> Batch:
        if not len(self.memory):
            return batch
        return concat(batch, self.memory.sample(self.config.replay_batch or len(batch.y)))
