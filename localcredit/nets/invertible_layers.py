"""The invertible-layer protocol of target propagation (GAIT-prop, TP, ITP): invertible activations and layers,
the per-layer-type registry and :class:`InvertibleBlock`; the networks built from them are in ``invertible``.

**The protocol.** A rule never looks inside a block. An :class:`InvertibleBlock` is
``keep(activation(layer(rearrange(x))))`` and offers what target propagation needs:
:meth:`~InvertibleBlock.trace` (its forward, keeping what the rule needs), :meth:`~InvertibleBlock.solve`
(the input change that produces a given change of the pre-activation, from a :class:`Factorisation`,
never an explicit inverse), :meth:`~InvertibleBlock.write_local_update` (the gradient of a local
loss with respect to its own weights) and the orthogonality regulariser's gradient and error. The
block gets the per-layer-type math from a registry (:func:`register_invertible`), so a new
invertible layer type is one registration:

* ``nn.Linear`` with as many outputs as inputs (:class:`SquareMatrixOp`: the matrix is W);
* :class:`PatchConv2d`, a convolution whose kernel equals its stride with k^2 C_in output channels:
  non-overlapping k x k patches, each mapped by the same square (k^2 C_in) x (k^2 C_in) matrix, so
  one factorisation per step serves every position of every sample;
* parameter-free rearrangements with an exact inverse (:class:`RearrangementOp`): :class:`SpaceToDepth`
  (invertible down-sampling) and ``nn.Flatten``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple, cast

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from .invertible_solve import Factorisation
from .layers import register_layer

SLOPE = 0.1


# ----- invertible activations ----------------------------------------------------------------------
class InvertibleLeakyReLU(nn.LeakyReLU):
    """Leaky ReLU with its inverse and its derivative, as target propagation needs both."""

    def __init__(self, negative_slope: float = SLOPE):
        if not negative_slope > 0:
            raise ValueError("a leaky ReLU is only invertible with a positive slope")
        super().__init__(negative_slope)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return torch.where(y >= 0, y, y / self.negative_slope)

    def derivative(self, a: torch.Tensor) -> torch.Tensor:
        # 1 where a >= 0, the slope elsewhere, exactly. Float arithmetic on the mask: torch.where and
        # masked_fill on a boolean mask were measured 3-4x slower here, on every layer of every step.
        up = a.ge(0).to(a.dtype)
        return up + (1 - up) * self.negative_slope


class InvertibleIdentity(nn.Identity):
    """The output layer's activation: linear, so the logits are the pre-activations."""

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return y

    def derivative(self, a: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(a)


# ----- invertible layers ---------------------------------------------------------------------------
def patch_rows(x: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, C, H, W) -> (B H/k W/k, C k^2): one row per k x k patch, in a conv weight's (c, i, j) order."""
    patches = x if patch == 1 else F.pixel_unshuffle(x, patch)
    return patches.permute(0, 2, 3, 1).reshape(-1, patches.shape[1])


def rows_to_map(rows: torch.Tensor, batch: int, height: int, width: int) -> torch.Tensor:
    """(B H W, C) rows of positions -> (B, C, H, W), a view (channels-last in memory)."""
    return rows.view(batch, height, width, rows.shape[1]).permute(0, 3, 1, 2)


def patch_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, patch: int) -> torch.Tensor:
    """``conv2d(x, weight, bias, stride=patch)`` for a kernel of ``patch`` x ``patch``, as one matrix product
    over the non-overlapping patches: forward and backward measured 3-6x faster than conv2d's on this
    CPU for the shapes of --arch invertible-conv (BP on the same net profits as much as GAIT-prop)."""
    out = F.linear(patch_rows(x, patch), weight.reshape(weight.shape[0], -1), bias)
    return rows_to_map(out, x.shape[0], x.shape[2] // patch, x.shape[3] // patch)


class PatchConv2d(nn.Conv2d):
    """Conv with kernel = stride = k and k^2 C_in output channels: a square linear map per k x k patch.

    The patches do not overlap, so the layer is invertible exactly when that one square matrix is,
    and its input change is found patch by patch.
    """

    def __init__(self, in_channels: int, patch: int):
        super().__init__(in_channels, patch * patch * in_channels, kernel_size=patch, stride=patch)
        self.patch = patch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return patch_conv(x, self.weight, self.bias, self.patch)


class SpaceToDepth(nn.Module):
    """(C, H, W) -> (k^2 C, H/k, W/k): every k x k patch becomes the channels of one position.

    A permutation of the units, hence invertible down-sampling without parameters; followed by a
    square 1 x 1 conv it is a :class:`PatchConv2d`.
    """

    def __init__(self, patch: int):
        super().__init__()
        self.patch = patch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pixel_unshuffle(x, self.patch)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return F.pixel_shuffle(y, self.patch)

    def extra_repr(self) -> str:
        return f"patch={self.patch}"


class KeepFirst(nn.Module):
    """Passes on the first ``n`` units; the remaining (auxiliary) units stay inside the layer."""

    def __init__(self, n: int):
        super().__init__()
        self.n = n

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :self.n]

    def extra_repr(self) -> str:
        return f"n={self.n}"


# ----- the protocol, per layer type ----------------------------------------------------------------
class InvertibleOp:
    """What target propagation needs from one invertible layer type (see the module docstring)."""

    def forward(self, module: nn.Module, x: torch.Tensor,
                dtype: torch.dtype) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(what the local update needs of the input, the output), computed in ``dtype``."""
        raise NotImplementedError

    def square(self, module: nn.Module) -> bool:
        """Whether the layer maps as many units as it takes (so that it can be inverted)."""
        raise NotImplementedError

    def matrix(self, module: nn.Module, dtype: torch.dtype) -> torch.Tensor | None:
        """The square matrix the layer applies (to every position), or None for a fixed rearrangement."""
        return None

    def solve(self, module: nn.Module, input_shape: torch.Size, delta_out: torch.Tensor,
              factorisation: Factorisation | None, matrix: torch.Tensor | None) -> tuple[torch.Tensor, float]:
        """(input change that changes the output by ``delta_out``, estimated relative error of the solve)."""
        raise NotImplementedError

    def write_local_update(self, module: nn.Module, kept: torch.Tensor | None, signal: torch.Tensor,
                           scale: float) -> None:
        """``.grad`` of the layer's parameters = scale * (d output / d parameters)^T signal, summed over the
        batch; ``kept`` is what :meth:`forward` returned first."""

    def orthogonality_gradient(self, module: nn.Module, weight: float, phase: int, every: int) -> None:
        """Add weight * d||M M^T - I||_F^2 / dM to ``.grad``, for the rows r of M with r % every == phase."""

    def orthogonality_error(self, module: nn.Module) -> float | None:
        """||M M^T - I||_F / sqrt(n) (None: nothing to keep orthogonal)."""
        return None


class SquareMatrixOp(InvertibleOp):
    """A layer that applies one square matrix M (and a bias) to rows: its input's vectors, one per
    sample and position. Subclasses say how inputs and outputs map to rows."""

    def weight_matrix(self, module: nn.Module) -> torch.Tensor:
        weight = cast(torch.Tensor, module.weight)  # nn.Module.__getattr__ is typed Tensor | Module
        return weight.view(weight.shape[0], -1)

    def input_rows(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def rows_to_input(self, module: nn.Module, rows: torch.Tensor, input_shape: torch.Size) -> torch.Tensor:
        raise NotImplementedError

    def output_rows(self, module: nn.Module, a: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def rows_to_output(self, module: nn.Module, rows: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, module, x, dtype):
        # In rows: the local update needs the input rows, so they are made once.
        rows = self.input_rows(module, x)
        bias = module.bias.to(dtype) if module.bias is not None else None
        return rows, self.rows_to_output(module, F.linear(rows, self.matrix(module, dtype), bias), x)

    def square(self, module):
        m = self.weight_matrix(module)
        return m.shape[0] == m.shape[1]

    def matrix(self, module, dtype):
        return self.weight_matrix(module).detach().to(dtype)

    def solve(self, module, input_shape, delta_out, factorisation, matrix):
        rows, error = factorisation.solve(self.output_rows(module, delta_out), matrix)
        return self.rows_to_input(module, rows, input_shape), error

    def write_local_update(self, module, kept, signal, scale):
        signal_rows = scale * self.output_rows(module, signal)  # scaling B x n numbers, not n x n
        grad = signal_rows.mT @ kept
        module.weight.grad = grad.view_as(module.weight).to(module.weight.dtype)
        if module.bias is not None:
            module.bias.grad = signal_rows.sum(0).to(module.bias.dtype)

    def orthogonality_gradient(self, module, weight, phase, every):
        # d/dM ||M M^T - I||_F^2 = 4 (M M^T - I) M; its rows r are 4 (M_r M^T - e_r^T) M, so a share of
        # the rows costs that share of the two n^3 products.
        m = self.weight_matrix(module).detach()
        rows = slice(phase, None, every)
        gram = m[rows] @ m.mT
        own = torch.arange(phase, m.shape[0], every, device=m.device)
        gram[torch.arange(len(own), device=m.device), own] -= 1
        self.weight_matrix_grad(module)[rows] += 4 * weight * (gram @ m)

    def weight_matrix_grad(self, module: nn.Module) -> torch.Tensor:
        weight = cast(torch.Tensor, module.weight)  # nn.Module.__getattr__ is typed Tensor | Module
        if weight.grad is None:
            weight.grad = torch.zeros_like(weight)
        return weight.grad.view(weight.shape[0], -1)

    def orthogonality_error(self, module):
        m = self.weight_matrix(module).detach().double()
        gram = m @ m.mT - torch.eye(len(m), dtype=m.dtype, device=m.device)
        return gram.norm().item() / math.sqrt(len(m))


class DenseOp(SquareMatrixOp):
    """``nn.Linear`` on (B, n) inputs: the rows are the samples."""

    def input_rows(self, module, x):
        return x

    def rows_to_input(self, module, rows, input_shape):
        return rows.view(input_shape)

    def output_rows(self, module, a):
        return a

    def rows_to_output(self, module, rows, x):
        return rows


class PatchConvOp(SquareMatrixOp):
    """:class:`PatchConv2d`: the rows are the k x k patches (C_in k^2 values each, in the weight's
    (channel, row, column) order, which is pixel_unshuffle's channel order) and the output positions."""

    def input_rows(self, module, x):
        return patch_rows(x, module.patch)

    def rows_to_input(self, module, rows, input_shape):
        b, _, h, w = input_shape
        k = module.patch
        patches = rows_to_map(rows, b, h // k, w // k)
        return patches if k == 1 else F.pixel_shuffle(patches, k)

    def output_rows(self, module, a):
        return a.permute(0, 2, 3, 1).reshape(-1, a.shape[1])

    def rows_to_output(self, module, rows, x):
        k = module.patch
        return rows_to_map(rows, x.shape[0], x.shape[2] // k, x.shape[3] // k)


@dataclass(frozen=True)
class RearrangementOp(InvertibleOp):
    """A parameter-free permutation or reshape of the units: solved by its exact inverse."""

    inverse: Callable[[nn.Module, torch.Tensor, torch.Size], torch.Tensor]

    def forward(self, module, x, dtype):
        return None, module(x)

    def square(self, module):
        return True

    def solve(self, module, input_shape, delta_out, factorisation, matrix):
        return self.inverse(module, delta_out, input_shape), 0.0


_INVERTIBLE: dict[type, InvertibleOp] = {}


def register_invertible(cls: type, op: InvertibleOp) -> None:
    """Declare how target propagation runs layers of type ``cls`` (and its subclasses)."""
    _INVERTIBLE[cls] = op


def invertible_op(module: nn.Module) -> InvertibleOp | None:
    for cls in type(module).__mro__:
        if cls in _INVERTIBLE:
            return _INVERTIBLE[cls]
    return None


register_invertible(nn.Linear, DenseOp())
register_invertible(PatchConv2d, PatchConvOp())
register_invertible(SpaceToDepth, RearrangementOp(lambda module, y, shape: cast(SpaceToDepth, module).inverse(y)))
register_invertible(nn.Flatten, RearrangementOp(lambda module, y, shape: y.reshape(shape)))


# ----- the block -----------------------------------------------------------------------------------
class Trace(NamedTuple):
    """One block's forward as target propagation keeps it."""

    shapes: list[torch.Size]  # the input of every leaf (rearrangements, then the layer)
    layer_rows: torch.Tensor | None  # the weight layer's input as the rows its matrix multiplies
    pre_activation: torch.Tensor


def _required_op(module: nn.Module) -> InvertibleOp:
    op = invertible_op(module)
    if op is None:
        raise UserError(f"{type(module).__name__} is not an invertible layer type "
                        f"(localcredit.nets.invertible.register_invertible declares one)")
    return op


class InvertibleBlock(nn.Module):
    """h = keep(activation(layer(rearrange(x)))): fixed rearrangements, one square weight layer, an
    invertible activation, and (output layer only) a selection of the units passed on."""

    def __init__(self, layer: nn.Module, activation: nn.Module, keep: nn.Module | None = None,
                 rearrange: Sequence[nn.Module] = ()):
        super().__init__()
        for module in (*rearrange, layer):
            _required_op(module)
        if not (hasattr(activation, "inverse") and hasattr(activation, "derivative")):
            raise UserError(f"{type(activation).__name__} has no inverse and derivative: not an invertible activation")
        self.rearrange = nn.Sequential(*rearrange)
        self.layer = layer
        self.activation = activation
        self.keep = keep if keep is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.keep(self.activation(self.layer(self.rearrange(x))))

    # ----- the invertible-layer protocol ----------------------------------------------------------
    def trace(self, x: torch.Tensor, dtype: torch.dtype) -> Trace:
        """The forward up to the pre-activation, in ``dtype``, keeping what solve and the update need."""
        shapes = []
        for module in self.rearrange:
            shapes.append(x.shape)
            x = _required_op(module).forward(module, x, dtype)[1]
        shapes.append(x.shape)
        return Trace(shapes, *_required_op(self.layer).forward(self.layer, x, dtype))

    def passes_on_every_unit(self) -> bool:
        return isinstance(self.keep, nn.Identity)

    def square(self) -> bool:
        return _required_op(self.layer).square(self.layer)

    def matrix(self, dtype: torch.dtype) -> torch.Tensor | None:
        return _required_op(self.layer).matrix(self.layer, dtype)

    def solve(self, trace: Trace, delta_a: torch.Tensor, factorisation: Factorisation,
              matrix: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
        """(Delta x, error): the change of the block's input that changes its pre-activation by
        ``delta_a`` (the bias cancels), solved with ``factorisation``; with ``matrix`` (the current M,
        the factors being older), ``error`` estimates the solve's relative error."""
        leaves = [*self.rearrange, self.layer]
        delta, error = delta_a, 0.0
        for module, shape in zip(reversed(leaves), reversed(trace.shapes)):
            delta, leaf_error = _required_op(module).solve(module, shape, delta, factorisation, matrix)
            error = max(error, leaf_error)
        return delta, error

    def write_local_update(self, trace: Trace, signal: torch.Tensor, scale: float) -> None:
        """.grad of the weights = scale * sum over the batch of (d pre-activation / d weights)^T signal."""
        _required_op(self.layer).write_local_update(self.layer, trace.layer_rows, signal, scale)

    def add_orthogonality_gradient(self, weight: float, phase: int = 0, every: int = 1) -> None:
        _required_op(self.layer).orthogonality_gradient(self.layer, weight, phase, every)

    def orthogonality_error(self) -> float | None:
        return _required_op(self.layer).orthogonality_error(self.layer)


def check_invertible(net: nn.Module, rule: str) -> None:
    """A one-line UserError unless every layer is an InvertibleBlock, square above the first, and
    only the output layer keeps auxiliary units."""
    layers = getattr(net, "layers", None) or []
    need = f"rule {rule} needs invertible layers (--arch invertible or invertible-conv)"
    for l, block in enumerate(layers):
        if not isinstance(block, InvertibleBlock):
            raise UserError(f"{need}; block {l} is a {type(block).__name__}, not an InvertibleBlock")
        if l > 0 and not block.square():
            raise UserError(f"{need}; block {l} is not square, so it cannot be inverted")
        if l < len(layers) - 1 and not block.passes_on_every_unit():
            raise UserError(f"{need}; only the output layer may keep auxiliary units, block {l} does too")


# Their forward applies their children in turn (flatten and space-to-depth are reshapes).
register_layer(InvertibleBlock, "container")
register_layer(KeepFirst, "local")
register_layer(SpaceToDepth, "local")
