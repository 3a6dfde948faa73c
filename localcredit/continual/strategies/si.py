"""Synaptic intelligence (Zenke, Poole & Ganguli 2017, ICML, "Continual learning through synaptic intelligence").

While a task is learned, each parameter's contribution to the fall of the loss is summed along the
path of the weights: omega_i += -g_i * delta_theta_i at every step, with g the update the rule
itself asked for (its ``.grad`` before the penalty; for BP, the gradient of the task's loss, as in
van de Ven's implementation) and delta_theta the step the optimiser took. At the task's end the
importance grows by Omega_i += omega_i / (Delta_i^2 + xi), Delta being the parameter's total change
over the task, and omega restarts. Later tasks add c * sum_i Omega_i (theta_i - theta*_i)^2, whose
gradient 2 c Omega (theta - theta*) is added to the rule's update.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ...errors import UserError
from ...rules.base import Rule
from ...spec import option
from ..scenarios import Task
from .base import Strategy, add_penalty_gradient, grads, register, trainable


@dataclass
class SIConfig:
    c: float = option(1.0, "weight of the surrogate-loss penalty")
    xi: float = option(0.1, "damping of the importance (avoids division by ~0 for parameters that did not move)")

    def validate(self) -> None:
        if self.c < 0 or self.xi <= 0:
            raise UserError(f"options c >= 0 and xi > 0 needed, got c={self.c}, xi={self.xi}")


@register("si")
class SynapticIntelligence(Strategy):
    """Synaptic intelligence (Zenke 2017): path-integral importance of each parameter."""

    Config = SIConfig

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        params = trainable(self.rule)
        self.importance = [torch.zeros_like(p) for p in params]  # Omega
        self.path = [torch.zeros_like(p) for p in params]        # omega of the task being learned
        self.anchor = [p.detach().clone() for p in params]       # theta* (= the weights at the task's start)
        self._update: list[torch.Tensor] = []
        self._before: list[torch.Tensor] = []

    def adjust_gradients(self, rule: Rule) -> None:
        params = trainable(rule)
        self._update = grads(params)  # the rule's own update, before the penalty
        self._before = [p.detach().clone() for p in params]
        with torch.no_grad():
            add_penalty_gradient(params, [2 * self.config.c * omega * (p - a)
                                          for omega, a, p in zip(self.importance, self.anchor, params)])

    def after_step(self, rule: Rule) -> None:
        with torch.no_grad():
            for path, g, before, p in zip(self.path, self._update, self._before, trainable(rule)):
                path.add_(-g * (p - before))

    def end_task(self, task: Task) -> None:
        with torch.no_grad():
            for importance, path, anchor, p in zip(self.importance, self.path, self.anchor, trainable(self.rule)):
                importance.add_(path / ((p - anchor).square() + self.config.xi))
                path.zero_()
                anchor.copy_(p)

    def statistics(self) -> dict[str, Any]:
        return {"mean_importance": float(sum(i.sum() for i in self.importance)
                                         / max(1, sum(i.numel() for i in self.importance)))}

    def extra_state(self) -> dict[str, Any]:
        return {"importance": self.importance, "path": self.path, "anchor": self.anchor}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.importance, self.path, self.anchor = state["importance"], state["path"], state["anchor"]
