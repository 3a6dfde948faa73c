"""Floating-point operations of a network's forward pass per sample, counted from its conv and linear layers.

One multiply-add is two FLOPs. Only ``nn.Conv2d`` (``PatchConv2d`` included) and ``nn.Linear`` are
counted: they dominate the networks here; batch norm, activations and pooling add a few per cent.
A training step of BP costs about three forwards (forward, input gradients, weight gradients).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn


def _conv_flops(layer: nn.Conv2d, output: torch.Tensor) -> int:
    per_output = (layer.in_channels // layer.groups) * layer.kernel_size[0] * layer.kernel_size[1]
    return 2 * per_output * output[0].numel()


def _linear_flops(layer: nn.Linear, output: torch.Tensor) -> int:
    return 2 * layer.in_features * output[0].numel()


#: Per counted layer type: FLOPs of one sample, from the layer and its (batched) output.
COUNTERS: dict[type[nn.Module], Callable[[Any, torch.Tensor], int]] = {nn.Conv2d: _conv_flops, nn.Linear: _linear_flops}


def forward_flops(net: nn.Module, input_shape: Sequence[int]) -> int:
    """FLOPs of one sample's forward pass through ``net`` (conv and linear layers)."""
    total = 0

    def count(layer: nn.Module, _inputs, output) -> None:
        nonlocal total
        counter = next(c for kind, c in COUNTERS.items() if isinstance(layer, kind))
        total += counter(layer, output)

    hooks = [m.register_forward_hook(count) for m in net.modules() if isinstance(m, tuple(COUNTERS))]
    was_training = net.training
    try:
        net.eval()
        with torch.no_grad():
            net(torch.zeros(1, *input_shape))
    finally:
        net.train(was_training)
        for hook in hooks:
            hook.remove()
    return total
