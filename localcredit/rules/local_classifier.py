"""Local errors from auxiliary classifiers: local-random (fixed) and local-learned (trained).

Mostafa, Ramesh and Cauwenberghs 2018, "Deep supervised learning using local errors",
Frontiers in Neuroscience 12:608. Every hidden block l has an auxiliary classifier M_l that maps
its output h_l to C class scores; block l is trained by its local loss L_l = loss(M_l h_l, y)
only, with its input detached, so no error ever crosses a block boundary. The head (output
block) is trained by the same kind of loss on the detached output of the last hidden block, and
it alone makes the predictions.

This module also holds what every local-loss rule (``leader_follower.py``, ``predsim.py``,
``dgl.py``) shares: :class:`LocalLossRule`, the step of a rule whose blocks learn from losses on
their own outputs, turning a block's output into a vector, and one optimiser group per block.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from .base import Rule, StepFigures, option, register

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


class LocalLossRule(Rule):
    """A rule whose every block learns from a loss on its own output, its input detached.

    A subclass defines :meth:`block_loss` (and the auxiliary modules it trains with each block,
    :meth:`auxiliary_parameters`); the head learns from its own loss (:meth:`head_loss`) on the
    detached output of the last block, and alone makes the predictions. Layers may be grouped
    (:meth:`Rule.layer_groups`): inside a group the output passes on with its graph, and the
    group's last layer's loss trains the whole group.
    """

    local = True

    def block_loss(self, l: int, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
        """Hidden block ``l``'s local loss on its output ``h`` (None: inside a group, no loss of its own)."""
        raise NotImplementedError

    def head_loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, y)

    def auxiliary_parameters(self, l: int) -> list[nn.Parameter]:
        """The auxiliary weights that train with hidden block ``l`` (in its optimiser group)."""
        return []

    def trains_layer(self, l: int) -> bool:
        """Whether layer ``l`` learns in the current epoch (schedules that freeze layers override it)."""
        return True

    def block_step_loss(self, l: int, h_in: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not self.trains_layer(l):
            # A frozen block only supplies the input of the blocks above it (in eval mode: its
            # batch-norm statistics stay those it trained with).
            return self.net.block_forward(l, h_in, frozen=True), None
        group = self._group_of(l)
        h = self.net.block_forward(l, h_in, detach_input=l == group[0])
        loss = self.head_loss(h, y) if l == len(self.net.blocks) else self.block_loss(l, h, y)
        return (h.detach() if l == group[-1] else h), loss

    def _group_of(self, l: int) -> range:
        return next(group for group in self.layer_groups() if l in group)

    def local_losses(self, x: torch.Tensor, y: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
        """(layer index, local loss) for each layer that has one, computed lazily block after block.

        Every group's input is detached, so a loss reaches its own group's weights only. A caller
        that calls ``backward`` on each loss as it comes frees that group's graph before the next
        one runs.
        """
        h = x
        for l in range(self.layers_in_use()):
            h, loss = self.block_step_loss(l, h, y)
            if loss is not None:
                yield l, loss

    def assign_credit(self, x: torch.Tensor, y: torch.Tensor) -> StepFigures:
        total = x.new_zeros(())
        head_loss = None
        for l, loss in self.local_losses(x, y):
            loss.backward()
            # Its input was detached: this layer's group is done, and can be averaged across
            # processes while the layers above compute.
            self.gradients_final(self.group_parameters(l))
            total += loss.detach()
            if l == len(self.net.blocks):
                head_loss = loss.detach()
        stats = {"loss": total.detach()}
        if head_loss is not None:
            stats["head_loss"] = head_loss.detach()
        return stats

    def parameter_groups(self) -> list[list[nn.Parameter]]:
        return per_block_groups(self.net.layers, [self.auxiliary_parameters(l) for l in range(len(self.net.blocks))])

    def group_parameters(self, l: int) -> list[nn.Parameter]:
        """The parameters that the loss of layer ``l`` (the last of its group) trains."""
        groups = self.parameter_groups()
        return [p for layer in self._group_of(l) for p in groups[layer]]

    def gradient_order(self) -> list[nn.Parameter]:
        # assign_credit finishes the layers from the input up (the order of parameter_groups).
        return [p for group in self.parameter_groups() for p in group]


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
        return classification_loss(self.config.loss, self.auxiliary_scores(l, h), y)

    def head_loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return classification_loss(self.config.loss, logits, y)  # the head's output is its scores

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
