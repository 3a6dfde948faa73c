"""Decoupled greedy learning: DGL (Belilovsky, Eickenberg & Oyallon 2020).

Belilovsky, Eickenberg and Oyallon, "Decoupled greedy learning of CNNs", ICML 2020. Each block
learns from the cross-entropy of its own auxiliary network on the block's output, its input
detached, so no error crosses a block boundary and every block can learn at once. The paper's K
modules of consecutive blocks are the network option ``--modules K`` (every block of the network
the rule sees is then a module, :meth:`~localcredit.nets.blocknet.BlockNet.in_modules`;
``--parallel blocks`` puts whole modules on processes).
The auxiliary network is the paper's "mlp-sr": on a conv output, ``convs`` 1x1 convolutions with
batch norm and ReLU (as many channels as the block, by default), an average to 2x2, then an MLP of
``mlp`` layers ending in the class scores; on a dense output, the MLP alone. The head learns from its
own cross-entropy on the detached output of the last block, and alone makes the predictions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import UserError
from ..nets.layout import Flatten
from .base import option, register
from .local_loss import POOLED_SIZE, LocalLossRule


@dataclass
class DGLConfig:
    width: int = option(0, "channels of the auxiliary 1x1 convolutions (0: the block's own, as the paper's code); "
                           "the MLP's hidden layers are as wide as its input")
    convs: int = option(2, "1x1 conv + BN + ReLU layers of the auxiliary network before the 2x2 average (conv blocks)")
    mlp: int = option(3, "layers of the auxiliary MLP, the last one giving the class scores")
    group: int = option(1, "removed: cut the network into modules with --modules K (every local rule); only 1 "
                           "(every block its own module) is accepted")

    def validate(self) -> None:
        if self.group != 1:
            raise UserError(f"option group was removed: cut the network into modules with --modules K (every rule "
                            f"with local losses takes it), e.g. --modules 4; see docs/modules.md (got group={self.group})")
        if self.mlp < 1:
            raise UserError(f"option mlp must be at least 1, got {self.mlp}")
        for name in ("width", "convs"):
            if getattr(self, name) < 0:
                raise UserError(f"option {name} must be >= 0, got {getattr(self, name)}")


def auxiliary_network(shape: tuple[int, ...], num_classes: int, config: DGLConfig) -> nn.Sequential:
    """mlp-sr on a block output of per-sample ``shape``: [1x1 conv-BN-ReLU] x convs, 2x2 average, MLP.

    The MLP's hidden layers keep the width of its input (channels x 4 after the 2x2 average).
    """
    layers: list[nn.Module] = []
    if len(shape) == 3:
        channels = shape[0]
        width = config.width or channels
        for _ in range(config.convs):
            layers += [nn.Conv2d(channels, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
            channels = width
        layers.append(nn.AdaptiveAvgPool2d(POOLED_SIZE))
        features = channels * POOLED_SIZE ** 2
    else:
        features = math.prod(shape)
    layers.append(Flatten())
    for _ in range(config.mlp - 1):
        layers += [nn.Linear(features, features), nn.ReLU()]
    layers.append(nn.Linear(features, num_classes))
    return nn.Sequential(*layers)


@register("dgl")
class DecoupledGreedy(LocalLossRule):
    """DGL (Belilovsky et al. 2020): each block (module, with --modules K) learns through its own auxiliary network."""

    Config = DGLConfig

    def __init__(self, net, config=None, optim=None):
        super().__init__(net, config, optim)
        # One auxiliary network per hidden block (per module of a network cut into modules), keyed by its index.
        self.auxiliary = nn.ModuleDict({str(l): auxiliary_network(shape, net.num_classes, self.config)
                                        for l, shape in enumerate(net.hidden_shapes())})

    def block_loss(self, l: int, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.class_loss(self.auxiliary[str(l)](h), y)

    def auxiliary_parameters(self, l: int) -> list[nn.Parameter]:
        return list(self.auxiliary[str(l)].parameters())
