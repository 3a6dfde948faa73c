"""End-to-end backpropagation: the reference every other rule is compared with."""

from __future__ import annotations

import torch

from .base import Rule, StepFigures, register


@register("bp")
class Backprop(Rule):
    """Backpropagation (Rumelhart et al. 1986): autograd of the task loss through the whole network."""

    def assign_credit(self, x: torch.Tensor, y: torch.Tensor) -> StepFigures:
        loss = self.task_loss(self.net(x), y)
        with self.final_as_accumulated():
            loss.backward()
        return {"loss": loss.detach()}
