"""An invertible dense network for target propagation rules (GAIT-prop, TP, ITP).

Every layer after the first is square (width N -> N) with an invertible activation, so a target
for a layer's output can be carried down to its input: g_l^{-1}(z) = W_l^{-1} (f^{-1}(z) - b_l).
The first layer maps the (flattened) input to the width N and is never inverted, so it may be
non-square. The output layer is N -> N as well; only its first ``num_classes`` units are passed
on as logits, the rest are auxiliary units that exist only to keep the layer square (rules give
them their own value as target). Weights start orthogonal, biases at zero: with orthogonal W the
inverse is the transpose, which is what makes GAIT-prop equal BP at initialisation.

Built with ``--arch invertible`` (the default of the gaitprop, tp and itp rules), so BP can train
the very same network for comparison. Its blocks are :class:`InvertibleBlock` s: a dense layer, an
invertible activation and a selection of units, exposed separately because target propagation
inverts each part (the invertible-layer protocol of these rules).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .architectures import NetSpec, register_architecture
from .errors import UserError
from .layers import register_layer
from .nets import BlockNet

SLOPE = 0.1
#: Widest default layer: square N x N layers cost N^3 to factorise every step.
MAX_DEFAULT_WIDTH = 1024
MIN_DEFAULT_WIDTH = 32
DEFAULT_DEPTH = 3


class InvertibleLeakyReLU(nn.LeakyReLU):
    """Leaky ReLU with its inverse and its derivative, as target propagation needs both."""

    def __init__(self, negative_slope: float = SLOPE):
        if not negative_slope > 0:
            raise ValueError("a leaky ReLU is only invertible with a positive slope")
        super().__init__(negative_slope)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return torch.where(y >= 0, y, y / self.negative_slope)

    def derivative(self, a: torch.Tensor) -> torch.Tensor:
        return torch.where(a >= 0, torch.ones_like(a), torch.full_like(a, self.negative_slope))


class InvertibleIdentity(nn.Identity):
    """The output layer's activation: linear, so the logits are the pre-activations."""

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return y

    def derivative(self, a: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(a)


class InvertibleBlock(nn.Module):
    """h = keep(activation(layer(flatten?(x)))): a dense layer, an invertible activation, a unit selection."""

    def __init__(self, layer: nn.Linear, activation: nn.Module, keep: nn.Module | None = None, flatten: bool = False):
        super().__init__()
        self.layer = layer
        self.activation = activation
        self.pool = keep if keep is not None else nn.Identity()
        self.flatten = flatten

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """The input as the layer sees it."""
        return x.flatten(1) if self.flatten else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.activation(self.layer(self.prepare(x))))


class KeepFirst(nn.Module):
    """Passes on the first ``n`` units; the remaining (auxiliary) units stay inside the layer."""

    def __init__(self, n: int):
        super().__init__()
        self.n = n

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :self.n]

    def extra_repr(self) -> str:
        return f"n={self.n}"


def default_width(input_size: int, num_classes: int) -> int:
    """The input size, clipped to [32, 1024] and never below the number of classes."""
    return max(num_classes, MIN_DEFAULT_WIDTH, min(input_size, MAX_DEFAULT_WIDTH))


def orthogonal_linear(n_in: int, n_out: int) -> nn.Linear:
    layer = nn.Linear(n_in, n_out)
    nn.init.orthogonal_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


def invertible(spec: NetSpec, input_shape: tuple[int, ...], num_classes: int) -> BlockNet:
    """Input -> hidden[0] (never inverted) -> square hidden layers -> square output layer (first C units = logits).

    ``hidden`` lists the hidden widths, which must all be equal (the layers are square); default:
    three layers as wide as the input (clipped to [32, 1024], at least the class count).
    """
    if spec.activation not in (None, "leaky_relu"):
        raise UserError(f"--arch invertible uses leaky ReLU (slope {SLOPE}), the invertible activation; "
                        f"--activation {spec.activation} is not supported")
    input_size = math.prod(input_shape)
    hidden = [default_width(input_size, num_classes)] * DEFAULT_DEPTH if spec.hidden is None else list(spec.hidden)
    if not hidden:
        head = InvertibleBlock(orthogonal_linear(input_size, num_classes), InvertibleIdentity(), flatten=True)
        return BlockNet([], head, input_shape, num_classes, arch="invertible", hidden=hidden)
    width = hidden[0]
    if any(size != width for size in hidden):
        raise UserError(f"--arch invertible keeps its layers square: the --hidden sizes must all be equal, "
                        f"got {','.join(map(str, hidden))}")
    if width < num_classes:
        raise UserError(f"--arch invertible needs a width of at least the {num_classes} classes, got {width}")
    blocks = [InvertibleBlock(orthogonal_linear(input_size if i == 0 else width, width), InvertibleLeakyReLU(),
                              flatten=(i == 0)) for i in range(len(hidden))]
    head = InvertibleBlock(orthogonal_linear(width, width), InvertibleIdentity(), keep=KeepFirst(num_classes))
    return BlockNet(blocks, head, input_shape, num_classes, arch="invertible", hidden=hidden)


def is_invertible(net: BlockNet) -> bool:
    """Whether every layer after the first is a square dense layer with an invertible activation."""
    return net.arch == "invertible" and all(
        isinstance(block, InvertibleBlock) and isinstance(block.layer, nn.Linear) and block.layer.in_features == block.layer.out_features
        and hasattr(block.activation, "inverse") for block in net.layers[1:])


register_architecture("invertible", invertible)
# Its forward applies its children in turn (the flatten of the first block is a reshape).
register_layer(InvertibleBlock, "container")
register_layer(KeepFirst, "local")
