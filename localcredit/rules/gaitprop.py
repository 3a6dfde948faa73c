"""Target propagation through invertible layers: GAIT-prop and its TP and ITP baselines.

* GAIT-prop, Ahmad, van Gerven, Ambrogioni 2020, "GAIT-prop: A biologically plausible learning
  rule derived from backpropagation of error", NeurIPS; scaled by Dalm, Ahmad, Ambrogioni,
  van Gerven 2023, "Scaling up learning with GAIT-prop" (TMLR): adaptive gamma, orthogonality
  regulariser, auxiliary units.
* TP (exact inverse targets) and ITP (incremental targets without the f'^2 adjustment): the
  baselines of the same papers.

All three share one pass (see docs/gaitprop.md for the derivation). Forward, keeping a_l and y_l;
output target t_L = y_L - 1/2 dL/dy_L (per-sample loss gradient; auxiliary units: own value);
then, going down, the *difference* e_l = t_l - y_l is carried instead of the target itself,
because t - y cancels catastrophically in float32 when the nudge is small:

    Delta u = nudge(e_l)                          (gaitprop: gamma f'(a_l)^2 e_l; itp: gamma e_l; tp: e_l)
    Delta a = f^{-1}(y_l + Delta u) - a_l         (= Delta u / f'(a_l) where no kink is crossed)
    e_{l-1} = W_l^{-1} Delta a                    (the bias cancels; LU-solved, never an explicit inverse)

Layer l's update is the gradient of its local loss sum_s ||t_l(s) - y_l(s)||^2 / Gamma_l(s) with
respect to its own weights only, Gamma_l(s) = prod_{k>l} gamma_k(s): dW_l = -2 (f'(a_l) e_l / Gamma_l) y_{l-1}^T,
averaged over the batch so that for orthogonal W it is BP's gradient of the mean loss, scale included.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Protocol, cast

import torch

from ..errors import UserError
from ..nets.blocknet import BlockNet
from ..nets.invertible import Factorisation, InvertibleBlock, Trace, check_invertible
from .base import Rule, StepFigures, option, register


class _InvertibleActivation(Protocol):
    """What an InvertibleBlock's activation has (its constructor checks both)."""

    def inverse(self, y: torch.Tensor) -> torch.Tensor: ...

    def derivative(self, a: torch.Tensor) -> torch.Tensor: ...


#: Adam learning rate when --lr is not given: the orthogonality regulariser needs slow steps
#: (the 2020 paper uses 1e-4; see results/gaitprop/README.md for what was measured here).
DEFAULT_ADAM_LR = 1e-4
#: ... on invertible conv nets, whose only unconstrained layer (the first, never inverted) is a small
#: patch conv: at 1e-4 they learned too slowly here (gaitprop 0.77-0.78 after 157 steps, 0.81 at 3e-4).
DEFAULT_ADAM_LR_BY_ARCH = {"invertible-conv": 3e-4}


@dataclass
class TargetPropConfig:
    ortho: float = option(0.1, "weight lambda of the orthogonality regulariser lambda*||W W^T - I||_F^2 "
                               "on every inverted layer (0: off)")
    ortho_every: int = option(16, "each step regularises every k-th row of each inverted W (a different share "
                                 "each step), with weight k*lambda: every row gets its exact gradient once per "
                                 "k steps, at 1/k of the cost (two n^3 products per layer)")
    factorise_every: int = option(8, "LU-factorise each inverted layer at least every k-th step; in between, solve "
                                     "with the older factors while their solves stay within solve_tolerance; "
                                     "1: every step")
    solve_tolerance: float = option(2e-2, "refactorise a layer at once when a solve with its older factors is "
                                          "estimated to be off by more than this (relative error)")
    dtype: Literal["float32", "float64"] = option("float32", "precision of the target computation "
                                                             "(the weights keep their own dtype)")

    def validate(self) -> None:
        if not self.ortho >= 0:
            raise UserError(f"option ortho must be >= 0, got {self.ortho}")
        if self.ortho_every < 1:
            raise UserError(f"option ortho_every must be >= 1, got {self.ortho_every}")
        if self.factorise_every < 1:
            raise UserError(f"option factorise_every must be >= 1, got {self.factorise_every}")
        if not self.solve_tolerance > 0:
            raise UserError(f"option solve_tolerance must be positive, got {self.solve_tolerance}")


@dataclass
class IncrementalConfig(TargetPropConfig):
    gamma: Literal["adaptive", "fixed"] = option(
        "adaptive", "adaptive: gamma_l = gamma0*sqrt(N)/||t_l - y_l|| per sample and layer; fixed: gamma_l = gamma0")
    gamma0: float = option(1e-6, "size of the incremental nudge (see gamma)")

    def validate(self) -> None:
        super().validate()
        if not self.gamma0 > 0:
            raise UserError(f"option gamma0 must be positive, got {self.gamma0}")


def per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, ...), broadcasting against ``like`` (a dense or a conv layer's units)."""
    return values.view(-1, *([1] * (like.dim() - 1)))


class InvertibleTargetRule(Rule):
    """Shared pass of gaitprop, tp and itp; subclasses define how a layer's error is nudged."""

    Config: ClassVar[type] = TargetPropConfig
    default_arch: ClassVar[str] = "invertible"
    networks: ClassVar[tuple[str, ...]] = ("invertible", "invertible-conv")  # it inverts its layers
    syncs_per_step: ClassVar[str | None] = (
        "decisions on computed values: whether stale LU factors are still good enough (invertible.py "
        "_relative), which columns carry error (Factorisation.solve's nonzero), whether any unit crosses "
        "the kink (_pre_activation_change)")

    @classmethod
    def default_lr(cls, optimizer: str, arch: str | None = None) -> float:
        if optimizer != "adam":
            return super().default_lr(optimizer, arch)
        return DEFAULT_ADAM_LR_BY_ARCH.get(arch or cls.default_arch, DEFAULT_ADAM_LR)

    def __init__(self, net: BlockNet, config: Any = None, optim: Any = None):
        check_invertible(net, self.name)
        super().__init__(net, config, optim)
        self.steps = 0
        self._measuring = False
        #: per inverted block (index into net.layers): the factorisation its solves use
        self._factorisations: dict[int, Factorisation] = {}

    # ----- what differs between gaitprop, itp and tp ------------------------------------------
    def nudge(self, error: torch.Tensor, slope: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(Delta u, gamma): the change of layer l's output aimed at, and the per-sample gamma (B,) used."""
        raise NotImplementedError

    def gamma(self, error: torch.Tensor) -> torch.Tensor:
        """Per-sample gamma, shape (B,), for the incremental rules."""
        if self.config.gamma == "fixed":
            return torch.full((len(error),), self.config.gamma0, dtype=error.dtype, device=error.device)
        norm = error.flatten(1).norm(dim=1)
        adaptive = self.config.gamma0 * math.sqrt(error[0].numel()) / norm
        # A sample without error has nothing to carry down: any gamma will do, 1 keeps Gamma finite.
        return torch.where(norm > 0, adaptive, torch.ones_like(norm))

    # ----- the shared pass ----------------------------------------------------------------------
    def assign_credit(self, x: torch.Tensor, y: torch.Tensor) -> StepFigures:
        dtype = getattr(torch, self.config.dtype)
        blocks = cast(list[InvertibleBlock], self.net.layers)  # check_invertible (in __init__) made sure
        traces: list[Trace] = []
        outputs: list[torch.Tensor] = []
        h = x.to(dtype)
        for block in blocks:
            traces.append(block.trace(h, dtype))
            outputs.append(block.activation(traces[-1].pre_activation))
            h = outputs[-1]
        loss, error = self.output_error(blocks[-1], outputs[-1], y)

        inverse_gamma = torch.ones(len(x), dtype=dtype, device=x.device)  # 1 / Gamma_l, per sample
        tiny = torch.finfo(dtype).tiny
        for i in range(len(blocks) - 1, -1, -1):
            block, a = blocks[i], traces[i].pre_activation
            activation = cast(_InvertibleActivation, block.activation)  # nn.Module-typed attribute
            slope = activation.derivative(a)
            signal = slope * error * per_sample(inverse_gamma, error)
            # Local loss mean_s ||t(s) - y(s)||^2 / Gamma(s): its gradient w.r.t. this block's weights.
            block.write_local_update(traces[i], signal, scale=-2.0 / len(x))
            if i == 0:
                break  # the first layer is never inverted
            delta_u, gamma = self.nudge(error, slope)
            delta_a = self._pre_activation_change(activation, a, outputs[i], delta_u, slope)
            error = self._solve(i, block, traces[i], delta_a)
            # Fixed gamma can underflow Gamma in deep float32 nets: clamp so the signal fades instead of NaN.
            inverse_gamma = inverse_gamma / gamma.clamp_min(tiny)
        if not self._measuring and self.config.ortho > 0:
            self._add_orthogonality_gradient()
        return {"loss": loss.detach()}

    def output_error(self, head: InvertibleBlock, output: torch.Tensor,
                     y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, e_L): t_L = y_L - 1/2 dl/dy_L with the per-sample loss l (the mean loss's gradient times B).

        The gradient is taken through the head's unit selection, so the auxiliary units past the
        logits get zero error: their target is their own value.
        """
        output = output.detach().requires_grad_()
        loss = self.task_loss(head.keep(output), y)
        (loss_grad,) = torch.autograd.grad(loss, output)
        return loss.detach(), -0.5 * len(y) * loss_grad

    @staticmethod
    def _pre_activation_change(activation: _InvertibleActivation, a: torch.Tensor, y: torch.Tensor, delta_u: torch.Tensor,
                               slope: torch.Tensor) -> torch.Tensor:
        """f^{-1}(y + Delta u) - a, exact where a kink is crossed and cancellation-free where not."""
        target = y + delta_u
        smooth = delta_u / slope
        if (target * a).min() > 0:  # every unit stays strictly on its side of the kink (the usual case)
            return smooth
        crossed = (target >= 0) != (a >= 0)
        return torch.where(crossed, activation.inverse(target) - a, smooth)

    def _solve(self, i: int, block: InvertibleBlock, trace: Trace, delta_a: torch.Tensor) -> torch.Tensor:
        """e_{l-1} = W_l^{-1} Delta a_l, from factors at most ``factorise_every`` steps old (fresh when measuring)."""
        matrix = block.matrix(delta_a.dtype)
        assert matrix is not None  # only fixed rearrangements have none; a block's layer is a weight layer
        if self._measuring:
            return block.solve(trace, delta_a, Factorisation(matrix))[0]
        factorisation = self._factorisations.get(i)
        if factorisation is None or self._due(factorisation):
            factorisation = self._factorisations[i] = Factorisation(matrix, self.steps)
        if factorisation.step == self.steps:
            return block.solve(trace, delta_a, factorisation)[0]
        error, solve_error = block.solve(trace, delta_a, factorisation, matrix)
        if solve_error > self.config.solve_tolerance:  # the weights moved too far since the factorisation
            factorisation = self._factorisations[i] = Factorisation(matrix, self.steps)
            return block.solve(trace, delta_a, factorisation)[0]
        age = self.steps - factorisation.step
        # The error grows about linearly with the factors' age (measured): when the next solve would
        # exceed the tolerance, refactorise before it rather than solving twice then.
        factorisation.expected_error = solve_error * (age + 1) / age
        return error

    def _due(self, factorisation: Factorisation) -> bool:
        return (self.steps - factorisation.step >= self.config.factorise_every
                or factorisation.expected_error > self.config.solve_tolerance)

    def inverted_blocks(self) -> list[InvertibleBlock]:
        return cast(list[InvertibleBlock], self.net.layers[1:])  # check_invertible (in __init__) made sure

    def _add_orthogonality_gradient(self) -> None:
        # Every k-th row, a different share each step: each row gets k*lambda times its exact gradient
        # once per k steps, and every step costs the same (no periodic spike in the step time).
        every = self.config.ortho_every
        for block in self.inverted_blocks():
            block.add_orthogonality_gradient(self.config.ortho * every, phase=self.steps % every, every=every)

    # ----- bookkeeping ----------------------------------------------------------------------
    def step(self, x: torch.Tensor, y: torch.Tensor) -> StepFigures:
        stats = super().step(x, y)
        self.steps += 1
        return stats

    @contextmanager
    def measuring(self) -> Iterator[None]:
        """Credit assignment alone, changing no state: no regulariser, fresh factorisations (kept nowhere)."""
        self._measuring = True
        try:
            yield
        finally:
            self._measuring = False

    def update_directions(self, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
        """The credit-assignment part only: the orthogonality regulariser is not BP's business."""
        with self.measuring():
            return super().update_directions(x, y)

    @torch.no_grad()
    def orthogonality_errors(self) -> list[float]:
        """||W W^T - I||_F / sqrt(N) per inverted layer (0 for an orthogonal W)."""
        return [e for e in (block.orthogonality_error() for block in self.inverted_blocks()) if e is not None]

    def statistics(self) -> dict[str, Any]:
        return {"orthogonality_error": [round(e, 6) for e in self.orthogonality_errors()], "steps": self.steps}

    def extra_state(self) -> dict[str, Any]:
        # The factorisations travel too, so a resumed run solves with the same factors as an unbroken one.
        return {"steps": self.steps,
                "factorisations": {str(i): {"lu": f.lu, "pivots": f.pivots, "step": f.step,
                                            "expected_error": f.expected_error}
                                   for i, f in self._factorisations.items()}}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.steps = int(state.get("steps", 0))
        self._factorisations = {int(i): Factorisation.from_factors(f["lu"], f["pivots"], int(f["step"]),
                                                                   float(f.get("expected_error", 0.0)))
                                for i, f in state.get("factorisations", {}).items()}


@register("gaitprop")
class GaitProp(InvertibleTargetRule):
    """GAIT-prop (Ahmad et al. 2020; Dalm et al. 2023): gradient-adjusted incremental targets through inverted layers."""

    Config = IncrementalConfig

    def nudge(self, error, slope):
        gamma = self.gamma(error)
        return per_sample(gamma, error) * slope.square() * error, gamma


@register("itp")
class IncrementalTargetProp(InvertibleTargetRule):
    """Incremental target propagation (baseline in Ahmad et al. 2020): GAIT-prop without the f'^2 adjustment."""

    Config = IncrementalConfig

    def nudge(self, error, slope):
        gamma = self.gamma(error)
        return per_sample(gamma, error) * error, gamma


@register("tp")
class TargetProp(InvertibleTargetRule):
    """Target propagation with exact inverses (baseline in Ahmad et al. 2020): t_{l-1} = g_l^{-1}(t_l)."""

    Config = TargetPropConfig

    def nudge(self, error, slope):
        return error, torch.ones(len(error), dtype=error.dtype, device=error.device)
