"""Sign-concordant feedback: usf, frsf, brsf (Liao, Leibo & Poggio 2016).

Liao, Leibo and Poggio, "How important is weight symmetry in backpropagation?", AAAI 2016
(arXiv 1510.05067), replace W_l^T in the backward pass by a matrix V_l that shares W_l's signs but
not its magnitudes, and find that the signs carry almost all of what backprop needs:

* uSF, uniform sign-concordant feedback:  V_l = c_l sign(W_l);
* frSF, fixed random magnitudes:          V_l = c_l M_l o sign(W_l), M_l drawn once;
* brSF, batch-wise random magnitudes:     V_l = c_l M_l o sign(W_l), M_l redrawn every batch;

with o the elementwise product. The errors go down as delta_l = (V_{l+1}^T delta_{l+1}) * f'(a_l); the
weight gradients keep BP's form, dW_l = delta_l h_{l-1}^T. V_l follows W_l's signs as W_l learns: the
signs of the forward weights are transported to the feedback path, their magnitudes are not.
Xiao, Chen, Liao and Poggio, "Biologically-plausible learning algorithms can scale to large datasets",
ICLR 2019 (arXiv 1811.03567), train ResNets and AlexNet on ImageNet with sign-symmetric feedback close
to BP; Moskovitz, Litwin-Kumar and Abbott, "Feedback alignment in deep convolutional networks",
arXiv 1812.06488 (2018), do the same with sign-concordant feedback and normalised weights.

Choices made here:

* the scale c_l (option ``scale``): by default c_l = mean |W_l| of the layer, at every step. That is
  the c that brings c sign(W) closest to W (least squares: c = <W, sign W> / n = sum |W| / n), so uSF
  equals BP exactly when all weights of a layer share one magnitude, and the error reaching each
  layer keeps BP's size (a residual unit's branch keeps its weight against the skip path; nothing
  explodes with depth as with c = 1). It moves one number per layer to the feedback path besides
  the signs. ``scale=C`` fixes c_l = C in every layer instead (C = 1: the paper's plain sign(W)).
  BioTorch (Sanfiz & Akrout 2021) uses c = 1, or sqrt(2 / (fan_in + fan_out)) with its
  scaling-factor option.
* the magnitudes M_l of frSF and brSF: |R| / E|R| with R uniform on (-1, 1) or standard normal
  (option ``init``), so E[M] = 1 and E[V_l] is uSF's V_l: the three rules differ only in how the
  magnitudes are spread. brSF draws its M_l at the start of every step; between two steps its
  update (``update_directions``, ``align``) is measured with the last step's draw.

Implemented like ``fa`` through the per-layer-type registry (``localcredit.nets.layers``): every weight
layer (Linear, Conv of any stride, padding, dilation, groups, with or without bias) sends its error
down through V_l, formed from the current W_l when the backward pass needs it; batch norm,
activations, pooling and residual adds keep their own backward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal, cast

import torch
from torch import nn

from ..errors import UserError
from ..nets.layers import weight_layers
from .base import StepFigures, option, register
from .feedback import SubstitutedFeedback

SCALE_HELP = ("the feedback's scale c: 0 = mean |W| of the layer at each step (the closest c sign(W) to W: usf is BP "
              "where a layer's weights share one magnitude), a positive number = that c in every layer "
              "(1: Liao et al.'s plain sign(W))")


def check_scale(scale: float) -> None:
    if not math.isfinite(scale) or scale < 0:
        raise UserError(f"option scale must be 0 (mean |W| of each layer) or a positive number, got {scale}")


@dataclass
class UniformSignConfig:
    scale: float = option(0.0, SCALE_HELP)

    def validate(self) -> None:
        check_scale(self.scale)


@dataclass
class RandomSignConfig:
    scale: float = option(0.0, SCALE_HELP)
    init: Literal["uniform", "gaussian"] = option(
        "uniform", "the magnitudes are |R| / E|R| (mean 1) with R uniform on (-1, 1) or standard normal")

    def validate(self) -> None:
        check_scale(self.scale)


def draw_magnitudes(out: torch.Tensor, init: str) -> torch.Tensor:
    """Fill ``out`` with |R| / E|R| for R of ``init`` (uniform on (-1, 1): E|R| = 1/2; standard normal:
    E|R| = sqrt(2/pi)), in place, on its device, from torch's seeded generator."""
    if init == "gaussian":
        return out.normal_().abs_().mul_(math.sqrt(math.pi / 2))
    return out.uniform_(0, 2)


class SignConcordantFeedback(SubstitutedFeedback):
    """What the three rules share: the backward pass of every weight layer through c_l M_l o sign(W_l)."""

    Config: ClassVar[type] = UniformSignConfig

    def __init__(self, net, config=None, optim=None):
        super().__init__(net, config, optim)
        self.layer_index = {name: i for i, (name, _) in enumerate(weight_layers(net))}

    def magnitudes(self, i: int, weight: torch.Tensor) -> torch.Tensor | None:
        """M_l of weight layer ``i`` (None: all ones, uSF)."""
        return None

    def feedback(self, name: str, layer: nn.Module | None = None) -> torch.Tensor:
        """V of the weight layer called ``name`` in ``net.named_modules()``, from its weight now (W's shape)."""
        if layer is None:
            layer = self.net.get_submodule(name)
        weight = cast(torch.Tensor, layer.weight).detach()
        sign = weight.sign()
        # A tensor, never read on the host: the step does not wait for the device.
        scale = self.config.scale if self.config.scale > 0 else weight.abs().mean()
        magnitudes = self.magnitudes(self.layer_index[name], weight)
        return sign.mul_(scale) if magnitudes is None else sign.mul_(magnitudes).mul_(scale)


@register("usf")
class UniformSignFeedback(SignConcordantFeedback):
    """Uniform sign-concordant feedback, uSF (Liao et al. 2016): errors flow down through c_l sign(W_l)."""


@register("frsf")
class FixedRandomSignFeedback(SignConcordantFeedback):
    """Fixed random-magnitude sign-concordant feedback, frSF (Liao et al. 2016): c_l |R_l| o sign(W_l), R_l drawn once."""

    Config = RandomSignConfig

    def __init__(self, net, config=None, optim=None):
        super().__init__(net, config, optim)
        for i, (_, layer) in enumerate(weight_layers(net)):
            # A buffer: checkpointed with the run, never trained, never in an optimiser.
            magnitudes = torch.empty(tuple(layer.weight.shape), device=cast(torch.Tensor, layer.weight).device)
            self.register_buffer(f"magnitudes_{i}", draw_magnitudes(magnitudes, self.config.init))

    def magnitudes(self, i: int, weight: torch.Tensor) -> torch.Tensor:
        return getattr(self, f"magnitudes_{i}")


@register("brsf")
class BatchRandomSignFeedback(FixedRandomSignFeedback):
    """Batch-wise random-magnitude sign-concordant feedback, brSF (Liao et al. 2016): as frSF, |R_l| redrawn every batch."""

    def step(self, x: torch.Tensor, y: torch.Tensor) -> StepFigures:
        # Drawn in place at the start of every step, from torch's random stream (checkpointed, and each
        # process's own under --procs, as its dropout masks): a resumed run draws what it would have drawn.
        for i in range(len(self.layer_index)):
            draw_magnitudes(getattr(self, f"magnitudes_{i}"), self.config.init)
        return super().step(x, y)
