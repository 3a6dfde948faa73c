"""What every local-loss rule shares: :class:`LocalLossRule` and its helpers.

A local-loss rule trains each block (or each group of consecutive blocks) from a loss on its own
output, its input detached, so no error crosses a block boundary: ``local-random`` and
``local-learned`` (``local_classifier.py``), ``lfnn-l`` and ``lfnn`` (``leader_follower.py``, lfnn adding a
global loss), ``predsim`` (``predsim.py``) and ``dgl`` (``dgl.py``). A rule defines its block loss and the
auxiliary modules that train with each block; this module runs the step block after block, gives the
head its own loss on the detached output of the last block, and builds one optimiser group per block.
Its helpers turn a block's output into one vector per sample (:func:`block_features`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..nets.layout import flatten_features
from .base import Rule, StepFigures

#: Conv feature maps are average-pooled to this many rows and columns before an auxiliary classifier.
POOLED_SIZE = 2


def block_features(h: torch.Tensor) -> torch.Tensor:
    """A block's output as one vector per sample; conv maps are average-pooled to POOLED_SIZE^2 first."""
    if h.dim() == 4:
        h = F.adaptive_avg_pool2d(h, POOLED_SIZE)
    return flatten_features(h)


def feature_size(shape: Sequence[int]) -> int:
    """Length of :func:`block_features` for a block output of per-sample ``shape``."""
    if len(shape) == 3:
        return shape[0] * POOLED_SIZE ** 2
    return math.prod(shape)


def per_block_groups(layers: Sequence[nn.Module], extras: Sequence[Sequence[nn.Parameter]]) -> list[list[nn.Parameter]]:
    """One optimiser group per block: its own weights plus whatever auxiliary weights train with it."""
    groups = []
    for i, layer in enumerate(layers):
        extra = list(extras[i]) if i < len(extras) else []
        groups.append([*layer.parameters(), *(p for p in extra if p.requires_grad)])
    return groups


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
        return self.class_loss(logits, y)

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
        _, figures = self.train_layers(range(self.layers_in_use()), x, y)
        return {**figures}

    def layer_trained(self, l: int) -> None:
        # Its input was detached: this layer's group is done, and can be averaged across
        # processes while the layers above compute.
        if self.final_gradient_listeners:
            self.gradients_final(self.group_parameters(l))

    def parameter_groups(self) -> list[list[nn.Parameter]]:
        return per_block_groups(self.net.layers, [self.auxiliary_parameters(l) for l in range(len(self.net.blocks))])

    def group_parameters(self, l: int) -> list[nn.Parameter]:
        """The parameters that the loss of layer ``l`` (the last of its group) trains."""
        groups = self.parameter_groups()
        return [p for layer in self._group_of(l) for p in groups[layer]]

    def gradient_order(self) -> list[nn.Parameter]:
        # assign_credit finishes the layers from the input up (the order of parameter_groups).
        return [p for group in self.parameter_groups() for p in group]
