"""Invertible networks for target propagation (GAIT-prop, TP, ITP): ``--arch invertible`` and ``invertible-conv``.

Ahmad, van Gerven, Ambrogioni 2020 (GAIT-prop, NeurIPS) and Dalm, Ahmad, Ambrogioni, van Gerven 2023
("Scaling up learning with GAIT-prop", TMLR): target propagation carries a target for a layer's
output down to its input, g_l^{-1}(z) = W_l^{-1} (f^{-1}(z) - b_l), so every layer above the first
must be invertible: a square linear map and an invertible activation.

The invertible-layer protocol (activations, layers, the per-layer-type registry, :class:`InvertibleBlock`)
is in ``invertible_layers``, the solves in ``invertible_solve``; this module builds the networks from them,
registers the two architectures when imported, and re-exports the protocol's names.

**The networks.** ``--arch invertible``: input -> hidden[0] (never inverted, may be non-square) ->
square hidden layers -> square output layer whose first ``num_classes`` units are the logits (the
rest are auxiliary units that keep it square; rules give them their own value as target).
``--arch invertible-conv``: a stack of :class:`PatchConv2d` layers (``--patches``), then the same
dense square output layer over all their features. Weights start orthogonal, biases at zero: with
orthogonal W the inverse is the transpose, which is what makes GAIT-prop equal BP at initialisation.
BP trains the very same networks for comparison.
"""

from __future__ import annotations

import math

from torch import nn

from ..errors import UserError
from .architectures import NetSpec, register_architecture
from .blocknet import BlockNet
from .invertible_layers import (
    SLOPE,
    DenseOp,
    InvertibleBlock,
    InvertibleIdentity,
    InvertibleLeakyReLU,
    InvertibleOp,
    KeepFirst,
    PatchConv2d,
    PatchConvOp,
    RearrangementOp,
    SpaceToDepth,
    SquareMatrixOp,
    Trace,
    check_invertible,
    invertible_op,
    patch_conv,
    patch_rows,
    register_invertible,
    rows_to_map,
)
from .invertible_solve import Factorisation, single_threaded_on_cpu

#: Widest default layer: square N x N layers cost N^3 to factorise.
MAX_DEFAULT_WIDTH = 1024
MIN_DEFAULT_WIDTH = 32
DEFAULT_DEPTH = 3
#: --arch invertible-conv: conv layers of the default stack (see default_patches)
DEFAULT_CONV_LAYERS = 3


# ----- architectures -------------------------------------------------------------------------------
def default_width(input_size: int, num_classes: int) -> int:
    """The input size, clipped to [32, 1024] and never below the number of classes."""
    return max(num_classes, MIN_DEFAULT_WIDTH, min(input_size, MAX_DEFAULT_WIDTH))


def orthogonal_linear(n_in: int, n_out: int) -> nn.Linear:
    layer = nn.Linear(n_in, n_out)
    nn.init.orthogonal_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


def orthogonal_patch_conv(in_channels: int, patch: int) -> PatchConv2d:
    layer = PatchConv2d(in_channels, patch)
    nn.init.orthogonal_(layer.weight)  # orthogonal as the (k^2 C) x (C k^2) matrix of each patch
    assert layer.bias is not None  # PatchConv2d always has one (Conv2d's default bias=True)
    nn.init.zeros_(layer.bias)
    return layer


def _check_activation(arch: str, spec: NetSpec) -> None:
    if spec.activation not in (None, "leaky_relu"):
        raise UserError(f"--arch {arch} uses leaky ReLU (slope {SLOPE}), the invertible activation; "
                        f"--activation {spec.activation} is not supported")


def output_block(width: int, num_classes: int, flatten: bool = False) -> InvertibleBlock:
    """The square output layer: the first ``num_classes`` units are the logits, the rest auxiliary."""
    if width < num_classes:
        raise UserError(f"the invertible output layer needs at least the {num_classes} classes as units, "
                        f"got {width}")
    return InvertibleBlock(orthogonal_linear(width, width), InvertibleIdentity(), keep=KeepFirst(num_classes),
                           rearrange=[nn.Flatten()] if flatten else [])


def invertible(spec: NetSpec, input_shape: tuple[int, ...], num_classes: int) -> BlockNet:
    """Input -> hidden[0] (never inverted) -> square hidden layers -> square output layer (first C units = logits).

    ``hidden`` lists the hidden widths, which must all be equal (the layers are square); default:
    three layers as wide as the input (clipped to [32, 1024], at least the class count).
    """
    _check_activation("invertible", spec)
    input_size = math.prod(input_shape)
    hidden = [default_width(input_size, num_classes)] * DEFAULT_DEPTH if spec.hidden is None else list(spec.hidden)
    if not hidden:
        head = InvertibleBlock(orthogonal_linear(input_size, num_classes), InvertibleIdentity(),
                               rearrange=[nn.Flatten()])
        return BlockNet([], head, input_shape, num_classes, arch="invertible", hidden=hidden)
    width = hidden[0]
    if any(size != width for size in hidden):
        raise UserError(f"--arch invertible keeps its layers square: the --hidden sizes must all be equal, "
                        f"got {','.join(map(str, hidden))}")
    if width < num_classes:
        raise UserError(f"--arch invertible needs a width of at least the {num_classes} classes, got {width}")
    blocks = [InvertibleBlock(orthogonal_linear(input_size if i == 0 else width, width), InvertibleLeakyReLU(),
                              rearrange=[nn.Flatten()] if i == 0 else []) for i in range(len(hidden))]
    return BlockNet(blocks, output_block(width, num_classes), input_shape, num_classes, arch="invertible",
                    hidden=hidden)


def default_patches(height: int, width: int) -> list[int]:
    """A first patch of about sqrt(side) pixels, one patch over the rest of the map, then a 1 x 1 layer:
    7,4,1 on 28 x 28 images (four layers with the output layer, as --arch invertible's default)."""
    common = [k for k in range(2, min(height, width) + 1) if height % k == 0 and width % k == 0]
    first = next((k for k in common if k * k >= min(height, width)), None)
    if first is None:  # sides without a common divisor: position-wise layers only
        return [1] * DEFAULT_CONV_LAYERS
    patches = [first]
    if height // first == width // first > 1:
        patches.append(height // first)  # the rest of the map in one patch: every unit meets every other
    return patches + [1] * (DEFAULT_CONV_LAYERS - len(patches))


def invertible_conv(spec: NetSpec, input_shape: tuple[int, ...], num_classes: int) -> BlockNet:
    """Invertible convs (kernel = stride = k, k^2 C_in channels, leaky ReLU) -> the square dense output layer.

    The paper's ImageNet net uses overlapping strided convs inverted patch by patch; here the patches do
    not overlap, so every layer is exactly invertible (docs/gaitprop.md).
    """
    _check_activation("invertible-conv", spec)
    if len(input_shape) != 3:
        raise UserError(f"--arch invertible-conv needs image data (C, H, W); this data set has per-sample shape "
                        f"{tuple(input_shape)}")
    channels, height, width = input_shape
    patches = default_patches(height, width) if spec.patches is None else list(spec.patches)
    blocks = []
    for patch in patches:
        if height % patch or width % patch:
            raise UserError(f"--patches {','.join(map(str, patches))}: a {patch}x{patch} patch does not tile a "
                            f"{height}x{width} feature map, so the layer would not be invertible")
        blocks.append(InvertibleBlock(orthogonal_patch_conv(channels, patch), InvertibleLeakyReLU()))
        channels, height, width = channels * patch * patch, height // patch, width // patch
    features = channels * height * width
    head = output_block(features, num_classes, flatten=True)
    return BlockNet(blocks, head, input_shape, num_classes, arch="invertible-conv", hidden=[],
                    description={"patches": patches, "activation": "leaky_relu",
                                 "channels": [b.layer.out_channels for b in blocks], "features": features})


register_architecture("invertible", invertible)
register_architecture("invertible-conv", invertible_conv, options=("patches", "activation"))


__all__ = [
    "DEFAULT_CONV_LAYERS", "DEFAULT_DEPTH", "MAX_DEFAULT_WIDTH", "MIN_DEFAULT_WIDTH", "SLOPE",
    "DenseOp", "Factorisation", "InvertibleBlock", "InvertibleIdentity", "InvertibleLeakyReLU", "InvertibleOp",
    "KeepFirst", "PatchConv2d", "PatchConvOp", "RearrangementOp", "SpaceToDepth", "SquareMatrixOp", "Trace",
    "check_invertible", "default_patches", "default_width", "invertible", "invertible_conv", "invertible_op",
    "orthogonal_linear", "orthogonal_patch_conv", "output_block", "patch_conv", "patch_rows", "register_invertible",
    "rows_to_map", "single_threaded_on_cpu",
]
