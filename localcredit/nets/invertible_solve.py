"""Solving X M^T = D for the rows X without ever forming M^{-1}: the LU :class:`Factorisation` of a layer's
square matrix, kept a few steps and refined or error-estimated when stale (target propagation, see ``invertible``)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


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
                     expected_error: float = 0.0) -> Factorisation:
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
