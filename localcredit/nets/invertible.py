"""Invertible networks for target propagation (GAIT-prop, TP, ITP) and the invertible-layer protocol.

Ahmad, van Gerven, Ambrogioni 2020 (GAIT-prop, NeurIPS) and Dalm, Ahmad, Ambrogioni, van Gerven 2023
("Scaling up learning with GAIT-prop", TMLR): target propagation carries a target for a layer's
output down to its input, g_l^{-1}(z) = W_l^{-1} (f^{-1}(z) - b_l), so every layer above the first
must be invertible: a square linear map and an invertible activation.

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
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .architectures import NetSpec, register_architecture
from ..errors import UserError
from .layers import register_layer
from .blocknet import BlockNet

SLOPE = 0.1
#: Widest default layer: square N x N layers cost N^3 to factorise.
MAX_DEFAULT_WIDTH = 1024
MIN_DEFAULT_WIDTH = 32
DEFAULT_DEPTH = 3
#: --arch invertible-conv: conv layers of the default stack (see default_patches)
DEFAULT_CONV_LAYERS = 3


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


# ----- solving without an inverse ------------------------------------------------------------------
@contextmanager
def single_threaded_on_cpu(tensor: torch.Tensor) -> Iterator[None]:
    """Run LAPACK single-threaded: on the shared 2-core machine, its 2-thread LU of a 784 x 784
    matrix was measured 2-10x slower than the 1-thread one (threads waiting on busy cores)."""
    threads = torch.get_num_threads()
    if tensor.device.type != "cpu" or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


#: Solve for the unit basis of the right-hand sides' support instead of for the rows themselves when
#: the support is at most this share of the units (the output layer's error lives on its logits only).
SPARSE_SUPPORT = 0.25
#: With stale factors, refine when the right-hand sides are at most this share of n; else estimate the
#: stale solve's error from the residual of at most SAMPLED_ROWS of its rows (see Factorisation).
REFINE_ROWS = 1 / 8
SAMPLED_ROWS = 16


class Factorisation:
    """LU factors of a layer's square matrix M, taken at step ``step``, for solving X M^T = D.

    Every row of D is one sample's (and position's) change of the pre-activation; the rows of X are
    the input changes. Target propagation needs these solves every step, and an LU costs ~2/3 n^3
    flops against 2 n^2 per row for the solve. M moves little per step (Adam moves each weight by
    about lr), so factors a few steps old are kept, and every solve with them says how far off it
    may be (the caller refactorises when that is too far):

    * few rows (at most n/8: the output layer's unit vectors): one step of iterative refinement
      against the current M, X <- X + (D - X M^T) M_old^{-T}. Its error is about the square of the
      stale one, which the correction's relative size measures; it costs little next to an LU.
    * many rows (a batch): a refinement costs a residual product and a second solve, about half an
      LU at B = 128, n = 784, every step; fresher factors are cheaper. The stale solve is kept as it
      is, and its error is estimated from the residual of a few evenly spaced rows.
    """

    def __init__(self, matrix: torch.Tensor, step: int = 0):
        # Factorising M^T makes X M^T = D a right-hand solve on D's rows: the fastest layout measured here.
        with single_threaded_on_cpu(matrix):
            self.lu, self.pivots = torch.linalg.lu_factor(matrix.detach().mT)
        self.step = step
        #: what the user expects of the next solve with these factors (set by the user: its error estimate)
        self.expected_error = 0.0

    @classmethod
    def from_factors(cls, lu: torch.Tensor, pivots: torch.Tensor, step: int,
                     expected_error: float = 0.0) -> "Factorisation":
        """Factors saved earlier (a checkpoint): the same solves as before the interruption."""
        factorisation = cls.__new__(cls)
        factorisation.lu, factorisation.pivots, factorisation.step = lu, pivots, step
        factorisation.expected_error = expected_error
        return factorisation

    def _solve_stale(self, rhs: torch.Tensor) -> torch.Tensor:
        return torch.linalg.lu_solve(self.lu, self.pivots, rhs, left=False)

    def _solve_rows(self, rhs: torch.Tensor, matrix: torch.Tensor | None) -> tuple[torch.Tensor, float]:
        x = self._solve_stale(rhs)
        if matrix is None:
            return x, 0.0
        if len(rhs) <= REFINE_ROWS * rhs.shape[1]:
            correction = self._solve_stale(rhs - x @ matrix.mT)
            x = x + correction
            return x, _relative(correction, x) ** 2  # the refined error is about the stale one squared
        sample = slice(None, None, max(1, len(rhs) // SAMPLED_ROWS))
        return x, _relative(rhs[sample] - x[sample] @ matrix.mT, rhs[sample])

    def solve(self, rhs: torch.Tensor, matrix: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
        """(X, error): rows X with X M^T = rhs. With ``matrix``, the current M (it moved since the
        factorisation), ``error`` estimates X's relative error (see the class); 0 without.

        When the rows' nonzero columns S are few (the output layer: only the logits carry error), it
        solves for the |S| unit vectors e_s instead and combines: X = rhs[:, S] Z with Z M^T = E_S.
        """
        support = rhs.abs().amax(dim=0).nonzero().flatten()
        if len(support) == 0:
            return torch.zeros_like(rhs), 0.0
        if len(support) > SPARSE_SUPPORT * rhs.shape[1]:
            return self._solve_rows(rhs, matrix)
        basis = torch.zeros(len(support), rhs.shape[1], dtype=rhs.dtype, device=rhs.device)
        basis[torch.arange(len(support), device=rhs.device), support] = 1
        z, error = self._solve_rows(basis, matrix)
        return rhs[:, support] @ z, error


def _relative(part: torch.Tensor, whole: torch.Tensor) -> float:
    return (part.norm() / whole.norm().clamp_min(torch.finfo(whole.dtype).tiny)).item()


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

    def write_local_update(self, module: nn.Module, kept: torch.Tensor, signal: torch.Tensor, scale: float) -> None:
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
        return module.weight.view(module.weight.shape[0], -1)

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
        if module.weight.grad is None:
            module.weight.grad = torch.zeros_like(module.weight)
        return module.weight.grad.view(module.weight.shape[0], -1)

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
register_invertible(SpaceToDepth, RearrangementOp(lambda module, y, shape: module.inverse(y)))
register_invertible(nn.Flatten, RearrangementOp(lambda module, y, shape: y.reshape(shape)))


# ----- the block -----------------------------------------------------------------------------------
class Trace(NamedTuple):
    """One block's forward as target propagation keeps it."""

    shapes: list[torch.Size]  # the input of every leaf (rearrangements, then the layer)
    layer_rows: torch.Tensor  # the weight layer's input as the rows its matrix multiplies
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
# Their forward applies their children in turn (flatten and space-to-depth are reshapes).
register_layer(InvertibleBlock, "container")
register_layer(KeepFirst, "local")
register_layer(SpaceToDepth, "local")
