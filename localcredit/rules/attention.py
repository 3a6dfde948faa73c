"""Neurons as agents that seek next-layer attention: NAN (Moakhar et al. 2023, arXiv 2310.09952).

Only the paper's abstract is public; the formulation is METHODS.md section 000 and the derivation
(definitions, best response, the theorem that linear attention is BP, the budgeted variants) is
written up in docs/nan.md. In one paragraph: a unit i of a layer with weights (Linear, Conv)
receives attention A_i from the layers it feeds; its need is s = A * f'(a), through the local
derivative of whatever lies between it and those layers (activation, batch norm, pooling, the
residual add); it updates its own incoming weights by the best response dW_ik = s_i x_k. Next-layer
unit j pays input i the attention alpha_ji = s_j * M_ji, so the received attention is A = s M:
the attention kernel M is W itself for ``nan-bp`` (and then A = -dL/dh exactly: the strategy is
BP) and a budgeted re-weighting of W for ``nan``. The head's attention comes from the task:
A = -dL/dlogits.

How it runs: every message is computed by the per-layer-type math of ``localcredit.nets.layers``. Each
weight layer's best response is its registered parameter gradient and the attention it passes
down is its registered input gradient with M in place of W (``swapped_input_gradients``); the
local derivatives between weight layers are those layers' own backward passes. Autograd only
schedules these local computations from the head down (it carries -A, the gradient sign).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, cast

import torch
from torch import nn

from ..errors import UserError
from ..nets.layers import weight_layers
from ..nets.layout import in_layout_of
from .alignment import alignment
from .base import StepFigures, option, register
from .feedback import SubstitutedFeedback

#: the share of a next-layer unit's attention whose support is reported by ``statistics()``
ATTENTION_MASS = 0.9


def attention_support(kernel: torch.Tensor, mass: float = ATTENTION_MASS) -> float:
    """Mean over next-layer units j of the fraction of j's inputs that receive ``mass`` of its attention.

    |alpha_ji| = |s_j| |M_ji|, so the shares within row j do not depend on the sample.
    """
    magnitude = kernel.detach().flatten(1).abs().double()
    ranked = magnitude.sort(dim=1, descending=True).values
    cumulative = ranked.cumsum(1) / ranked.sum(1, keepdim=True).clamp_min(1e-300)
    needed = (cumulative < mass).sum(1) + 1
    return (needed.double() / magnitude.shape[1]).mean().item()


@register("nan-bp")
class NextLayerAttentionBP(SubstitutedFeedback):
    """NAN with linear attention alpha_ji = s_j w_ji (Moakhar et al. 2023): each neuron's best response equals BP.

    Moakhar et al., "Seeking Next Layer Neurons' Attention for Error-Backpropagation-Like Training in
    a Multi-Agent Network Framework", arXiv 2310.09952 (2023); formulation of METHODS.md 000.
    """

    layer_math_use = "passes attention through every layer by that layer's own math"

    def __init__(self, net, config=None, optim=None):
        super().__init__(net, config, optim)
        self._last_batch: tuple[torch.Tensor, torch.Tensor] | None = None
        self.epoch_records: list[dict[str, Any]] = []

    def attention_kernel(self, weight: torch.Tensor) -> torch.Tensor:
        """M with alpha_ji = s_j M_ji; linear attention pays each input in proportion to its weight."""
        return weight

    def feedback(self, name: str, layer: nn.Module | None = None) -> torch.Tensor:
        """The attention kernel of the weight layer ``name``, from its weight now."""
        if layer is None:
            layer = self.net.get_submodule(name)
        return self.attention_kernel(cast(torch.Tensor, layer.weight).detach())

    # ----- the game, one round per batch -------------------------------------------------------
    def assign_credit(self, x: torch.Tensor, y: torch.Tensor) -> StepFigures:
        # The gradient sign: -A flows down through each layer's kernel; each weight layer writes -(its best
        # response) into .grad, which the optimiser descends.
        self._last_batch = (x, y)
        return super().assign_credit(x, y)

    # ----- per-epoch statistics ---------------------------------------------------------------
    def attending_layers(self) -> list[tuple[str, nn.Module]]:
        """The weight layers that pass attention down: all but the first, whose inputs are data."""
        return weight_layers(self.net)[1:]

    def record(self) -> dict[str, Any]:
        """Per weight layer that passes attention down: its support; per block, on the last batch seen, the cosine with BP."""

        with torch.no_grad():
            support = {name: round(attention_support(self.feedback(name, layer)), 6)
                       for name, layer in self.attending_layers()}
        cosine = None
        if self._last_batch is not None:
            cosine = [round(c, 6) for c in alignment(self, *self._last_batch)]
        return {"attention_support": support, "cosine_with_bp": cosine}

    def start_epoch(self, epoch: int, epochs: int) -> None:
        # Called before epoch `epoch`: the weights are those at the end of the previous epoch.
        if epoch > len(self.epoch_records):
            self.epoch_records.append(self.record())

    def statistics(self) -> dict[str, Any]:
        records = list(self.epoch_records)
        if self._last_batch is not None:
            records.append(self.record())
        return {
            "attention_mass": ATTENTION_MASS,
            "attention_support_meaning": (f"per weight layer that passes attention down (all but the first), "
                                          f"mean over its units j of the fraction of j's inputs receiving "
                                          f"{ATTENTION_MASS:.0%} of j's attention"),
            "cosine_with_bp_meaning": "per block (1..L), cosine of the update with BP's on the epoch's last batch",
            "per_epoch": records,
        }

    def extra_state(self) -> dict[str, Any]:
        return {"epoch_records": self.epoch_records}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.epoch_records = list(state.get("epoch_records", []))


@dataclass
class BudgetConfig:
    attention: Literal["softmax", "topk"] = option(
        "softmax", "how next-layer unit j spends its budget over its inputs: softmax_i(|w_ji| / tau) shares, "
                   "or shares proportional to |w_ji| over its k largest-|w| inputs only (default chosen on a "
                   "validation split: results/nan/README.md)")
    tau: float = option(1.0, "softmax temperature in units of the mean |w_ji| of j's row (large: sign-only, "
                             "equal shares; small: all on the largest |w|)")
    k: int = option(100, "topk: how many inputs each next-layer unit attends to (clamped to its fan-in; "
                         "k >= fan-in with budget=1 is exactly BP)")
    budget: float = option(1.0, "total attention of unit j: sum_i |alpha_ji| = budget * |s_j| * ||w_j||_1")

    def validate(self) -> None:
        if not self.tau > 0:
            raise UserError(f"option tau must be positive, got {self.tau}")
        if self.k < 1:
            raise UserError(f"option k must be at least 1, got {self.k}")
        if not self.budget > 0:
            raise UserError(f"option budget must be positive, got {self.budget}")


def budget_shares(magnitude: torch.Tensor, config: BudgetConfig) -> torch.Tensor:
    """Per row j, non-negative shares over the inputs that sum to one.

    ``magnitude`` is |w| with one row per next-layer unit; with softmax attention it is overwritten
    (the kernel is recomputed for every layer in every backward pass: no temporaries it can spare).
    """
    if config.attention == "softmax":
        scale = magnitude.mean(1, keepdim=True).clamp_min_(torch.finfo(magnitude.dtype).tiny)
        return torch.softmax(magnitude.div_(scale.mul_(config.tau)), dim=1)
    k = min(config.k, magnitude.shape[1])
    top = magnitude.topk(k, dim=1)
    kept = torch.zeros_like(magnitude).scatter_(1, top.indices, top.values)
    total = kept.sum(1, keepdim=True)
    # A row whose k largest weights are all zero spends its budget equally on them.
    uniform = torch.zeros_like(magnitude).scatter_(1, top.indices, 1.0 / k)
    return torch.where(total > 0, kept / total.clamp_min(torch.finfo(magnitude.dtype).tiny), uniform)


@register("nan")
class NextLayerAttention(NextLayerAttentionBP):
    """NAN with budgeted attention (softmax or top-k over |w_ji|, Moakhar et al. 2023): a non-BP strategy.

    Next-layer unit j has attention budget * |s_j| * ||w_j||_1 to spend; it pays input i
    alpha_ji = s_j * sign(w_ji) * budget * ||w_j||_1 * share_ji. Formulation of METHODS.md 000 with
    weight-only shares (docs/nan.md says why not |w_ji h_i|); the default was chosen on a validation
    split (results/nan/README.md).
    """

    Config = BudgetConfig

    def attention_kernel(self, weight: torch.Tensor) -> torch.Tensor:
        rows = weight.flatten(1)
        magnitude = rows.abs()
        row_budget = magnitude.sum(1, keepdim=True).mul_(self.config.budget)
        # In place on the fresh shares: one (out, in) temporary fewer per layer and step.
        # copysign gives w = +0 the sign +1, so no share of the budget is lost.
        kernel = budget_shares(magnitude, self.config).mul_(row_budget).copysign_(rows).view_as(weight)
        return in_layout_of(kernel, weight)  # the rows were flattened in the default layout
