"""Networks as a list of blocks plus a head, with no knowledge of how they learn.

A block maps h_{l-1} -> a_l = layer(h_{l-1}) -> h_l = pool(f(a_l)). Rules need the two halves
separately (feedback alignment swaps the layer's backward pass, DFA injects an error at h_l,
attention rules need f'(a_l)), so a :class:`Block` exposes ``pre`` and ``post`` as well as
``forward``. The head is a block with the identity activation whose output is the logits.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from .errors import UserError

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "leaky_relu": lambda: nn.LeakyReLU(0.1),
    "gelu": nn.GELU,
}


def make_activation(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise UserError(f"unknown activation {name!r}; choose from {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]()


class Block(nn.Module):
    """One trainable layer with its activation (and optional pooling).

    ``flatten`` makes a dense layer accept image-shaped input, so an MLP can sit
    directly on images and a conv stack can hand over to dense blocks.
    """

    def __init__(self, layer: nn.Module, activation: nn.Module | None = None,
                 pool: nn.Module | None = None, flatten: bool = False):
        super().__init__()
        self.layer = layer
        self.activation = activation if activation is not None else nn.Identity()
        self.pool = pool if pool is not None else nn.Identity()
        self.flatten = flatten

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """The input as the layer sees it."""
        return x.flatten(1) if self.flatten else x

    def pre(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-activation a_l."""
        return self.layer(self.prepare(x))

    def post(self, a: torch.Tensor) -> torch.Tensor:
        """Output h_l from the pre-activation."""
        return self.pool(self.activation(a))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.post(self.pre(x))

    @property
    def out_features(self) -> int:
        return self.layer.out_features if isinstance(self.layer, nn.Linear) else self.layer.out_channels


class BlockNet(nn.Module):
    """``blocks`` (hidden) followed by ``head`` (the output layer, logits)."""

    def __init__(self, blocks: Sequence[Block], head: Block, input_shape: tuple[int, ...],
                 num_classes: int, arch: str = "mlp", hidden: Sequence[int] = ()):
        super().__init__()
        self.hidden = list(hidden)  # the dense hidden sizes it was built with, for result.json
        self.blocks = nn.ModuleList(blocks)
        self.head = head
        self.input_shape = tuple(input_shape)
        self.num_classes = num_classes
        self.arch = arch

    @property
    def layers(self) -> list[Block]:
        """Every trainable block, hidden ones first, the head last."""
        return [*self.blocks, self.head]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x)

    def hidden_shapes(self) -> list[tuple[int, ...]]:
        """Per-sample shape of each hidden block's output h_l."""
        return block_output_shapes(self.blocks, self.input_shape)

    def hidden_outputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        """h_1..h_L of the hidden blocks (with the graph, for rules that need it)."""
        outputs = []
        for block in self.blocks:
            x = block(x)
            outputs.append(x)
        return outputs


def block_output_shapes(blocks: Sequence[Block], input_shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Per-sample output shape after each block, found by one forward pass of a dummy sample."""
    shapes = []
    with torch.no_grad():
        h = torch.zeros(1, *input_shape)
        for block in blocks:
            h = block(h)
            shapes.append(tuple(h.shape[1:]))
    return shapes


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def mlp(input_shape: tuple[int, ...], num_classes: int, hidden: Sequence[int] | None = None,
        activation: str = "relu") -> BlockNet:
    """Dense network: input (flattened) -> hidden[0] -> ... -> num_classes (default hidden: 1000)."""
    hidden = [1000] if hidden is None else hidden
    sizes = [_numel(tuple(input_shape)), *hidden]
    blocks = [Block(nn.Linear(n_in, n_out), make_activation(activation), flatten=(i == 0))
              for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:]))]
    head = Block(nn.Linear(sizes[-1], num_classes), flatten=not blocks)
    return BlockNet(blocks, head, input_shape, num_classes, arch="mlp", hidden=hidden)


def convnet(input_shape: tuple[int, ...], num_classes: int, hidden: Sequence[int] | None = None,
            channels: Sequence[int] = (32, 64), activation: str = "relu") -> BlockNet:
    """Small conv net: 3x3 conv + activation + 2x2 max-pool per channel entry, then dense ``hidden``.

    Works on any image size divisible by 2**len(channels) (1x28x28, 3x32x32, ...).
    """
    if len(input_shape) != 3:
        raise UserError(f"--arch conv needs image data (C, H, W); this data set has shape {tuple(input_shape)}")
    hidden = [] if hidden is None else hidden
    c_in, height, width = input_shape
    if min(height, width) < 2 ** len(channels):
        raise UserError(f"images of {height}x{width} are too small for {len(channels)} pooled conv blocks")
    blocks: list[Block] = []
    for c_out in channels:
        blocks.append(Block(nn.Conv2d(c_in, c_out, kernel_size=3, padding=1), make_activation(activation),
                            pool=nn.MaxPool2d(2)))
        c_in = c_out
    features = _numel(block_output_shapes(blocks, tuple(input_shape))[-1])
    for i, width_out in enumerate(hidden):
        blocks.append(Block(nn.Linear(features, width_out), make_activation(activation), flatten=(i == 0)))
        features = width_out
    head = Block(nn.Linear(features, num_classes), flatten=not hidden)
    return BlockNet(blocks, head, input_shape, num_classes, arch="conv", hidden=hidden)


ARCHITECTURES: dict[str, Callable[..., BlockNet]] = {"mlp": mlp, "conv": convnet}


def register_architecture(name: str, builder: Callable[..., BlockNet]) -> None:
    """Make ``--arch name`` build networks with ``builder(input_shape, num_classes, hidden=, activation=)``."""
    if name in ARCHITECTURES and ARCHITECTURES[name] is not builder:
        raise ValueError(f"architecture {name!r} registered twice")
    ARCHITECTURES[name] = builder


def build(arch: str, input_shape: tuple[int, ...], num_classes: int, hidden: Sequence[int] | None,
          activation: str | None = None) -> BlockNet:
    """Build a registered architecture by name (``None``: the architecture's default hidden sizes / activation)."""
    if arch not in ARCHITECTURES:
        raise UserError(f"unknown --arch {arch!r}; choose from {', '.join(ARCHITECTURES)}")
    chosen = {} if activation is None else {"activation": activation}
    return ARCHITECTURES[arch](tuple(input_shape), num_classes, hidden=hidden, **chosen)
