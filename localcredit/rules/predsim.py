"""Local losses that predict the label and match its similarity structure: predsim (Nøkland & Eidnes 2019).

Nøkland and Eidnes, "Training neural networks with local error signals", ICML 2019. Every hidden
block l learns from a loss on its own output h_l alone, its input detached (no error crosses a block):

    L_l = (1 - beta) * CE(D_l(pool(h_l)), y)  +  beta * mean( (S(P_l(h_l)) - S(Y))^2 )
           \\_____________ pred ____________/          \\_______________ sim _______________/

* pred: a linear decoder D_l, zero-initialised, on h_l average-pooled (conv blocks) to at most
  ``dim_in_decoder`` features;
* sim: S(z) is the B x B cosine-similarity matrix of the batch's vectors z, each flattened and
  centred on its own mean; P_l is a 3x3 convolution (C -> C, no bias) for a conv block and the
  identity for a dense one; Y is the one-hot labels (or the soft targets, as :meth:`Rule.target_distribution`
  gives them), so S(Y) says which samples share a class.

``loss=pred`` or ``loss=sim`` keeps one term alone (weight 1). ``bio`` is the paper's variant
without weight transport inside the auxiliary losses: the sim target is a fixed random projection
of the one-hot labels, and D_l and P_l send their error back to the block through fixed random
matrices (feedback alignment) instead of their own transposes. The head learns from its own
cross-entropy on the detached output of the last block, and alone makes the predictions.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from ..nets.layers import swapped_input_gradients, weight_layers, weight_op
from ..nets.layout import flatten_features, in_memory_order
from .base import option, register
from .feedback import random_feedback
from .local_loss import LocalLossRule

#: Features of the fixed random projection of the one-hot labels that is the sim target with ``bio``.
BIO_TARGET_FEATURES = 128


@dataclass
class PredSimConfig:
    loss: Literal["predsim", "pred", "sim"] = option(
        "predsim", "predsim: (1 - beta) pred + beta sim; pred or sim: that term alone")
    beta: float = option(0.99, "weight of the sim term in predsim")
    dim_in_decoder: int = option(2048, "most features the pred decoder reads: conv outputs are average-pooled "
                                       "(by powers of 2) until they fit (the paper: 2048 CIFAR-10, 1024 MNIST)")
    bio: bool = option(False, "no weight transport in the auxiliary losses: a fixed random projection of the "
                              "labels as sim target, fixed random feedback through the decoder and the sim conv")

    def validate(self) -> None:
        if not 0 <= self.beta <= 1:
            raise UserError(f"option beta must be in [0, 1], got {self.beta}")
        if self.dim_in_decoder < 1:
            raise UserError(f"option dim_in_decoder must be at least 1, got {self.dim_in_decoder}")

    @property
    def weights(self) -> tuple[float, float]:
        """(pred weight, sim weight)."""
        return {"pred": (1.0, 0.0), "sim": (0.0, 1.0), "predsim": (1 - self.beta, self.beta)}[self.loss]


def similarity_matrix(z: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every pair of the batch's vectors, each flattened and centred on its own mean."""
    z = z.flatten(1)
    z = z - z.mean(1, keepdim=True)
    z = z / (z.norm(dim=1, keepdim=True) + 1e-8)
    return (z @ z.t()).clamp(-1, 1)


class _SimilarityMSE(torch.autograd.Function):
    """mean((S(z) - T)^2) for a fixed T, with its gradient in closed form.

    One autograd node instead of the ~20 that the composed operations record (their per-operation cost
    was most of predsim's step overhead on an MLP: results/speed), and only two passes over the B x n
    values besides the two matmuls. With c the rows of z centred, G = c c^T, s_i = sqrt(G_ii) + eps,
    S = G / (s s^T) and D = S - T (symmetric):  dL/dc = 4 / B^2 (D / (s s^T) - diag(r)) c,
    r_i = sum_j D_ij S_ij / s_i^2 -- autograd's up to eps / |c_i|. Its rows sum to zero as c's do, so it
    is also dL/dz (up to rounding). S is not clamped to [-1, 1]: it can leave it only by rounding, on
    the diagonal, where the projection by diag(r) removes the gradient anyway.
    """

    @staticmethod
    def forward(ctx, z: torch.Tensor, target_similarity: torch.Tensor) -> torch.Tensor:
        centred = z - z.mean(1, keepdim=True)
        gram = centred @ centred.t()
        scale = gram.diagonal().sqrt().add_(1e-8)
        similarity = gram.div_(scale[:, None]).div_(scale[None, :])
        difference = similarity - target_similarity
        ctx.save_for_backward(centred, scale, similarity, difference)
        return difference.square().mean()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        centred, scale, similarity, difference = ctx.saved_tensors
        along_own_row = (difference * similarity).sum(1).div_(scale.square())
        mixing = difference.div(scale[:, None]).div_(scale[None, :])
        mixing.diagonal().sub_(along_own_row)
        return mixing.mul_(grad * (4 / difference.numel())) @ centred, None


def sim_loss(projected: torch.Tensor, target_similarity: torch.Tensor) -> torch.Tensor:
    """Mean squared difference between the similarity matrix of the block's (projected) output and
    ``target_similarity`` (:func:`similarity_matrix` of the targets, which get no gradient)."""
    return _SimilarityMSE.apply(in_memory_order(projected), target_similarity.detach())


def decoder_pool(shape: tuple[int, ...], dim_in_decoder: int) -> tuple[int, int] | None:
    """Output size of the average pool in front of a conv block's decoder (None: a dense block, no pool).

    The pooling window doubles until channels x pooled rows x pooled columns fit ``dim_in_decoder``
    (or the window covers the map).
    """
    if len(shape) != 3:
        return None
    channels, height, width = shape
    k = 1
    while channels * math.ceil(height / k) * math.ceil(width / k) > dim_in_decoder and k < max(height, width):
        k *= 2
    return math.ceil(height / k), math.ceil(width / k)


class BlockDecoders(nn.Module):
    """The auxiliary modules of one block: the pred decoder D and, for conv blocks, the sim projection P."""

    def __init__(self, shape: tuple[int, ...], num_classes: int, dim_in_decoder: int):
        super().__init__()
        self.pool = decoder_pool(shape, dim_in_decoder)
        features = math.prod(shape) if self.pool is None else shape[0] * math.prod(self.pool)
        self.decoder = nn.Linear(features, num_classes)
        nn.init.zeros_(self.decoder.weight)
        nn.init.zeros_(self.decoder.bias)
        self.projection = nn.Conv2d(shape[0], shape[0], 3, padding=1, bias=False) if len(shape) == 3 else None

    def predict(self, h: torch.Tensor) -> torch.Tensor:
        pooled = h if self.pool is None else F.adaptive_avg_pool2d(h, self.pool)
        return self.decoder(flatten_features(pooled))

    def project(self, h: torch.Tensor) -> torch.Tensor:
        return h if self.projection is None else self.projection(h)


@register("predsim")
class PredSim(LocalLossRule):
    """predsim (Nøkland & Eidnes 2019): each block predicts the label and matches the batch's label similarity;
    no error crosses blocks."""

    Config = PredSimConfig
    target_projection: torch.Tensor  # a buffer, with bio (declared: nn.Module's lookup is typed Tensor | Module)

    def __init__(self, net, config=None, optim=None):
        super().__init__(net, config, optim)
        #: (labels, their version, S(Y)) of the step in progress (:meth:`target_similarity`)
        self._target_similarity: tuple[torch.Tensor, int, torch.Tensor] | None = None
        self.decoders = nn.ModuleList(BlockDecoders(shape, net.num_classes, self.config.dim_in_decoder)
                                      for shape in net.hidden_shapes())
        if self.config.bio:
            self.register_buffer("target_projection", torch.randn(net.num_classes, BIO_TARGET_FEATURES))
            self.feedback_index = {}
            for i, (name, layer) in enumerate(weight_layers(self.decoders)):
                fan_in = weight_op(layer).feedback_fan_in(layer)
                self.register_buffer(f"feedback_{i}", random_feedback(tuple(layer.weight.shape), fan_in, "uniform"))
                self.feedback_index[name] = i

    def feedback(self, name: str, layer: nn.Module) -> torch.Tensor:
        return getattr(self, f"feedback_{self.feedback_index[name]}")

    def target_similarity(self, y: torch.Tensor) -> torch.Tensor:
        """S(Y) for the labels ``y``, computed once per step: every block's sim loss compares with it."""
        cached = self._target_similarity
        if cached is None or cached[0] is not y or cached[1] != y._version:
            cached = (y, y._version, similarity_matrix(self.sim_target(y)))
            self._target_similarity = cached
        return cached[2]

    def sim_target(self, y: torch.Tensor) -> torch.Tensor:
        """Y of S(Y): the target distributions (one-hot rows for class indices), randomly projected with ``bio``."""
        target = self.target_distribution(y, self.target_dtype())
        return target @ self.target_projection if self.config.bio else target

    def target_dtype(self) -> torch.dtype:
        return next(self.decoders.parameters()).dtype

    def block_loss(self, l: int, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        pred_weight, sim_weight = self.config.weights
        decoders = self.decoders[l]
        loss = h.new_zeros(())
        with swapped_input_gradients(self.decoders, self.feedback) if self.config.bio else nullcontext():
            if pred_weight:
                loss = loss + pred_weight * self.class_loss(decoders.predict(h), y)
            if sim_weight:
                loss = loss + sim_weight * sim_loss(decoders.project(h), self.target_similarity(y))
        return loss

    def auxiliary_parameters(self, l: int) -> list[nn.Parameter]:
        return list(self.decoders[l].parameters())
