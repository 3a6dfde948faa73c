"""Kolen-Pollack learning: kp (Akrout et al. 2019, after Kolen & Pollack 1994).

Akrout, Wilson, Humphreys, Lillicrap and Tweed, "Deep learning without weight transport", NeurIPS 2019
(arXiv 1904.05391); Kolen and Pollack, "Backpropagation without weight transport", ICNN 1994.
The error goes down through a feedback matrix B_l of its own, as in feedback alignment,
delta_l = (B_{l+1}^T delta_{l+1}) * f'(a_l), but B_l learns: it receives the same local update as W_l
and the same weight decay (the paper's eqs. 16-17, B kept here in W's orientation):

    W_l <- W_l - eta delta_l h_{l-1}^T - lambda W_l
    B_l <- B_l - eta delta_l h_{l-1}^T - lambda B_l

Both updates are local to the synapse (the error delta_l and the activity h_{l-1} meet at W_l's and at
B_l's synapses alike), and their difference obeys B_l - W_l <- (1 - lambda)(B_l - W_l): B_l converges to
W_l whatever it started from, so the updates turn from feedback alignment's into backprop's. What
crosses from the forward to the feedback path is the weight *change* (weight-update symmetry), never
the weights.

Implemented exactly so, with any optimiser: B_l is kept as its difference from W_l, D_l = B_l - W_l (a
buffer in W's shape, checkpointed, never a parameter), and formed as B_l = W_l + D_l when the backward
pass needs it. B_l's update is then W_l's, whatever produced it (Adam's moments, momentum, the
optimiser's own --weight-decay, a learning-rate schedule, the data-parallel average, a continual
strategy's penalty or projection), and the decay lambda, applied to W_l and to D_l (so to B_l) between
the rule's update and the optimiser's step (the order of the equations above), makes D_l shrink by
(1 - lambda) per step. lambda follows the learning-rate schedule
(lambda eta_t / eta_0), as a decay inside the optimiser's step would; biases and normalisation
parameters are not decayed.

B starts random, drawn uniform or Gaussian (option ``init``) and scaled to W's root mean square, as
the paper's code draws W and B alike (fa's scale, 1/sqrt(fan-in of the feedback), is ~10x W's in a
10-class head, whose B - W would then take ~2.3/lambda more steps to shrink).

The default lambda = 1e-3 per step: B - W falls to 1/e of its start in 1,000 steps and to 5 % in 3,000
(6 epochs of 60k images at batch 128, without a schedule), at a cost of 0.4 points on the 2-epoch VGG check
(docs/sign-feedback.md). A larger lambda aligns sooner but decays W as fast, and that weight decay
costs accuracy with batch norm and without it (lambda = 5e-3 aligns every block above 0.9 within the
314 steps of that check but ends 5 points lower; 1e-2, 10; docs/sign-feedback.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, cast

import torch
from torch import nn

from ..errors import UserError
from ..nets.layers import weight_layers
from .base import StepFigures, option, register
from .feedback import SubstitutedFeedback, random_feedback


@dataclass
class KolenPollackConfig:
    decay: float = option(0.001, "lambda: at every step W and B of every weight layer shrink by 1 - lambda "
                                "(times the schedule's lr / initial lr), so B - W does too and B converges to W")
    init: Literal["uniform", "gaussian"] = option(
        "uniform", "distribution of B at the start, scaled to W's root mean square")

    def validate(self) -> None:
        if not (math.isfinite(self.decay) and 0 <= self.decay < 1):
            raise UserError(f"option decay must be in [0, 1), got {self.decay}")


@register("kp")
class KolenPollack(SubstitutedFeedback):
    """Kolen-Pollack (Akrout et al. 2019): errors flow down through B_l, which gets W_l's update and decay, so B_l -> W_l."""

    Config = KolenPollackConfig

    def __init__(self, net, config=None, optim=None):
        super().__init__(net, config, optim)
        self.kp_layers = weight_layers(net)
        self.layer_index = {}
        for i, (name, layer) in enumerate(self.kp_layers):
            weight = cast(torch.Tensor, layer.weight).detach()
            # B starts random at W's scale (its root mean square), as W and B are drawn alike in the
            # paper's code: fa's scale (1/sqrt(fan-in of the feedback)) is 10x W's in a 10-class head,
            # and B - W would take the longer to shrink.
            start = random_feedback(tuple(weight.shape), 1, self.config.init).to(weight.device)
            start *= weight.pow(2).mean().sqrt() / start.pow(2).mean().sqrt()
            self.register_buffer(f"difference_{i}", start - weight)
            self.layer_index[name] = i
        # The layer whose rows are the class scores: the last weight layer of the head (if it has one).
        head = [layer for _, layer in weight_layers(net.layers[-1])]
        self.output_layer = next((i for i, (_, layer) in enumerate(self.kp_layers) if head and layer is head[-1]),
                                 None)
        # The decay comes after the rule's update is computed and before the optimiser applies it, as in
        # the paper's W <- W - eta dW - lambda W (and AdamW's order): in Rule.step, a gradient hook's place.
        self.gradient_hooks.append(KolenPollack.decay)

    def difference(self, i: int) -> torch.Tensor:
        """D = B - W of weight layer ``i`` (in ``weight_layers`` order)."""
        return getattr(self, f"difference_{i}")

    def feedback(self, name: str, layer: nn.Module | None = None) -> torch.Tensor:
        """B of the weight layer called ``name`` in ``net.named_modules()``: W + D (W's shape)."""
        i = self.layer_index[name]
        weight = cast(torch.Tensor, (layer if layer is not None else self.kp_layers[i][1]).weight)
        return weight.detach() + self.difference(i)

    @torch.no_grad()
    def decay(self, stats: StepFigures | None = None) -> None:
        """W <- (1 - lambda_t) W and D <- (1 - lambda_t) D for every trained weight layer (so B decays as W)."""
        if self.config.decay == 0:
            return
        group = self.optimizers[0].param_groups[0]
        # Host floats (the schedulers' learning rates): nothing waits for the device.
        factor = 1 - self.config.decay * group["lr"] / group.get("initial_lr", group["lr"])
        classes = self.active_classes if self.output_layer is not None else None
        output = self.output_layer if classes is not None else None
        tensors = []
        for i, (_, layer) in enumerate(self.kp_layers):
            weight = cast(torch.Tensor, layer.weight)
            if weight.requires_grad and i != output:
                tensors += [weight, self.difference(i)]
        if tensors:
            torch._foreach_mul_(tensors, factor)
        if classes is not None and output is not None:
            # Under a restricted head (restrict_outputs) the inactive classes' output units sit the step
            # out: their synapses, forward and feedback, neither learn nor decay.
            weight = cast(torch.Tensor, self.kp_layers[output][1].weight)
            active = classes if classes.dim() == 1 else classes.any(0)
            rows = torch.ones(weight.shape[0], dtype=weight.dtype, device=weight.device)
            rows[:len(active)] = torch.where(active.to(weight.device), factor, 1.0)
            rows = rows.view(-1, *[1] * (weight.dim() - 1))
            if weight.requires_grad:
                weight.mul_(rows)
                self.difference(output).mul_(rows)

    def statistics(self) -> dict[str, Any]:
        with torch.no_grad():
            cosine = {}
            for i, (name, layer) in enumerate(self.kp_layers):
                weight = cast(torch.Tensor, layer.weight).detach().double().flatten()
                feedback = weight + self.difference(i).double().flatten()
                cosine[name] = round(torch.nn.functional.cosine_similarity(feedback, weight, dim=0).item(), 6)
        return {"feedback_weight_cosine": cosine,
                "feedback_weight_cosine_meaning": "per weight layer (by module name), cosine between B and W "
                                                  "at the end of the epoch: 1 once B has converged to W"}
