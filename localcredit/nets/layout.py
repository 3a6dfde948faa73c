"""Feature maps' gradients in their maps' memory layout.

The conv nets keep their maps channels-last (docs/networks.md, "Memory layout"). torch's CPU kernels for
the backward of pooling and batch norm take a slow path when a gradient's strides differ from those of
the map it belongs to. Three common steps make such gradients: flattening a channels-last map for a
classifier (the flat copy's gradient comes back in the default layout), a global average (its backward
expands the gradient in the default layout) and an error built from a flat vector (``view``). On the
speed suite's VGG these helpers made whole steps 0.87x (dfa: its max-pooling backward had taken 3x BP's)
to 0.97x (lfnn-l) (benchmarks/gradient_layout.py; docs/networks.md, "Memory layout").
"""

from __future__ import annotations

import torch
from torch import nn


def _is_channels_last(h: torch.Tensor) -> bool:
    # A map both layouts describe (one channel, or 1x1) needs nothing.
    return h.dim() == 4 and h.is_contiguous(memory_format=torch.channels_last) and not h.is_contiguous()


def _gradient_channels_last(grad: torch.Tensor) -> torch.Tensor:
    return grad.contiguous(memory_format=torch.channels_last)


def keep_gradient_layout(h: torch.Tensor) -> torch.Tensor:
    """``h`` itself; where it is a channels-last map that needs a gradient, that gradient is made channels-last."""
    if h.requires_grad and _is_channels_last(h):
        h.register_hook(_gradient_channels_last)
    return h


def flatten_features(h: torch.Tensor) -> torch.Tensor:
    """``h.flatten(1)`` (the values in the default C, H, W order), its gradient sent back in ``h``'s layout."""
    return keep_gradient_layout(h).flatten(1)


def in_memory_order(h: torch.Tensor) -> torch.Tensor:
    """Each sample's values as one vector in the order they lie in memory: a view, never a copy, and its
    gradient in ``h``'s layout. Only for uses that any order of the features serves alike (similarities)."""
    return h.permute(0, 2, 3, 1).flatten(1) if _is_channels_last(h) else h.flatten(1)


class Flatten(nn.Flatten):
    """``nn.Flatten`` from dimension 1 whose gradient goes back in its input's layout (:func:`flatten_features`)."""

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return flatten_features(h) if self.start_dim == 1 and self.end_dim == -1 else super().forward(h)


def in_layout_of(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``values`` (a tensor of ``like``'s shape) with ``like``'s strides: a copy only where they differ."""
    return values if values.stride() == like.stride() else torch.empty_like(like).copy_(values)


class AdaptiveAvgPool2d(nn.AdaptiveAvgPool2d):
    """``nn.AdaptiveAvgPool2d`` whose input's gradient keeps the input's layout (a global average's
    backward, an expanded gradient, otherwise comes back in the default layout)."""

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return super().forward(keep_gradient_layout(h))
