"""Neurons as agents that seek next-layer attention: NAN (Moakhar et al. 2023, arXiv 2310.09952).

Only the paper's abstract is public; the formulation is METHODS.md section 000 and the derivation
(definitions, best response, the theorem that linear attention is BP, the budgeted variants) is
written up in docs/nan.md. In one paragraph: block l maps its input x_l to a_l = W_l x_l + b and
h_l = pool(f(a_l)). Every unit i of h_l receives attention A_i from the next layer; its need is
s = A * f'(a) (through the pool's own routing), and it updates its own incoming weights by the best
response dW_ik = s_i x_k. Next-layer unit j pays input i the attention alpha_ji = s_j * M_ji, so
the received attention is A_prev = s M: the attention kernel M is W itself for ``nan-bp`` (and then
A^l = -dL/dh_l exactly: the strategy is BP) and a budgeted re-weighting of W for ``nan``. The head's
attention comes from the task: A^L = -dL/dlogits.

Everything is computed explicitly, block by block: matrix products for dense layers, the transposed
convolution and ``conv2d_weight`` for conv layers. The only autograd use is the local
vector-Jacobian product through ``block.post`` (the unit's own f'(a) and the pool's routing), and
dL/dlogits at the output; no error is backpropagated through the network by autograd.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.grad import conv2d_input, conv2d_weight

from ..errors import UserError
from .base import Rule, option, register

#: the share of a next-layer unit's attention whose support is reported by ``statistics()``
ATTENTION_MASS = 0.9


@dataclass
class BlockTrace:
    """What block l remembers from the forward pass: its input, pre-activation and the local post graph."""

    inputs: torch.Tensor  # h_{l-1} as the block received it (image-shaped for conv)
    layer_input: torch.Tensor  # x_l = prepare(h_{l-1}), what the layer multiplies
    pre: torch.Tensor  # a_l, a leaf: the post graph below reaches no weight
    output: torch.Tensor  # h_l = post(a_l), with the graph of post only


def unit_need(trace: BlockTrace, attention: torch.Tensor) -> torch.Tensor:
    """s = A * f'(a), routed back through the pool: the vector-Jacobian product of ``post`` alone."""
    (need,) = torch.autograd.grad(trace.output, trace.pre, attention)
    return need


def best_response(layer: nn.Module, trace: BlockTrace, need: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each unit's ascent on R_i = sg(A_i) h_i over its own incoming weights, summed over the batch."""
    if isinstance(layer, nn.Linear):
        return need.t() @ trace.layer_input, need.sum(0)
    if isinstance(layer, nn.Conv2d):
        weight = conv2d_weight(trace.layer_input, layer.weight.shape, need, layer.stride, layer.padding,
                               layer.dilation, layer.groups)
        return weight, need.sum((0, 2, 3))
    raise TypeError(f"next-layer attention does not support {type(layer).__name__}")


def received_attention(layer: nn.Module, trace: BlockTrace, need: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """A_i = sum_j alpha_ji = sum_j s_j M_ji for every input unit i of the block (shape of h_{l-1})."""
    if isinstance(layer, nn.Linear):
        return (need @ kernel).view_as(trace.inputs)
    if isinstance(layer, nn.Conv2d):
        return conv2d_input(trace.inputs.shape, kernel, need, layer.stride, layer.padding, layer.dilation,
                            layer.groups)
    raise TypeError(f"next-layer attention does not support {type(layer).__name__}")


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
class NextLayerAttentionBP(Rule):
    """NAN with linear attention alpha_ji = s_j w_ji (Moakhar et al. 2023): each neuron's best response equals BP.

    Moakhar et al., "Seeking Next Layer Neurons' Attention for Error-Backpropagation-Like Training in
    a Multi-Agent Network Framework", arXiv 2310.09952 (2023); formulation of METHODS.md 000.
    """

    def __init__(self, net, config=None, optim=None):
        super().__init__(net, config, optim)
        self._last_batch: tuple[torch.Tensor, torch.Tensor] | None = None
        self.epoch_records: list[dict[str, Any]] = []

    def attention_kernel(self, weight: torch.Tensor) -> torch.Tensor:
        """M with alpha_ji = s_j M_ji; linear attention pays each input in proportion to its weight."""
        return weight

    # ----- the game, one round per batch -------------------------------------------------------
    def forward_traces(self, x: torch.Tensor) -> list[BlockTrace]:
        traces, h = [], x
        for block in self.net.layers:
            layer_input = block.prepare(h)
            with torch.no_grad():
                pre = block.layer(layer_input)
            pre.requires_grad_(True)
            with torch.enable_grad():
                output = block.post(pre)
            traces.append(BlockTrace(h, layer_input, pre, output))
            h = output.detach()
        return traces

    def output_attention(self, logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The task's attention on the output units, A^L = -dL/dlogits (softmax minus one-hot over batch size)."""
        logits = logits.detach().requires_grad_(True)
        with torch.enable_grad():
            loss = self.task_loss(logits, y)
        (gradient,) = torch.autograd.grad(loss, logits)
        return -gradient, loss.detach()

    def assign_credit(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        self._last_batch = (x, y)
        traces = self.forward_traces(x)
        attention, loss = self.output_attention(traces[-1].output, y)
        for depth in reversed(range(len(traces))):
            block, trace = self.net.layers[depth], traces[depth]
            with torch.no_grad():
                need = unit_need(trace, attention)
                weight_response, bias_response = best_response(block.layer, trace, need)
                # The optimiser descends: the best response (an ascent direction) enters with a minus sign.
                block.layer.weight.grad = -weight_response
                if block.layer.bias is not None:
                    block.layer.bias.grad = -bias_response
                if depth > 0:  # the first block's inputs are data, not agents
                    kernel = self.attention_kernel(block.layer.weight.detach())
                    attention = received_attention(block.layer, trace, need, kernel)
        return {"loss": loss.item()}

    # ----- per-epoch statistics ---------------------------------------------------------------
    def record(self) -> dict[str, Any]:
        """Per block that passes attention down: its support and, on the last batch seen, the cosine with BP."""
        from ..align import alignment  # align imports the rules package: import it at call time

        layers = self.net.layers[1:]
        with torch.no_grad():
            support = [attention_support(self.attention_kernel(b.layer.weight.detach())) for b in layers]
        cosine = None
        if self._last_batch is not None:
            cosine = [round(c, 6) for c in alignment(self, *self._last_batch)]
        return {"attention_support": [round(s, 6) for s in support], "cosine_with_bp": cosine}

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
            "attention_support_meaning": (f"per block that passes attention down (blocks 2..L), mean over its "
                                          f"units j of the fraction of j's inputs receiving {ATTENTION_MASS:.0%} "
                                          f"of j's attention"),
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
    """Per row j, non-negative shares over the inputs that sum to one."""
    if config.attention == "softmax":
        scale = magnitude.mean(1, keepdim=True).clamp_min(torch.finfo(magnitude.dtype).tiny)
        return torch.softmax(magnitude / (config.tau * scale), dim=1)
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
        row_budget = self.config.budget * magnitude.sum(1, keepdim=True)
        # copysign gives w = +0 the sign +1, so no share of the budget is lost.
        return torch.copysign(budget_shares(magnitude, self.config) * row_budget, rows).view_as(weight)
