"""Local errors from auxiliary classifiers: local-random (fixed) and local-learned (trained).

Mostafa, Ramesh and Cauwenberghs 2018, "Deep supervised learning using local errors",
Frontiers in Neuroscience 12:608. Every hidden block l has an auxiliary classifier M_l that maps
its output h_l to C class scores; block l is trained by its local loss L_l = loss(M_l h_l, y)
only, with its input detached, so no error ever crosses a block boundary. The head (output
block) is trained by the same kind of loss on the detached output of the last hidden block, and
it alone makes the predictions. The step they share with every local-loss rule is
:class:`~localcredit.rules.local_loss.LocalLossRule`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from .base import class_loss, option, register
from .local_loss import LocalLossRule, block_features, feature_size


def random_classifier(num_classes: int, features: int, init: str) -> torch.Tensor:
    """A C x n matrix with entries of scale 1/sqrt(n): uniform on +-1/sqrt(n), or gaussian with std 1/sqrt(n)."""
    scale = 1.0 / math.sqrt(features)
    if init == "gaussian":
        return torch.randn(num_classes, features) * scale
    return (torch.rand(num_classes, features) * 2 - 1) * scale


def classification_loss(kind: str, scores: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy, mean-squared or square-hinge loss of class scores (summed over classes, mean over the batch),
    every class active: what ``loss=`` means. A rule takes it over its active classes, :meth:`Rule.class_loss`."""
    return class_loss(scores, y, kind)


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
class LocalRandomClassifiers(LocalLossRule):
    """Local errors (Mostafa et al. 2018): each block learns from its own fixed random classifier; nothing crosses blocks.

    The auxiliary classifiers are buffers: never trained, in no optimiser, and saved with the rule.
    """

    Config = LocalClassifierConfig
    learned_classifiers = False

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

    def block_loss(self, l: int, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.class_loss(self.auxiliary_scores(l, h), y, self.config.loss)

    def head_loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.class_loss(logits, y, self.config.loss)  # the head's output is its scores

    def auxiliary_parameters(self, l: int) -> list[nn.Parameter]:
        return list(self.classifiers[l].parameters()) if self.learned_classifiers else []

    # ----- schedule -------------------------------------------------------------------------
    def trains_layer(self, l: int) -> bool:
        return l in self.active_layers

    def layers_in_use(self) -> int:
        return max(self.active_layers) + 1  # nothing above the last training layer needs its input

    def start_epoch(self, epoch: int, epochs: int) -> None:
        if self.config.schedule == "layerwise":
            self.active_layers = layerwise_active_layers(epoch, epochs, len(self.net.blocks))
        del self.schedule_log[epoch:]  # a resumed run rewrites the epochs it repeats
        self.schedule_log.append(sorted(self.active_layers))

    def needs_start_epoch(self) -> bool:
        # The layer-wise schedule needs the epoch and the number of epochs to know which block trains.
        return self.config.schedule == "layerwise" and not self.schedule_log

    def statistics(self) -> dict[str, Any]:
        # Layer L (0-based) is the head; blocks that never train keep their random initial weights.
        return {"training_layers_per_epoch": self.schedule_log}

    def extra_state(self) -> dict[str, Any]:
        # active_layers too: a run resumed in the middle of an epoch does not start that epoch again.
        return {"schedule_log": self.schedule_log, "active_layers": sorted(self.active_layers)}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.schedule_log = [list(layers) for layers in state.get("schedule_log", [])]
        if "active_layers" in state:
            self.active_layers = set(state["active_layers"])


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
