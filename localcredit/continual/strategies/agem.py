"""Averaged gradient episodic memory (Chaudhry, Ranzato, Rohrbach & Elhoseiny 2019, ICLR, "Efficient
lifelong learning with A-GEM").

A memory of past samples as in ``replay``; at every step the rule's update on a batch drawn from
the memory is the reference g_ref. If the current update g points against it (g . g_ref < 0), g is
projected onto the half-space where it does not: g <- g - (g . g_ref / g_ref . g_ref) g_ref.

For rules that learn block by block the projection is made within each of the rule's parameter
groups (one per block for local rules, the whole network for BP): a global dot product would make
every block's update depend on every other block's, which a BP-free rule must not. For BP, one
group, this is A-GEM exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ...errors import UserError
from ...rules.base import Rule
from ...spec import option
from ..memory import MemoryOptions, MemoryStrategy
from .base import register, rule_update, trainable


@dataclass
class AGEMConfig(MemoryOptions):
    reference_batch: int = option(256, "memory samples the reference update is computed on at each step")

    def validate(self) -> None:
        super().validate()
        if self.reference_batch < 1:
            raise UserError(f"option reference_batch must be at least 1, got {self.reference_batch}")


@register("agem")
class AGEM(MemoryStrategy):
    """A-GEM (Chaudhry 2019): project each update off the memory's reference update when they conflict."""

    Config = AGEMConfig

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.projections = 0
        self.steps = 0

    def adjust_gradients(self, rule: Rule) -> None:
        if not len(self.memory):
            return
        self.steps += 1
        reference = self.memory.sample(self.config.reference_batch)
        head = self.stream.training_mask(reference.task, self.current)
        g_ref = dict(zip(map(id, trainable(rule)), rule_update(rule, reference.x, reference.y, head)))
        for group in rule.parameter_groups():
            params = [p for p in group if p.requires_grad and p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params if p.grad is not None]  # all of them (the test narrows the type)
            ref = [g_ref[id(p)] for p in params]
            dot = sum((g * r).sum() for g, r in zip(grads, ref))
            norm = sum(r.square().sum() for r in ref)
            if dot < 0 and norm > 0:
                self.projections += 1
                with torch.no_grad():
                    for p, g, r in zip(params, grads, ref):
                        p.grad = g - (dot / norm) * r

    def statistics(self) -> dict[str, Any]:
        return {"projected_group_steps": self.projections, "steps_with_memory": self.steps}

    def extra_state(self) -> dict[str, Any]:
        return {**super().extra_state(), "projections": self.projections, "steps": self.steps}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        super().load_extra_state(state)
        self.projections, self.steps = state["projections"], state["steps"]
