"""Experience replay (Chaudhry et al. 2019, "On tiny episodic memories in continual learning"; Rolnick et
al. 2019, "Experience replay for continual learning").

A fixed-size memory of past tasks' samples (``localcredit.continual.memory``); at every step
``replay_batch`` samples drawn from it join the current batch, so the rule learns from both through
its own losses (a replayed sample answers in its own task's head in task-incremental learning).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from ...errors import UserError
from ...rules.base import option
from ..memory import SampleBuffer
from ..scenarios import Stream, Task
from .base import Batch, Strategy, concat, register, task_samples


@dataclass
class ReplayConfig:
    size: int = option(1000, "samples the memory holds (all tasks together)")
    selection: Literal["class-balanced", "reservoir"] = option(
        "class-balanced", "which samples stay: an equal share per class, or a uniform sample of all seen")
    replay_batch: int = option(0, "replayed samples per step (0: as many as the batch size)")

    def validate(self) -> None:
        if self.size < 1 or self.replay_batch < 0:
            raise UserError(f"options size >= 1 and replay_batch >= 0 needed, got size={self.size}, "
                            f"replay_batch={self.replay_batch}")


def check_memory_fits(name: str, size: int, stream: Stream) -> None:
    """A memory larger than the data it could ever hold is a mistake, not a setting."""
    past = sum(len(task.data.y_train) for task in stream.tasks[:-1])
    if size > past:
        raise UserError(f"strategy {name}: a memory of {size} samples is larger than the data of the tasks it "
                        f"could hold ({past} training samples before the last task); use size <= {past}")


@register("replay")
class ExperienceReplay(Strategy):
    """Experience replay (Chaudhry 2019): a fixed-size memory of past samples mixed into each batch."""

    Config = ReplayConfig

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.memory = SampleBuffer(self.config.size, self.config.selection, self.generator)

    def check(self, stream: Stream) -> None:
        super().check(stream)
        check_memory_fits(self.name, self.config.size, stream)

    def batch(self, batch: Batch, task: Task) -> Batch:
        if not len(self.memory):
            return batch
        return concat(batch, self.memory.sample(self.config.replay_batch or len(batch.y)))

    def end_task(self, task: Task) -> None:
        self.memory.add(task_samples(task))

    def extra_state(self) -> dict[str, Any]:
        return {"memory": self.memory.state_dict()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.memory.load_state_dict(state["memory"])
