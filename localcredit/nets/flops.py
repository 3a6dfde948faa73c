"""Forward FLOPs per sample of each block, and the contiguous split of a sequence of costs that balances them:
what cuts a network's blocks into modules of about equal cost
(:meth:`~localcredit.nets.blocknet.BlockNet.in_modules`).

One multiply-add is two FLOPs. Only ``nn.Conv2d`` (``PatchConv2d`` included) and ``nn.Linear`` are
counted, from forward hooks: they dominate the networks here; batch norm, activations and pooling add
a few per cent. (The bench counts every operation of whole training steps: ``localcredit.bench.flops``.)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import cache
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


def layer_flops(layers: Sequence[nn.Module], input_shape: Sequence[int]) -> list[int]:
    """FLOPs of one sample's forward through each of ``layers`` in turn (the output of one the input of the next).

    One eval-mode forward of zeros without gradients: batch-norm statistics stay as they are and every
    module's training mode is restored.
    """
    totals = [0] * len(layers)
    running = [0]  # the index of the layer whose forward runs now

    def count(layer: nn.Module, _inputs, output) -> None:
        counter = next(c for kind, c in COUNTERS.items() if isinstance(layer, kind))
        totals[running[0]] += counter(layer, output)

    modes = [(m, m.training) for layer in layers for m in layer.modules()]
    hooks = [m.register_forward_hook(count) for layer in layers for m in layer.modules()
             if isinstance(m, tuple(COUNTERS))]
    parameter = next((p for layer in layers for p in layer.parameters()), None)
    h = torch.zeros(1, *input_shape, device=parameter.device if parameter is not None else None,
                    dtype=parameter.dtype if parameter is not None else None)
    try:
        with torch.no_grad():
            for running[0], layer in enumerate(layers):
                layer.eval()
                h = layer(h)
    finally:
        for module, training in modes:
            module.training = training
        for hook in hooks:
            hook.remove()
    return totals


def balanced_split(costs: Sequence[float], parts: int) -> list[int]:
    """Sizes of ``parts`` contiguous, non-empty groups of ``costs``: the largest group total as small as it can be,
    and of the splits that reach it, the most even one (least sum of squared totals; then the earliest cuts).

    ``balanced_split([1, 7, 6, 6], 2)`` is ``[2, 2]`` (8 and 12; the other cuts leave a group of 19 or 14).
    """
    n = len(costs)
    if not 1 <= parts <= n:
        raise ValueError(f"cannot split {n} items into {parts} non-empty groups")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)

    def total(start: int, end: int) -> float:
        return prefix[end] - prefix[start]

    @cache
    def largest(start: int, k: int) -> float:
        """The smallest possible largest group of items start.. in k groups."""
        if k == 1:
            return total(start, n)
        return min(max(total(start, end), largest(end, k - 1)) for end in range(start + 1, n - k + 2))

    limit = largest(0, parts) * (1 + 1e-12)

    @cache
    def evenest(start: int, k: int) -> tuple[float, tuple[int, ...]] | None:
        """(sum of squared totals, cuts) of the split of items start.. into k groups of at most ``limit`` each."""
        if k == 1:
            return (total(start, n) ** 2, (n,)) if total(start, n) <= limit else None
        options = []
        for end in range(start + 1, n - k + 2):
            rest = evenest(end, k - 1) if total(start, end) <= limit else None
            if rest is not None:
                options.append((total(start, end) ** 2 + rest[0], (end, *rest[1])))
        return min(options) if options else None

    best = evenest(0, parts)
    assert best is not None  # the split that reaches the limit is one
    cuts = (0, *best[1])
    return [b - a for a, b in zip(cuts, cuts[1:])]
