"""Random-feedback baselines: feedback alignment (fa) and direct feedback alignment (dfa).

* FA, Lillicrap et al. 2016, "Random synaptic feedback weights support error backpropagation
  for deep learning", Nat. Commun. 7:13276. The backward pass of every weight layer uses a fixed
  random matrix B_l (same shape as W_l) in place of W_l^T; weight gradients are otherwise BP's.
* DFA, Nøkland 2016, "Direct feedback alignment provides learning in deep neural networks",
  NeurIPS. The output error e = dL/da_L reaches every hidden block's output directly through a
  fixed random B_l; inside a block it takes the block's own backward pass (for a one-layer block:
  delta_l = (B_l e) * f'(a_l)). No error travels from block to block.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ..nets.layers import check_layer_math, swapped_input_gradients, weight_layers, weight_op
from ..nets.layout import in_layout_of
from .base import Rule, StepFigures, option, register


@dataclass
class FeedbackConfig:
    init: Literal["uniform", "gaussian"] = option(
        "uniform", "distribution of the fixed feedback matrices (both scaled by 1/sqrt(fan-in of the feedback))")


def random_feedback(shape: tuple[int, ...], fan_in: int, init: str) -> torch.Tensor:
    scale = 1.0 / math.sqrt(fan_in)
    if init == "gaussian":
        return torch.randn(shape) * scale
    return (torch.rand(shape) * 2 - 1) * scale


class SubstitutedFeedback(Rule):
    """What fa, usf, frsf, brsf and kp share: BP's backward pass with every weight layer sending its error down
    through a feedback matrix of its weight's shape, :meth:`feedback`, instead of W_l (the per-layer-type
    registry, ``localcredit.nets.layers``). Weight gradients keep BP's form; batch norm, activations, pooling
    and residual adds keep their own backward."""

    #: what the rule does with every layer's math, for the error naming a layer type without it
    layer_math_use = "replaces the backward pass of every weight layer"

    def __init__(self, net, config=None, optim=None):
        check_layer_math(net.layers, self.name, self.layer_math_use)
        super().__init__(net, config, optim)

    def feedback(self, name: str, layer: nn.Module | None = None) -> torch.Tensor:
        """The matrix the weight layer called ``name`` in ``net.named_modules()`` sends its error through."""
        raise NotImplementedError

    def assign_credit(self, x: torch.Tensor, y: torch.Tensor) -> StepFigures:
        with swapped_input_gradients(self.net, self.feedback):
            loss = self.task_loss(self.net(x), y)
            with self.final_as_accumulated():
                loss.backward()
        return {"loss": loss.detach()}


@register("fa")
class FeedbackAlignment(SubstitutedFeedback):
    """Feedback alignment (Lillicrap et al. 2016): errors flow down through fixed random matrices.

    Every weight layer (Linear, Conv) of every block gets a fixed random B_l of its weight's shape,
    used by its backward pass in place of W_l (``localcredit.nets.layers``); batch norm, activations,
    pooling and residual adds keep their own backward. With B_l = W_l this is exactly BP.
    """

    Config = FeedbackConfig

    def __init__(self, net, config=None, optim=None):
        super().__init__(net, config, optim)
        self.feedback_index = {}
        for i, (name, layer) in enumerate(weight_layers(net)):
            fan_in = weight_op(layer).feedback_fan_in(layer)
            self.register_buffer(f"feedback_{i}", random_feedback(tuple(layer.weight.shape), fan_in, self.config.init))
            self.feedback_index[name] = i

    def feedback(self, name: str, layer: nn.Module | None = None) -> torch.Tensor:
        """B of the weight layer called ``name`` in ``net.named_modules()``."""
        return getattr(self, f"feedback_{self.feedback_index[name]}")


@register("dfa")
class DirectFeedbackAlignment(Rule):
    """Direct feedback alignment (Nøkland 2016): the output error reaches each block through its own random matrix."""

    Config = FeedbackConfig

    def __init__(self, net, config=None, optim=None):
        super().__init__(net, config, optim)
        for i, shape in enumerate(net.hidden_shapes()):
            size = math.prod(shape)
            self.register_buffer(f"feedback_{i}", random_feedback((net.num_classes, size), net.num_classes,
                                                                  self.config.init))

    def assign_credit(self, x: torch.Tensor, y: torch.Tensor) -> StepFigures:
        # Each block sees a detached input, so backward from h_l reaches only block l's weights.
        *outputs, logits = [h for _, _, h in self.net.walk(x, detach_inputs=True)]
        loss = self.task_loss(logits, y)
        (error,) = torch.autograd.grad(loss, logits, retain_graph=True)
        injected = [in_layout_of((error @ getattr(self, f"feedback_{i}")).view_as(out), out)
                    for i, out in enumerate(outputs)]
        with self.final_as_accumulated():  # one backward call: each block's weights are reached once
            torch.autograd.backward([loss, *outputs], [None, *injected])
        return {"loss": loss.detach()}

