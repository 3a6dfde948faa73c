"""InfoPro: each module keeps what it knows of the input and learns what it knows of the label (Wang et al. 2021).

Wang, Ni, Song, Yang and Huang, "Revisiting locally supervised learning: an alternative to end-to-end
training", ICLR 2021 (code: blackfeather-wang/InfoPro-Pytorch). A network cut into K gradient-isolated
modules (``--modules K``) that learn greedily from a classifier loss each throw away information about
the input early, and the later modules cannot get it back. InfoPro asks module m to keep it: its loss is
the paper's surrogate (an upper bound) of the InfoPro loss, minimising -lambda_1 I(h_m, x) - lambda_2 I(h_m, y),

    L_m = lambda_1(m) * BCE( sigmoid(w_m(h_m)), x01 )  +  lambda_2(m) * CE( psi_m(h_m), y )
          \\_________ reconstruction: I(h, x) _______/     \\______ prediction: I(h, y) ____/

with the module's input detached, so no error crosses a module. The shapes and weights are the authors'
code's (``networks/auxiliary_nets.py``, ``networks/resnet.py``, ``comand.sh``):

* **w_m, the decoder**: h_m bilinearly resized to the image's height and width (corners aligned), a 3x3
  convolution to ``decoder_width`` = 12 channels (with bias), batch norm, ReLU, a 3x3 convolution to the
  image's channels (with bias), a sigmoid; the binary cross-entropy (mean over pixels) against x01, the
  image in [0, 1] (their ``_image_restore`` undoes the data's normalisation; our data are standardised
  with statistics the rule does not see, so x01 is each sample's channels min-max scaled to [0, 1],
  the same image for data whose pixels span the range, as MNIST's do). ``reconstruction=mse`` is the
  mean squared error of the decoder's output (no sigmoid) against the standardised input instead.
  On a dense output the decoder is one linear layer to the input's features (our choice: the paper's
  networks are convolutional).
* **psi_m, the auxiliary classifier** (their default ``1c2f``): a 3x3 convolution without bias that
  doubles the channels with stride 2, or keeps them with stride 1 on a map of at most 8x8 (their rule
  on CIFAR's 32, 16 and 8 pixel stages: 16->32 and 32->64 with stride 2, 64->64 with stride 1), batch
  norm, ReLU, a global average pool, a linear layer to ``feature_dim`` = 128, ReLU, a linear layer to
  the class scores. On a dense output, the two linear layers alone (their ``0c2f``).
* **the weights**: module m of the K - 1 before the last has lambda_1(m), lambda_2(m) linear in m from
  (``lambda1``, ``lambda2``) at the first module to (``lambda1_end``, ``lambda2_end``) at module K - 2
  (their ``ixx_1, ixy_1, ixx_2, ixy_2``, ratio m / (K - 2)). The defaults, 5 and 0.5 throughout, are
  their ResNet-110 CIFAR-10 command for K = 2, where only the first pair counts.
* **the last module** learns, as theirs does, from the task's own loss: the head's cross-entropy,
  backpropagated through the head into the last module (the two are one group of
  :meth:`~localcredit.rules.base.Rule.layer_groups`, gradient-isolated from the modules below). So
  InfoPro's K counts the modules as the paper does (K = 2: one InfoPro loss, then the last module with
  the head), and ``--modules 1`` is end-to-end BP, the paper's K = 1. Every other local rule trains its
  head alone, on the detached output of its last module (docs/modules.md says why that costs them).

The paper's best numbers use a supervised contrastive loss (temperature 0.07) for the prediction term;
this rule has the cross-entropy form, the paper's other estimate of I(h, y). The reconstruction target is the
batch's input, which the first block receives: a block pipeline's later stages do not have it, so the
rule is not ``local`` (``--parallel blocks`` refuses it). The head alone makes the predictions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from ..nets.layout import AdaptiveAvgPool2d
from .base import option, register
from .local_loss import LocalLossRule

#: The auxiliary classifier keeps the channels with stride 1 on maps of at most this many pixels a side.
SMALL_MAP = 8


@dataclass
class InfoProConfig:
    lambda1: float = option(5.0, "weight of the reconstruction term (I(h, x)) on the first module")
    lambda2: float = option(0.5, "weight of the prediction term (I(h, y), cross-entropy) on the first module")
    lambda1_end: float = option(5.0, "reconstruction weight on the last module but one (linear in between)")
    lambda2_end: float = option(0.5, "prediction weight on the last module but one (the last module learns "
                                     "through the head, from its cross-entropy)")
    reconstruction: Literal["bce", "mse"] = option(
        "bce", "bce: sigmoid decoder, binary cross-entropy against the image scaled to [0, 1] (the paper); "
               "mse: mean squared error against the standardised input")
    decoder_width: int = option(12, "channels of the decoder's hidden 3x3 convolution (the paper: 12)")
    feature_dim: int = option(128, "width of the auxiliary classifier's hidden linear layer (the paper: 128)")

    def validate(self) -> None:
        for name in ("lambda1", "lambda2", "lambda1_end", "lambda2_end"):
            if getattr(self, name) < 0:
                raise UserError(f"option {name} must be >= 0, got {getattr(self, name)}")
        for first, end in (("lambda1", "lambda2"), ("lambda1_end", "lambda2_end")):
            if getattr(self, first) + getattr(self, end) == 0:
                raise UserError(f"options {first} and {end} are both 0: a module would have no loss")
        for name in ("decoder_width", "feature_dim"):
            if getattr(self, name) < 1:
                raise UserError(f"option {name} must be at least 1, got {getattr(self, name)}")


def module_weights(m: int, modules: int, config: InfoProConfig) -> tuple[float, float]:
    """(lambda_1, lambda_2) of hidden module ``m`` of ``modules``: interpolated up to the last but one; (0, 0) on
    the last, which has no loss of its own (it learns from the head's)."""
    if m == modules - 1:
        return 0.0, 0.0
    ratio = m / (modules - 2) if modules > 2 else 0.0
    return (config.lambda1 * (1 - ratio) + config.lambda1_end * ratio,
            config.lambda2 * (1 - ratio) + config.lambda2_end * ratio)


def reconstruction_target(x: torch.Tensor, kind: str) -> torch.Tensor:
    """What the decoders reconstruct: ``x`` itself (mse), or (bce) each sample's channels min-max scaled to [0, 1]."""
    x = x.detach()
    if kind == "mse":
        return x
    flat = x.flatten(2) if x.dim() > 2 else x.unsqueeze(1)  # (B, channels, values)
    low, high = flat.amin(-1, keepdim=True), flat.amax(-1, keepdim=True)
    return ((flat - low) / (high - low).clamp_min(torch.finfo(x.dtype).eps)).reshape(x.shape)


class Decoder(nn.Module):
    """w: a module's output back to the input (the paper's two 3x3 convolutions on the resized map; linear when dense)."""

    def __init__(self, shape: tuple[int, ...], input_shape: tuple[int, ...], width: int):
        super().__init__()
        self.input_shape = input_shape
        self.convolutional = len(shape) == 3 and len(input_shape) == 3
        if self.convolutional:
            self.net: nn.Module = nn.Sequential(
                nn.Conv2d(shape[0], width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                nn.Conv2d(width, input_shape[0], 3, padding=1))
        else:
            self.net = nn.Sequential(nn.Flatten(), nn.Linear(math.prod(shape), math.prod(input_shape)))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """The reconstruction's logits (bce) or values (mse), shaped as the input."""
        if not self.convolutional:
            return self.net(h).view(len(h), *self.input_shape)
        if h.shape[-2:] != self.input_shape[-2:]:
            h = F.interpolate(h, size=self.input_shape[-2:], mode="bilinear", align_corners=True)
        return self.net(h)


def auxiliary_classifier(shape: tuple[int, ...], num_classes: int, feature_dim: int) -> nn.Sequential:
    """psi: the paper's 1c2f on a conv output (conv3x3-BN-ReLU, global average, MLP); 0c2f (the MLP) on a dense one."""
    layers: list[nn.Module] = []
    if len(shape) == 3:
        channels, height, width = shape
        small = min(height, width) <= SMALL_MAP
        out = channels if small else 2 * channels
        layers += [nn.Conv2d(channels, out, 3, stride=1 if small else 2, padding=1, bias=False),
                   nn.BatchNorm2d(out), nn.ReLU(), AdaptiveAvgPool2d(1), nn.Flatten()]
        features = out
    else:
        layers.append(nn.Flatten())
        features = math.prod(shape)
    layers += [nn.Linear(features, feature_dim), nn.ReLU(), nn.Linear(feature_dim, num_classes)]
    return nn.Sequential(*layers)


@register("infopro")
class InfoPro(LocalLossRule):
    """InfoPro (Wang et al. 2021): each module (--modules K) learns to reconstruct the input and predict the label."""

    Config = InfoProConfig
    # The reconstruction target is the batch's input, which only the first block receives: a block
    # pipeline's later stages would not have it (see the module docstring).
    local = False

    def __init__(self, net, config=None, optim=None):
        super().__init__(net, config, optim)
        modules = len(net.blocks)
        self.loss_weights = [module_weights(m, modules, self.config) for m in range(modules)]
        # Only the terms a module uses: the last module has neither (it learns through the head).
        self.decoders = nn.ModuleDict({str(m): Decoder(shape, net.input_shape, self.config.decoder_width)
                                       for m, shape in enumerate(net.hidden_shapes()) if self.loss_weights[m][0] > 0})
        self.classifiers = nn.ModuleDict({str(m): auxiliary_classifier(shape, net.num_classes, self.config.feature_dim)
                                          for m, shape in enumerate(net.hidden_shapes()) if self.loss_weights[m][1] > 0})
        self._target: torch.Tensor | None = None  # this step's reconstruction target

    def block_step_loss(self, l: int, h_in: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if l == 0 and self.decoders:
            self._target = reconstruction_target(h_in, self.config.reconstruction)  # the first block's input: x
        try:
            return super().block_step_loss(l, h_in, y)
        finally:
            if l == len(self.net.blocks):
                self._target = None  # the step is over: keep nothing from it

    def layer_groups(self) -> list[range]:
        # The last module and the head learn as one, from the head's loss (the paper's last module).
        last = len(self.net.blocks) - 1
        return [*(range(m, m + 1) for m in range(last)), range(max(last, 0), last + 2)]

    def block_loss(self, l: int, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
        if l == len(self.net.blocks) - 1:
            return None  # the last module: its error comes from the head
        reconstruction_weight, prediction_weight = self.loss_weights[l]
        loss = h.new_zeros(())
        if reconstruction_weight:
            loss = loss + reconstruction_weight * self.reconstruction_loss(l, h)
        if prediction_weight:
            loss = loss + prediction_weight * self.class_loss(self.classifiers[str(l)](h), y)
        return loss

    def reconstruction_loss(self, l: int, h: torch.Tensor) -> torch.Tensor:
        if self._target is None:
            raise RuntimeError("infopro reconstructs the batch's input, which block 0 receives: run the blocks "
                               "from the first (assign_credit, local_losses)")
        output = self.decoders[str(l)](h)
        if self.config.reconstruction == "mse":
            return F.mse_loss(output, self._target)
        return F.binary_cross_entropy_with_logits(output, self._target)

    def auxiliary_parameters(self, l: int) -> list[nn.Parameter]:
        return [p for modules in (self.decoders, self.classifiers) if str(l) in modules
                for p in modules[str(l)].parameters()]
