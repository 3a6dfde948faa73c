"""Online EWC (Schwarz et al. 2018, ICML, "Progress & Compress: a scalable framework for continual learning").

One running Fisher instead of one per task: after task k, F <- gamma * F + F_k and the anchor moves
to theta*_k; the penalty's gradient lambda * F (theta - theta*) is added to the rule's update. The
Fisher is estimated as in ``ewc`` (from the rule's own per-sample update signal).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ...errors import UserError
from ...rules.base import Rule
from ...spec import option
from ..scenarios import Task
from .base import Strategy, add_penalty_gradient, register, trainable
from .ewc import EWCConfig, diagonal_fisher


@dataclass
class OnlineEWCConfig(EWCConfig):
    gamma: float = option(1.0, "decay of the running Fisher at each new task (1: no decay)")

    def validate(self) -> None:
        super().validate()
        if not 0 <= self.gamma <= 1:
            raise UserError(f"option gamma must be in [0, 1], got {self.gamma}")


@register("online-ewc")
class OnlineEWC(Strategy):
    """Online EWC (Schwarz 2018): one running, decayed Fisher and the latest anchor."""

    Config = OnlineEWCConfig

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.fisher: list[torch.Tensor] | None = None
        self.anchor: list[torch.Tensor] | None = None

    def adjust_gradients(self, rule: Rule) -> None:
        if self.fisher is None or self.anchor is None:
            return
        params = trainable(rule)
        with torch.no_grad():
            add_penalty_gradient(params, [self.config.strength * f * (p - a)
                                          for f, a, p in zip(self.fisher, self.anchor, params)])

    def end_task(self, task: Task) -> None:
        new = diagonal_fisher(self, task, self.config)
        self.fisher = new if self.fisher is None else [self.config.gamma * f + n for f, n in zip(self.fisher, new)]
        self.anchor = [p.detach().clone() for p in trainable(self.rule)]

    def extra_state(self) -> dict[str, Any]:
        return {"fisher": self.fisher, "anchor": self.anchor}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.fisher, self.anchor = state["fisher"], state["anchor"]
