"""Floating-point operations of a training step of any rule (and of a network's forward pass), counted
op by op from the tensor operations that actually run.

One multiply-add is two FLOPs. :class:`FlopCounter` is a ``TorchDispatchMode``: it sees every aten
operation a step runs -- the forward, the autograd engine's backward, a rule's own ``torch.autograd.Function``
(whose forward and backward run aten operations like any other code), auxiliary heads, feedback matmuls,
solves, the optimisers -- whoever issues it, so a new rule is counted without any code here knowing it.
It prices each operation with torch's own formulas (``torch.utils.flop_counter.flop_registry``, the
table behind ``FlopCounterMode``; the project's block pipeline uses ``FlopCounterMode`` itself) and,
for the operations that table has no formula for but that are arithmetic of the same kind, with
:data:`FORMULAS` here. ``FlopCounterMode`` itself is not used for a step: its module tracker hooks
every module's outputs and breaks ``torch.autograd.grad`` on a leaf (GAIT-prop's output error).

**What counts**, at 2 FLOPs per multiply-add:

* torch's table: ``mm``, ``addmm``, ``bmm``, ``baddbmm`` (so ``F.linear``, ``@``, ``einsum`` and
  ``matmul``, which decompose into them), convolutions and ``convolution_backward`` (input and weight
  gradients, each priced as the forward; transposed convolutions too), scaled-dot-product attention;
* :data:`FORMULAS`: ``mv``, ``addmv``, ``dot``, ``vdot``, ``addr``, ``_addmm_activation``; LU
  factorisation (``linalg_lu_factor_ex``, ``linalg_lu``: 2/3 n^3 for a square n x n matrix),
  ``linalg_lu_solve`` (2 n^2 per right-hand side), triangular solves (n^2 per right-hand side),
  ``linalg_solve`` (LU + solve), ``linalg_inv`` (2 n^3), Cholesky (n^3/3) and its solve.

**What does not count** (:attr:`FlopCount.uncounted` lists these operations and how often they ran):
elementwise operations and reductions (activations, batch norm, pooling, softmax and the losses, the
arithmetic of targets and nudges, attention weights computed elementwise), the optimisers' updates
(``_fused_adam_``, ``_foreach_*``: about a dozen FLOPs per parameter, a few per cent of a step here),
copies and views; and heavy operations without a formula (:data:`NO_FORMULA`: SVD, eigen-decompositions,
QR, least squares, ``cdist``, ``bilinear``), which a rule here does not use -- ``tests/test_flops.py``
fails when one starts to. Those are memory-bound or cheap next to the matmuls, which is why FLOP
counts conventionally leave them out; their share of a step's *time* shows up as overhead (time ratio
/ FLOP ratio). :attr:`FlopCount.calls` counts every aten operation, a measure of per-op overhead, and
:attr:`FlopCount.uncounted_elements` the elements written by the uncounted ones that return tensors.

The first layer's input gradient is never computed (the data needs none) and so not counted: BP on an
MLP costs 3x its forward matmuls minus that one product.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils.flop_counter import flop_registry

aten = torch.ops.aten


def _shape(value: Any) -> Any:
    return value.shape if isinstance(value, torch.Tensor) else value


def _batch(shape: Sequence[int]) -> int:
    return math.prod(shape[:-2])


def _lu_flops(m: int, n: int) -> int:
    """LU with partial pivoting of an m x n matrix (LAPACK getrf): 2/3 n^3 when square."""
    k = min(m, n)
    return 2 * m * n * k - (m + n) * k * k + (2 * k ** 3) // 3


def _mv(mat, vec, *args, out_shape=None, **kwargs) -> int:
    return 2 * mat[0] * mat[1]


def _addmv(bias, mat, vec, *args, out_shape=None, **kwargs) -> int:
    return 2 * mat[0] * mat[1]


def _dot(a, b, *args, out_shape=None, **kwargs) -> int:
    return 2 * a[0]


def _addr(bias, u, v, *args, out_shape=None, **kwargs) -> int:
    return 2 * u[0] * v[0]


def _addmm_activation(bias, a, b, *args, out_shape=None, **kwargs) -> int:
    return 2 * a[0] * a[1] * b[1]


def _lu_factor(a, *args, out_shape=None, **kwargs) -> int:
    return _batch(a) * _lu_flops(a[-2], a[-1])


def _lu_solve(lu, pivots, rhs, *args, out_shape=None, **kwargs) -> int:
    # Two triangular solves, n^2 FLOPs per right-hand side each: 2 n * (the solution's elements).
    return 2 * lu[-1] * math.prod(out_shape)


def _solve_triangular(a, b, *args, out_shape=None, **kwargs) -> int:
    return a[-1] * math.prod(out_shape)


def _triangular_solve(b, a, *args, out_shape=None, **kwargs) -> int:  # old API: (rhs, matrix) -> (solution, copy)
    return a[-1] * math.prod(out_shape[0])


def _linalg_solve(a, b, *args, out_shape=None, **kwargs) -> int:  # -> (solution, LU, pivots, info)
    return _batch(a) * _lu_flops(a[-1], a[-1]) + 2 * a[-1] * math.prod(out_shape[0])


def _inverse(a, *args, out_shape=None, **kwargs) -> int:
    return _batch(a) * 2 * a[-1] ** 3


def _cholesky(a, *args, out_shape=None, **kwargs) -> int:
    return _batch(a) * a[-1] ** 3 // 3


def _cholesky_solve(rhs, factor, *args, out_shape=None, **kwargs) -> int:
    return 2 * factor[-1] * math.prod(out_shape)


#: FLOP formulas for operations torch's table lacks, by aten overload packet; each takes the
#: operation's arguments as shapes and ``out_shape`` (torch's own formulas' convention).
FORMULAS: dict[Any, Callable[..., int]] = {
    aten.mv: _mv, aten.addmv: _addmv, aten.dot: _dot, aten.vdot: _dot, aten.addr: _addr,
    aten._addmm_activation: _addmm_activation,
    aten.linalg_lu_factor_ex: _lu_factor, aten.linalg_lu: _lu_factor, aten.linalg_lu_solve: _lu_solve,
    aten.linalg_solve_triangular: _solve_triangular, aten.triangular_solve: _triangular_solve,
    aten._linalg_solve_ex: _linalg_solve, aten.linalg_inv_ex: _inverse,
    aten.linalg_cholesky_ex: _cholesky, aten.cholesky_solve: _cholesky_solve,
}

#: Heavy operations no formula prices: a step that runs one is under-counted (tests/test_flops.py
#: checks that no registered rule does).
NO_FORMULA = frozenset(str(op) for op in (
    aten._linalg_svd, aten._linalg_eigh, aten.linalg_eig, aten.linalg_qr, aten.geqrf, aten.linalg_lstsq,
    aten._linalg_det, aten._linalg_slogdet, aten.linalg_matrix_exp, aten.linalg_householder_product,
    aten._cdist_forward, aten._cdist_backward, aten._trilinear,
))


def _priced(formula: Callable[..., int]) -> Callable[..., int]:
    def price(*args, out_val=None, **kwargs) -> int:
        args, kwargs, out_shape = tree_map(_shape, (args, kwargs, out_val))
        return formula(*args, out_shape=out_shape, **kwargs)
    return price


#: Every priced operation: torch's own formulas first, ours for what it lacks (torch wins if it adds one).
REGISTRY: dict[Any, Callable[..., int]] = {**{op: _priced(f) for op, f in FORMULAS.items()}, **flop_registry}


@dataclass
class FlopCount:
    """What a stretch of work ran: FLOPs per priced operation, and what was not priced."""

    #: FLOPs by aten operation ("aten.mm": ...)
    by_op: dict[str, int] = field(default_factory=dict)
    #: operations without a FLOP formula (elementwise, reductions, views, optimisers): calls by name
    uncounted: dict[str, int] = field(default_factory=dict)
    #: elements of the tensors the uncounted, non-view operations returned (in-place optimiser
    #: kernels that return nothing add none): a size of the memory-bound work, not FLOPs
    uncounted_elements: int = 0
    #: every aten operation dispatched, priced or not
    calls: int = 0

    @property
    def total(self) -> int:
        return sum(self.by_op.values())

    def add(self, other: FlopCount) -> None:
        for mine, theirs in ((self.by_op, other.by_op), (self.uncounted, other.uncounted)):
            for key, value in theirs.items():
                mine[key] = mine.get(key, 0) + value
        self.uncounted_elements += other.uncounted_elements
        self.calls += other.calls


class FlopCounter(TorchDispatchMode):
    """Counts the FLOPs of the aten operations run while active (see the module docstring).

    ``with FlopCounter() as counter: ...`` then ``counter.count`` (a :class:`FlopCount`).
    """

    def __init__(self, registry: dict[Any, Callable[..., int]] | None = None):
        super().__init__()
        self.registry = REGISTRY if registry is None else registry
        self._flops: Counter[str] = Counter()
        self._uncounted: Counter[str] = Counter()
        self._elements = 0
        self._calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        packet = func._overloadpacket
        self._calls += 1
        formula = self.registry.get(packet)
        if formula is not None:
            self._flops[str(packet)] += int(formula(*args, **kwargs, out_val=out))
        else:
            self._uncounted[str(packet)] += 1
            if not func.is_view:
                self._elements += sum(t.numel() for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor))
        return out

    @property
    def count(self) -> FlopCount:
        return FlopCount(dict(self._flops), dict(self._uncounted), self._elements, self._calls)


def count_flops(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> FlopCount:
    """The FLOPs of ``fn(*args, **kwargs)`` (which runs for real)."""
    with FlopCounter() as counter:
        fn(*args, **kwargs)
    return counter.count


@dataclass
class StepFlops:
    """FLOPs of a run of training steps: each step's total, and the summed count of all of them."""

    per_step: list[int]
    count: FlopCount

    @property
    def median(self) -> float:
        """A typical step (what a median step time goes with)."""
        return float(statistics.median(self.per_step))

    @property
    def mean(self) -> float:
        """Amortised over the steps: periodic work (GAIT-prop's refactorisations) included."""
        return statistics.fmean(self.per_step)


def step_flops(rule: Any, batches: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> StepFlops:
    """Count each ``rule.step(x, y)`` over ``batches``: real training steps, which move the rule on.

    Steps are not all alike for some rules (GAIT-prop factorises every few steps): count enough of
    them to see the period, and read :attr:`StepFlops.median` or :attr:`StepFlops.mean`.
    """
    total = FlopCount()
    per_step = []
    for x, y in batches:
        with FlopCounter() as counter:
            rule.step(x, y)
        per_step.append(counter.count.total)
        total.add(counter.count)
    return StepFlops(per_step, total)


def forward_flops(net: nn.Module, input_shape: Sequence[int]) -> int:
    """FLOPs of one sample's forward pass through ``net`` (evaluation mode, no gradients).

    Counted by :class:`FlopCounter`: conv and linear layers, and any other matmul the forward runs.
    """
    was_training = net.training
    try:
        net.eval()
        with torch.no_grad():
            return count_flops(net, torch.zeros(1, *input_shape)).total
    finally:
        net.train(was_training)


__all__ = ["FORMULAS", "NO_FORMULA", "REGISTRY", "FlopCount", "FlopCounter", "StepFlops", "count_flops",
           "forward_flops", "step_flops"]
