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
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar, Iterator, Literal

import torch
import torch.nn.functional as F

from .. import invertible  # noqa: F401  (registers --arch invertible whenever rules load)
from ..errors import UserError
from ..invertible import is_invertible
from ..nets import BlockNet
from .base import Rule, option, register

#: Adam learning rate when --lr is not given: the orthogonality regulariser needs slow steps
#: (the 2020 paper uses 1e-4; see results/gaitprop/README.md for what was measured here).
DEFAULT_ADAM_LR = 1e-4


@dataclass
class TargetPropConfig:
    ortho: float = option(0.1, "weight lambda of the orthogonality regulariser lambda*||W W^T - I||_F^2 "
                               "on every inverted layer (0: off)")
    ortho_every: int = option(4, "apply the regulariser every k-th step only, with weight k*lambda "
                                 "(its gradient costs two N^3 products per layer)")
    dtype: Literal["float32", "float64"] = option("float32", "precision of the target computation "
                                                             "(the weights keep their own dtype)")

    def validate(self) -> None:
        if not self.ortho >= 0:
            raise UserError(f"option ortho must be >= 0, got {self.ortho}")
        if self.ortho_every < 1:
            raise UserError(f"option ortho_every must be >= 1, got {self.ortho_every}")


@dataclass
class IncrementalConfig(TargetPropConfig):
    gamma: Literal["adaptive", "fixed"] = option(
        "adaptive", "adaptive: gamma_l = gamma0*sqrt(N)/||t_l - y_l|| per sample and layer; fixed: gamma_l = gamma0")
    gamma0: float = option(1e-6, "size of the incremental nudge (see gamma)")

    def validate(self) -> None:
        super().validate()
        if not self.gamma0 > 0:
            raise UserError(f"option gamma0 must be positive, got {self.gamma0}")


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


class InvertibleTargetRule(Rule):
    """Shared pass of gaitprop, tp and itp; subclasses define how a layer's error is nudged."""

    Config: ClassVar[type] = TargetPropConfig
    default_arch: ClassVar[str] = "invertible"
    networks: ClassVar[tuple[str, ...]] = ("invertible",)  # it inverts its layers


    @classmethod
    def default_lr(cls, optimizer: str) -> float:
        return DEFAULT_ADAM_LR if optimizer == "adam" else super().default_lr(optimizer)

    def __init__(self, net: BlockNet, config: Any = None, optim: Any = None):
        if not is_invertible(net):
            raise UserError(f"rule {self.name} needs a network built with --arch invertible")
        super().__init__(net, config, optim)
        self.steps = 0
        self._regularise = True

    # ----- what differs between gaitprop, itp and tp ------------------------------------------
    def nudge(self, error: torch.Tensor, slope: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(Delta u, gamma): the change of layer l's output aimed at, and the per-sample gamma used."""
        raise NotImplementedError

    def gamma(self, error: torch.Tensor) -> torch.Tensor:
        """Per-sample gamma of shape (B, 1) for the incremental rules."""
        if self.config.gamma == "fixed":
            return torch.full_like(error[:, :1], self.config.gamma0)
        norm = error.norm(dim=1, keepdim=True)
        adaptive = self.config.gamma0 * math.sqrt(error.shape[1]) / norm
        # A sample without error has nothing to carry down: any gamma will do, 1 keeps Gamma finite.
        return torch.where(norm > 0, adaptive, torch.ones_like(norm))

    # ----- the shared pass ----------------------------------------------------------------------
    def assign_credit(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        dtype = getattr(torch, self.config.dtype)
        layers = self.net.layers
        weights = [(block.layer.weight.detach().to(dtype), block.layer.bias.detach().to(dtype)) for block in layers]

        inputs, pre, outputs = [], [], []
        h = layers[0].prepare(x).to(dtype)
        for block, (weight, bias) in zip(layers, weights):
            inputs.append(h)
            pre.append(F.linear(h, weight, bias))
            outputs.append(block.activation(pre[-1]))
            h = outputs[-1]
        logits = layers[-1].pool(outputs[-1]).detach().requires_grad_()
        loss = self.task_loss(logits, y)
        (loss_grad,) = torch.autograd.grad(loss, logits)

        # t_L = y_L - 1/2 dl/dy_L with the per-sample loss l (the mean loss's gradient times B);
        # the auxiliary units past the logits keep their own value: zero error.
        error = torch.zeros_like(outputs[-1])
        error[:, :logits.shape[1]] = -0.5 * loss_grad * len(x)
        inverse_gamma = torch.ones_like(error[:, :1])  # 1 / Gamma_l, per sample
        tiny = torch.finfo(dtype).tiny
        for i in range(len(layers) - 1, -1, -1):
            activation, a = layers[i].activation, pre[i]
            slope = activation.derivative(a)
            signal = slope * error * inverse_gamma
            self._write_local_update(layers[i], signal, inputs[i])
            if i == 0:
                break  # the first layer is never inverted
            delta_u, gamma = self.nudge(error, slope)
            error = self._solve(weights[i][0], self._pre_activation_change(activation, a, outputs[i], delta_u, slope))
            # Fixed gamma can underflow Gamma in deep float32 nets: clamp so the signal fades instead of NaN.
            inverse_gamma = inverse_gamma / gamma.clamp_min(tiny)
        if self._regularise and self.config.ortho > 0 and self.steps % self.config.ortho_every == 0:
            self._add_orthogonality_gradient(self.config.ortho * self.config.ortho_every)
        return {"loss": loss.item()}

    @staticmethod
    def _pre_activation_change(activation, a: torch.Tensor, y: torch.Tensor, delta_u: torch.Tensor,
                               slope: torch.Tensor) -> torch.Tensor:
        """f^{-1}(y + Delta u) - a, exact where a kink is crossed and cancellation-free where not."""
        target = y + delta_u
        crossed = (target >= 0) != (a >= 0)
        smooth = delta_u / slope
        if not crossed.any():
            return smooth
        return torch.where(crossed, activation.inverse(target) - a, smooth)

    @staticmethod
    def _solve(weight: torch.Tensor, delta_a: torch.Tensor) -> torch.Tensor:
        """Rows e with W e^T = Delta a^T for the whole batch, from one LU factorisation of W."""
        with single_threaded_on_cpu(weight):
            lu, pivots = torch.linalg.lu_factor(weight)
        # X W^T = Delta a  <=>  W X^T = Delta a^T
        return torch.linalg.lu_solve(lu, pivots, delta_a, left=False, adjoint=True)

    @staticmethod
    def _write_local_update(block, signal: torch.Tensor, inputs: torch.Tensor) -> None:
        """Gradient of the local loss mean_s ||t(s) - y(s)||^2 / Gamma(s) w.r.t. this block's W and b."""
        scale = -2.0 / len(signal)
        block.layer.weight.grad = (scale * signal.t() @ inputs).to(block.layer.weight.dtype)
        block.layer.bias.grad = (scale * signal.sum(0)).to(block.layer.bias.dtype)

    def inverted_layers(self) -> list[torch.nn.Linear]:
        return [block.layer for block in self.net.layers[1:]]

    def _add_orthogonality_gradient(self, weight: float) -> None:
        # d/dW ||W W^T - I||_F^2 = 4 (W W^T - I) W = 4 (W W^T W - W)
        for layer in self.inverted_layers():
            w = layer.weight.detach()
            layer.weight.grad.add_(4 * weight * (w @ w.t() @ w - w))

    # ----- bookkeeping ----------------------------------------------------------------------
    def step(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        stats = super().step(x, y)
        self.steps += 1
        return stats

    @contextmanager
    def without_regulariser(self) -> Iterator[None]:
        self._regularise = False
        try:
            yield
        finally:
            self._regularise = True

    def update_directions(self, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
        """The credit-assignment part only: the orthogonality regulariser is not BP's business."""
        with self.without_regulariser():
            return super().update_directions(x, y)

    @torch.no_grad()
    def orthogonality_errors(self) -> list[float]:
        """||W W^T - I||_F / sqrt(N) per inverted layer (0 for an orthogonal W)."""
        errors = []
        for layer in self.inverted_layers():
            w = layer.weight.double()
            gram = w @ w.t() - torch.eye(len(w), dtype=w.dtype, device=w.device)
            errors.append(gram.norm().item() / math.sqrt(len(w)))
        return errors

    def statistics(self) -> dict[str, Any]:
        return {"orthogonality_error": [round(e, 6) for e in self.orthogonality_errors()], "steps": self.steps}

    def extra_state(self) -> dict[str, Any]:
        return {"steps": self.steps}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.steps = int(state.get("steps", 0))


@register("gaitprop")
class GaitProp(InvertibleTargetRule):
    """GAIT-prop (Ahmad et al. 2020; Dalm et al. 2023): gradient-adjusted incremental targets through inverted layers."""

    Config = IncrementalConfig

    def nudge(self, error, slope):
        gamma = self.gamma(error)
        return gamma * slope.square() * error, gamma


@register("itp")
class IncrementalTargetProp(InvertibleTargetRule):
    """Incremental target propagation (baseline in Ahmad et al. 2020): GAIT-prop without the f'^2 adjustment."""

    Config = IncrementalConfig

    def nudge(self, error, slope):
        gamma = self.gamma(error)
        return gamma * error, gamma


@register("tp")
class TargetProp(InvertibleTargetRule):
    """Target propagation with exact inverses (baseline in Ahmad et al. 2020): t_{l-1} = g_l^{-1}(t_l)."""

    Config = TargetPropConfig

    def nudge(self, error, slope):
        return error, torch.ones_like(error[:, :1])
