"""Local errors from auxiliary classifiers: local-random (fixed) and local-learned (trained).

Mostafa, Ramesh and Cauwenberghs 2018, "Deep supervised learning using local errors",
Frontiers in Neuroscience 12:608. Every hidden block l has an auxiliary classifier M_l that maps
its output h_l to C class scores; block l is trained by its local loss L_l = loss(M_l h_l, y)
only, with its input detached, so no error ever crosses a block boundary. The head (output
block) is trained by the same kind of loss on the detached output of the last hidden block, and
it alone makes the predictions.

This module also holds the helpers the other local-error rules (``leader_follower.py``) share:
turning a block's output into a vector and one optimiser group per block.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterator, Literal, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .base import Rule, option, register

#: Conv feature maps are average-pooled to this many rows and columns before an auxiliary classifier.
POOLED_SIZE = 2


def block_features(h: torch.Tensor) -> torch.Tensor:
    """A block's output as one vector per sample; conv maps are average-pooled to POOLED_SIZE^2 first."""
    if h.dim() == 4:
        h = F.adaptive_avg_pool2d(h, POOLED_SIZE)
    return h.flatten(1)


def feature_size(shape: Sequence[int]) -> int:
    """Length of :func:`block_features` for a block output of per-sample ``shape``."""
    if len(shape) == 3:
        return shape[0] * POOLED_SIZE ** 2
    return math.prod(shape)


def random_classifier(num_classes: int, features: int, init: str) -> torch.Tensor:
    """A C x n matrix with entries of scale 1/sqrt(n): uniform on +-1/sqrt(n), or gaussian with std 1/sqrt(n)."""
    scale = 1.0 / math.sqrt(features)
    if init == "gaussian":
        return torch.randn(num_classes, features) * scale
    return (torch.rand(num_classes, features) * 2 - 1) * scale


def per_block_groups(layers: Sequence[nn.Module], extras: Sequence[Sequence[nn.Parameter]]) -> list[list[nn.Parameter]]:
    """One optimiser group per block: its own weights plus whatever auxiliary weights train with it."""
    groups = []
    for i, layer in enumerate(layers):
        extra = list(extras[i]) if i < len(extras) else []
        groups.append([*layer.parameters(), *(p for p in extra if p.requires_grad)])
    return groups


def classification_loss(kind: str, scores: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy, mean-squared or square-hinge loss of class scores (summed over classes, mean over the batch)."""
    if kind == "ce":
        return F.cross_entropy(scores, y)
    target = F.one_hot(y, scores.shape[1]).to(scores.dtype)
    if kind == "mse":
        return 0.5 * (scores - target).pow(2).sum(1).mean()
    if kind == "hinge":
        signs = 2 * target - 1  # one-vs-all: +1 for the true class, -1 for the others
        return F.relu(1 - signs * scores).pow(2).sum(1).mean()
    raise ValueError(f"unknown loss {kind!r}")


def layerwise_active_layers(epoch: int, epochs: int, hidden_blocks: int) -> set[int]:
    """Which layers train in ``epoch`` under the layer-wise schedule (the head trains with the last block).

    The epochs are split as evenly as possible over the hidden blocks, earlier blocks taking the
    extra epochs. With fewer epochs than hidden blocks, consecutive blocks share an epoch (each
    still on its own local loss).
    """
    if hidden_blocks == 0:
        return {0}
    if epochs >= hidden_blocks:
        active = {epoch * hidden_blocks // epochs}
    else:
        active = {l for l in range(hidden_blocks) if l * epochs // hidden_blocks == epoch}
    if hidden_blocks - 1 in active:
        active.add(hidden_blocks)  # the head
    return active


@dataclass
class LocalClassifierConfig:
    loss: Literal["ce", "mse", "hinge"] = option(
        "ce", "local loss of every auxiliary classifier and of the head: cross-entropy, mean-squared, square hinge")
    schedule: Literal["simultaneous", "layerwise"] = option(
        "simultaneous", "simultaneous: every block every step; layerwise: block 1 for its share of the epochs, "
                        "then frozen, then block 2, ...; the head trains with the last block")
    init: Literal["uniform", "gaussian"] = option(
        "uniform", "distribution of the auxiliary classifiers (scale 1/sqrt(features))")


@register("local-random")
class LocalRandomClassifiers(Rule):
    """Local errors (Mostafa et al. 2018): each block learns from its own fixed random classifier; nothing crosses blocks.

    The auxiliary classifiers are buffers: never trained, in no optimiser, and saved with the rule.
    """

    Config = LocalClassifierConfig
    learned_classifiers = False
    local = True

    def __init__(self, net, config=None, optim=None):
        super().__init__(net, config, optim)
        matrices = [random_classifier(net.num_classes, feature_size(shape), self.config.init)
                    for shape in net.hidden_shapes()]
        if self.learned_classifiers:
            self.classifiers = nn.ModuleList(_linear_from(m) for m in matrices)
        else:
            for l, matrix in enumerate(matrices):
                self.register_buffer(f"classifier_{l}", matrix)
        self.active_layers = set(range(len(net.layers)))  # simultaneous, and whenever no epoch was started
        self.schedule_log: list[list[int]] = []

    # ----- the local losses ---------------------------------------------------------------
    def auxiliary_scores(self, l: int, h: torch.Tensor) -> torch.Tensor:
        features = block_features(h)
        if self.learned_classifiers:
            return self.classifiers[l](features)
        return features @ getattr(self, f"classifier_{l}").t()

    def block_step_loss(self, l: int, h_in: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if l not in self.active_layers:
            # A frozen block only supplies the input of the blocks above it (in eval mode: its
            # batch-norm statistics stay those it trained with).
            return self.net.block_forward(l, h_in, frozen=True), None
        h = self.net.block_forward(l, h_in, detach_input=True)
        scores = h if l == len(self.net.blocks) else self.auxiliary_scores(l, h)  # the head's output is its scores
        return h.detach(), classification_loss(self.config.loss, scores, y)

    def layers_in_use(self) -> int:
        return max(self.active_layers) + 1  # nothing above the last training layer needs its input

    def local_losses(self, x: torch.Tensor, y: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
        """(layer index, local loss) for each training layer, computed lazily block after block.

        Every block's input is detached, so a loss reaches its own block's weights only. A caller
        that calls ``backward`` on each loss as it comes frees that block's graph before the next
        block runs.
        """
        h = x
        for l in range(self.layers_in_use()):
            h, loss = self.block_step_loss(l, h, y)
            if loss is not None:
                yield l, loss

    def assign_credit(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        total = x.new_zeros(())
        head_loss = None
        for l, loss in self.local_losses(x, y):
            loss.backward()
            total += loss.detach()
            if l == len(self.net.blocks):
                head_loss = loss.detach()
        stats = {"loss": total.item()}
        if head_loss is not None:
            stats["head_loss"] = head_loss.item()
        return stats

    # ----- optimisers and schedule --------------------------------------------------------
    def parameter_groups(self) -> list[list[nn.Parameter]]:
        extras = [list(c.parameters()) for c in self.classifiers] if self.learned_classifiers else []
        return per_block_groups(self.net.layers, extras)

    def start_epoch(self, epoch: int, epochs: int) -> None:
        if self.config.schedule == "layerwise":
            self.active_layers = layerwise_active_layers(epoch, epochs, len(self.net.blocks))
        del self.schedule_log[epoch:]  # a resumed run rewrites the epochs it repeats
        self.schedule_log.append(sorted(self.active_layers))

    def statistics(self) -> dict[str, Any]:
        # Layer L (0-based) is the head; blocks that never train keep their random initial weights.
        return {"training_layers_per_epoch": self.schedule_log}

    def extra_state(self) -> dict[str, Any]:
        return {"schedule_log": self.schedule_log}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.schedule_log = [list(layers) for layers in state.get("schedule_log", [])]


@register("local-learned")
class LocalLearnedClassifiers(LocalRandomClassifiers):
    """Local errors with trained auxiliary classifiers (Mostafa et al. 2018, variant): each trains with its block.

    Same as local-random except that each auxiliary classifier (with a bias) is in its block's
    optimiser group and learns from the same local loss.
    """

    learned_classifiers = True


def _linear_from(weight: torch.Tensor) -> nn.Linear:
    linear = nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        linear.weight.copy_(weight)
        linear.bias.zero_()
    return linear
