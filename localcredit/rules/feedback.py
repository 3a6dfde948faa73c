"""Random-feedback baselines: feedback alignment (fa) and direct feedback alignment (dfa).

* FA, Lillicrap et al. 2016, "Random synaptic feedback weights support error backpropagation
  for deep learning", Nat. Commun. 7:13276. The backward pass of every layer uses a fixed random
  matrix B_l (same shape as W_l) in place of W_l^T; weight gradients are otherwise BP's.
* DFA, Nøkland 2016, "Direct feedback alignment provides learning in deep neural networks",
  NeurIPS. The output error e = dL/da_L reaches every hidden block directly through a fixed
  random B_l: delta_l = (B_l e) * f'(a_l). No error travels from block to block.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.grad import conv2d_input, conv2d_weight

from .base import Rule, option, register


@dataclass
class FeedbackConfig:
    init: Literal["uniform", "gaussian"] = option(
        "uniform", "distribution of the fixed feedback matrices (both scaled by 1/sqrt(fan-in of the feedback))")


def random_feedback(shape: tuple[int, ...], fan_in: int, init: str) -> torch.Tensor:
    scale = 1.0 / math.sqrt(fan_in)
    if init == "gaussian":
        return torch.randn(shape) * scale
    return (torch.rand(shape) * 2 - 1) * scale


class _FeedbackLinear(torch.autograd.Function):
    """y = x W^T + b whose backward sends the error down through B instead of W."""

    @staticmethod
    def forward(ctx, x, weight, bias, feedback):
        ctx.save_for_backward(x, feedback)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, feedback = ctx.saved_tensors
        # The first layer's input is data: skip its gradient, as autograd would.
        grad_x = grad_out @ feedback if ctx.needs_input_grad[0] else None
        return grad_x, grad_out.t() @ x, grad_out.sum(0), None


class _FeedbackConv2d(torch.autograd.Function):
    """A 2-d convolution whose input gradient is the transposed convolution with B instead of W."""

    @staticmethod
    def forward(ctx, x, weight, bias, feedback, stride, padding):
        ctx.save_for_backward(x, feedback)
        ctx.weight_shape, ctx.stride, ctx.padding = weight.shape, stride, padding
        return F.conv2d(x, weight, bias, stride, padding)

    @staticmethod
    def backward(ctx, grad_out):
        x, feedback = ctx.saved_tensors
        grad_x = conv2d_input(x.shape, feedback, grad_out, ctx.stride, ctx.padding) if ctx.needs_input_grad[0] else None
        grad_w = conv2d_weight(x, ctx.weight_shape, grad_out, ctx.stride, ctx.padding)
        return grad_x, grad_w, grad_out.sum((0, 2, 3)), None, None, None


def feedback_pre(layer: nn.Module, x: torch.Tensor, feedback: torch.Tensor) -> torch.Tensor:
    """The layer's pre-activation, with B used on the way back."""
    if isinstance(layer, nn.Linear):
        return _FeedbackLinear.apply(x, layer.weight, layer.bias, feedback)
    if isinstance(layer, nn.Conv2d):
        return _FeedbackConv2d.apply(x, layer.weight, layer.bias, feedback, layer.stride, layer.padding)
    raise TypeError(f"feedback alignment does not support {type(layer).__name__}")


@register("fa")
class FeedbackAlignment(Rule):
    """Feedback alignment (Lillicrap et al. 2016): errors flow down through fixed random matrices."""

    Config = FeedbackConfig

    def __init__(self, net, config=None, optim=None):
        super().__init__(net, config, optim)
        for i, block in enumerate(net.layers):
            weight = block.layer.weight
            # B carries the output error back: its fan-in is out_channels * kernel area.
            fan_in = weight.shape[0] * math.prod(weight.shape[2:])
            self.register_buffer(f"feedback_{i}", random_feedback(tuple(weight.shape), fan_in, self.config.init))

    def feedbacks(self) -> list[torch.Tensor]:
        return [getattr(self, f"feedback_{i}") for i in range(len(self.net.layers))]

    def assign_credit(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        h = x
        for block, feedback in zip(self.net.layers, self.feedbacks()):
            h = block.post(feedback_pre(block.layer, block.prepare(h), feedback))
        loss = self.task_loss(h, y)
        loss.backward()
        return {"loss": loss.item()}


@register("dfa")
class DirectFeedbackAlignment(Rule):
    """Direct feedback alignment (Nøkland 2016): the output error reaches each block through its own random matrix."""

    Config = FeedbackConfig

    def __init__(self, net, config=None, optim=None):
        super().__init__(net, config, optim)
        shapes = net.hidden_shapes()
        for i, shape in enumerate(shapes):
            size = math.prod(shape)
            self.register_buffer(f"feedback_{i}", random_feedback((net.num_classes, size), net.num_classes,
                                                                  self.config.init))

    def assign_credit(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        # Each block sees a detached input, so backward from h_l reaches only block l's weights.
        outputs, h = [], x
        for block in self.net.blocks:
            h = block(h.detach())
            outputs.append(h)
        logits = self.net.head(h.detach())
        loss = self.task_loss(logits, y)
        (error,) = torch.autograd.grad(loss, logits, retain_graph=True)
        injected = [(error @ getattr(self, f"feedback_{i}")).view_as(out) for i, out in enumerate(outputs)]
        torch.autograd.backward([loss, *outputs], [None, *injected])
        return {"loss": loss.item()}

