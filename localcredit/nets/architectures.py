"""Architectures: builders of blocks, and the network options (``NetSpec``) they read.

``--arch`` picks a builder; every builder returns a :class:`~localcredit.nets.blocknet.BlockNet`:

* ``mlp``: dense blocks (Linear [BN] activation [dropout]) of ``--hidden`` sizes (default 1000).
* ``conv``: the small conv net of the first version: ``--channels 32,M,64,M`` without batch norm.
* ``lenet``: conv5x5 32 - pool - 64 - pool - 128 - global max-pool - fc 256 (BioTorch's LeNet
  shape, with 'same' padding so that any image of at least 4x4 fits).
* ``vgg``: a layer string in local-loss's notation (``--channels 128,256,M,256,512,M,512,M,512,M``,
  vgg8b, the default): every number a conv3x3-BN-activation block, ``M`` a 2x2 max-pool closing
  the block before it; then ``--hidden`` dense blocks (default 1024).
* ``resnet``: the CIFAR ResNet of He et al. 2016, ``--depth`` 6k+2 (default 20): a conv3x3-16
  stem, three stages of k residual units (16, 32, 64 channels; stride 2 into stages 2 and 3,
  1x1 conv + BN projection shortcuts), global average pooling, the head. Each unit is a block.

``--modules K`` (any architecture, rules with local losses) cuts the hidden blocks that were built into
K contiguous modules, each one block of the network the rule sees (:meth:`BlockNet.in_modules`).

``--width`` multiplies every channel count; ``--norm batch|none`` and ``--dropout`` apply to every
hidden block of the architectures that take them. An option an architecture does not read is
refused rather than ignored.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import Any, ClassVar, cast

import torch
from torch import nn

from ..errors import UserError
from ..spec import check, one_of, option, positive
from .blocknet import BlockNet
from .layers import register_layer
from .layout import Flatten

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "leaky_relu": lambda: nn.LeakyReLU(0.1),
    "gelu": nn.GELU,
}

NORMS = ("batch", "none")
VGG8B = "128,256,M,256,512,M,512,M,512,M"
DEFAULT_DEPTH = 20


def parse_hidden(text: str) -> list[int]:
    """``"1000,500"`` -> [1000, 500]; ``""`` or ``"none"`` -> no hidden blocks."""
    text = text.strip()
    if text in ("", "none"):
        return []
    if not re.fullmatch(r"\d+(\s*,\s*\d+)*", text):
        raise UserError(f"--hidden expects comma-separated positive integers like 1000,1000, got {text!r}")
    sizes = [int(part) for part in text.split(",")]
    if any(size < 1 for size in sizes):
        raise UserError(f"--hidden sizes must be positive, got {text!r}")
    return sizes


def parse_modules(text: str) -> list[int]:
    """``"4"`` -> [4] (K = 4 modules, balanced by FLOPs); ``"1,3,3,2"`` -> [1, 3, 3, 2] (blocks per module)."""
    if not re.fullmatch(r"\s*\d+(\s*,\s*\d+)*\s*", text) or any(int(n) < 1 for n in text.split(",")):
        raise UserError(f"--modules expects K (a positive number of modules) or positive blocks per module like "
                        f"1,3,3,2, got {text!r}")
    return [int(n) for n in text.split(",")]


def modules_of(value: int | Sequence[int]) -> int | list[int]:
    """``--modules`` as :meth:`BlockNet.in_modules` takes it: one number is K, several are blocks per module."""
    if isinstance(value, int):
        return value
    return value[0] if len(value) == 1 else list(value)


def parse_patches(text: str) -> list[int]:
    """``"2,2,1"`` -> [2, 2, 1]: the patch size k of each invertible conv layer."""
    if not re.fullmatch(r"\s*\d+(\s*,\s*\d+)*\s*", text) or any(int(p) < 1 for p in text.split(",")):
        raise UserError(f"--patches expects comma-separated positive patch sizes like 2,2,1,1, got {text!r}")
    return [int(p) for p in text.split(",")]


@dataclass(kw_only=True)
class NetSpec:
    """The network of a run: the architecture and its options (None: the architecture's default).

    The one definition of the network options (``localcredit.spec``): the CLI's flags, config files,
    the bench's command lines and result.json's fields all come from it.
    """

    TITLE: ClassVar[str] = "network (docs/networks.md)"

    arch: str | None = option(None, "mlp | conv | lenet | vgg | resnet | invertible | invertible-conv "
                                    "(default: the rule's network, mlp for most)")
    hidden: list[int] | None = option(None, "dense hidden sizes, e.g. 1000,1000; 'none' for no dense block "
                                            "(default: 1000 for mlp, 1024 for vgg, 256 for lenet, none for conv/resnet)",
                                      parse=parse_hidden, metavar="N,N,...")
    activation: str | None = option(None, "relu | tanh | sigmoid | leaky_relu | gelu "
                                          "(default: the architecture's, relu; leaky ReLU for invertible)")
    channels: str | None = option(None, f"conv layer string for vgg/conv: channel counts and M (2x2 max-pool), "
                                        f"e.g. 32,M,64,M (default: vgg8b {VGG8B} for vgg, 32,M,64,M for conv)",
                                  metavar="C,M,...")
    width: float = option(1.0, "multiplies every channel count (lenet, vgg, conv, resnet)", parse=float,
                          check=positive)
    depth: int | None = option(None, f"resnet depth 6k+2: 8, 14, 20, 32, 56, 110 (default {DEFAULT_DEPTH})",
                               parse=int)
    norm: str | None = option(None, "batch | none: batch norm after every conv/dense layer "
                                    "(default: batch for vgg and resnet, none for mlp, conv and lenet)",
                              check=one_of(*NORMS))
    patches: list[int] | None = option(None, "invertible-conv: patch size k of each invertible conv layer "
                                             "(kernel = stride = k, k^2 C_in output channels), e.g. 2,2,1,1 "
                                             "(default: about sqrt(side), the rest of the map, 1: 7,4,1 for 28x28)",
                                       parse=parse_patches, metavar="K,K,...")
    dropout: float = option(0.0, "dropout probability after every hidden block (mlp, conv, lenet, vgg)",
                            parse=float, check=lambda p: None if 0 <= p < 1 else f"must be in [0, 1), got {p}")
    modules: list[int] | None = option(None, "rules with local losses: cut the hidden blocks into K contiguous "
                                             "modules of about equal FLOPs, each learning as one through the "
                                             "rule's loss on its output (K = the number of blocks: one loss per "
                                             "block, as without it); or blocks per module, e.g. 1,3,3,2 "
                                             "(docs/modules.md)", parse=parse_modules, metavar="K|N,N,...")

    def net_spec(self) -> NetSpec:
        """Only the network options (a RunSpec is a NetSpec with more fields)."""
        return NetSpec(**{f.name: getattr(self, f.name) for f in fields(NetSpec)})


# ----- the registry ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Architecture:
    build: Callable[[NetSpec, tuple[int, ...], int], BlockNet]
    options: frozenset[str]  # the NetSpec fields it reads
    #: the layout its 4-d weights (and so its feature maps) are kept in: see :attr:`BlockNet.memory_format`
    memory_format: torch.memory_format = torch.contiguous_format


ARCHITECTURES: dict[str, Architecture] = {}
#: NetSpec fields every architecture takes (``modules`` regroups the blocks of whatever was built).
EVERY_ARCH = ("arch", "modules")


def register_architecture(name: str, build: Callable[[NetSpec, tuple[int, ...], int], BlockNet],
                          options: Sequence[str] = ("hidden", "activation"),
                          memory_format: torch.memory_format = torch.contiguous_format) -> None:
    """Make ``--arch name`` build networks with ``build(spec, input_shape, num_classes)``.

    ``memory_format=torch.channels_last`` for a conv net whose layers all take channels-last maps:
    rules built for it keep their 4-d weights in that layout (:attr:`BlockNet.memory_format`).
    """
    if name in ARCHITECTURES and ARCHITECTURES[name].build is not build:
        raise ValueError(f"architecture {name!r} registered twice")
    unknown = set(options) - {f.name for f in fields(NetSpec)}
    if unknown:
        raise ValueError(f"unknown network options {sorted(unknown)}")
    ARCHITECTURES[name] = Architecture(build, frozenset(options), memory_format)


def build(spec: NetSpec, input_shape: Sequence[int], num_classes: int) -> BlockNet:
    """Build ``spec.arch`` for this data; an option the architecture does not read is an error."""
    if spec.arch not in ARCHITECTURES:
        raise UserError(f"unknown --arch {spec.arch!r}; choose from {', '.join(ARCHITECTURES)}")
    architecture = ARCHITECTURES[spec.arch]
    for f in fields(NetSpec):
        if f.name not in EVERY_ARCH and f.name not in architecture.options and getattr(spec, f.name) != f.default:
            takes = ", ".join(f"--{o}" for o in sorted(architecture.options)) or "no options"
            raise UserError(f"--{f.name} does not apply to --arch {spec.arch} (it takes {takes})")
    check(spec.net_spec())
    if spec.activation is not None and spec.activation not in ACTIVATIONS and spec.arch != "invertible":
        raise UserError(f"unknown activation {spec.activation!r}; choose from {', '.join(ACTIVATIONS)}")
    net = architecture.build(spec, tuple(input_shape), num_classes)
    net.memory_format = architecture.memory_format
    return net if spec.modules is None else net.in_modules(modules_of(spec.modules))


# ----- building blocks ---------------------------------------------------------------------------
def make_activation(name: str | None) -> nn.Module:
    name = name or "relu"
    if name not in ACTIVATIONS:
        raise UserError(f"unknown activation {name!r}; choose from {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]()


def _scaled(channels: int, width: float) -> int:
    return max(1, round(channels * width))


def _image_shape(arch: str, input_shape: tuple[int, ...]) -> tuple[int, int, int]:
    if len(input_shape) != 3:
        raise UserError(f"--arch {arch} needs image data (C, H, W); this data set has per-sample shape "
                        f"{tuple(input_shape)}")
    return input_shape


def dense_layers(n_in: int, n_out: int, spec: NetSpec, norm: str) -> list[nn.Module]:
    """Linear [BatchNorm1d] activation [Dropout]."""
    layers: list[nn.Module] = [nn.Linear(n_in, n_out, bias=norm == "none")]
    if norm == "batch":
        layers.append(nn.BatchNorm1d(n_out))
    layers.append(make_activation(spec.activation))
    if spec.dropout:
        layers.append(nn.Dropout(spec.dropout))
    return layers


def conv_block(c_in: int, c_out: int, spec: NetSpec, norm: str, kernel_size: int = 3,
               pool: nn.Module | None = None) -> nn.Sequential:
    """Conv ('same' padding) [BatchNorm2d] activation [pool] [Dropout]."""
    layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, kernel_size, padding=kernel_size // 2, bias=norm == "none")]
    if norm == "batch":
        layers.append(nn.BatchNorm2d(c_out))
    layers.append(make_activation(spec.activation))
    if pool is not None:
        layers.append(pool)
    if spec.dropout:
        layers.append(nn.Dropout(spec.dropout))
    return nn.Sequential(*layers)


def dense_stack(features: int, hidden: Sequence[int], num_classes: int, spec: NetSpec, norm: str,
                front: Sequence[nn.Module] = ()) -> tuple[list[nn.Module], nn.Module]:
    """Dense hidden blocks on ``features`` inputs, then the head; ``front`` (a flatten, a global pool)
    opens the first of them."""
    blocks: list[nn.Module] = []
    for n_out in hidden:
        blocks.append(nn.Sequential(*front, *dense_layers(features, n_out, spec, norm)))
        features, front = n_out, ()
    head_layers = [*front, nn.Linear(features, num_classes)]
    head = head_layers[0] if len(head_layers) == 1 else nn.Sequential(*head_layers)
    return blocks, head


def _hidden(spec: NetSpec, default: Sequence[int]) -> list[int]:
    return list(default) if spec.hidden is None else list(spec.hidden)


def _description(spec: NetSpec, **resolved: Any) -> dict[str, Any]:
    return {"activation": spec.activation or "relu", "width": spec.width, "dropout": spec.dropout, **resolved}


# ----- mlp ---------------------------------------------------------------------------------------
def mlp(spec: NetSpec, input_shape: tuple[int, ...], num_classes: int) -> BlockNet:
    """Input (flattened) -> hidden[0] -> ... -> num_classes (default hidden: 1000)."""
    hidden = _hidden(spec, [1000])
    norm = spec.norm or "none"
    blocks, head = dense_stack(math.prod(input_shape), hidden, num_classes, spec, norm, front=[nn.Flatten()])
    return BlockNet(blocks, head, input_shape, num_classes, arch="mlp", hidden=hidden,
                    description=_description(spec, norm=norm))


# ----- vgg and the small conv net ----------------------------------------------------------------
def parse_layer_string(text: str) -> list[int | str]:
    """``"128,256,M,256"`` -> [128, 256, "M", 256]."""
    tokens = [t.strip() for t in text.split(",")]
    layout: list[int | str] = []
    for token in tokens:
        if token.upper() == "M":
            layout.append("M")
        elif token.isdigit() and int(token) > 0:
            layout.append(int(token))
        else:
            raise UserError(f"--channels expects positive channel counts and M (2x2 max-pool), e.g. 32,M,64,M; "
                            f"got {text!r}")
    if not layout or layout[0] == "M":
        raise UserError(f"--channels must start with a channel count, got {text!r}")
    return layout


def conv_stack(arch: str, layout: Sequence[int | str], spec: NetSpec, norm: str,
               input_shape: tuple[int, ...]) -> tuple[list[nn.Module], int]:
    """One conv3x3 block per channel count; each M adds a 2x2 max-pool to the block before it.

    Returns the blocks and the number of features they output (flattened).
    """
    c_in, height, width = _image_shape(arch, input_shape)
    plan: list[tuple[int, int]] = []  # (channels, pools after it)
    for token in layout:
        if token == "M":
            plan[-1] = (plan[-1][0], plan[-1][1] + 1)
        else:
            plan.append((_scaled(cast(int, token), spec.width), 0))  # a layout holds channel counts and M
    pools = sum(p for _, p in plan)
    if min(height, width) < 2 ** pools:
        raise UserError(f"images of {height}x{width} are too small for --channels {','.join(map(str, layout))}: "
                        f"its {pools} max-pools need at least {2 ** pools}x{2 ** pools}")
    blocks: list[nn.Module] = []
    for c_out, n_pools in plan:
        pool = None
        if n_pools:
            pool = nn.MaxPool2d(2) if n_pools == 1 else nn.Sequential(*(nn.MaxPool2d(2) for _ in range(n_pools)))
        blocks.append(conv_block(c_in, c_out, spec, norm, pool=pool))
        c_in = c_out
        for _ in range(n_pools):
            height, width = height // 2, width // 2
    return blocks, c_in * height * width


def vgg(spec: NetSpec, input_shape: tuple[int, ...], num_classes: int, arch: str = "vgg",
        default_channels: str = VGG8B, default_hidden: Sequence[int] = (1024,), default_norm: str = "batch") -> BlockNet:
    """local-loss's VGG notation: conv3x3 blocks with BN, M = 2x2 max-pool, then dense blocks."""
    channels = spec.channels or default_channels
    norm = spec.norm or default_norm
    hidden = _hidden(spec, default_hidden)
    blocks, features = conv_stack(arch, parse_layer_string(channels), spec, norm, input_shape)
    # its gradient back channels-last, as the conv stack's maps are (layout.py)
    dense, head = dense_stack(features, hidden, num_classes, spec, norm, front=[Flatten()])
    return BlockNet([*blocks, *dense], head, input_shape, num_classes, arch=arch, hidden=hidden,
                    description=_description(spec, channels=channels, norm=norm))


def convnet(spec: NetSpec, input_shape: tuple[int, ...], num_classes: int) -> BlockNet:
    """The first version's small conv net: conv3x3 + activation + 2x2 max-pool per entry, no BN."""
    return vgg(spec, input_shape, num_classes, arch="conv", default_channels="32,M,64,M", default_hidden=(),
               default_norm="none")


# ----- lenet -------------------------------------------------------------------------------------
LENET_CHANNELS = (32, 64, 128)


def lenet(spec: NetSpec, input_shape: tuple[int, ...], num_classes: int) -> BlockNet:
    """conv5x5 32 - pool - 64 - pool - 128 - global max-pool - fc 256 - head."""
    c_in, height, width = _image_shape("lenet", input_shape)
    if min(height, width) < 4:
        raise UserError(f"images of {height}x{width} are too small for --arch lenet: its two 2x2 max-pools "
                        f"need at least 4x4")
    norm = spec.norm or "none"
    c1, c2, c3 = (_scaled(c, spec.width) for c in LENET_CHANNELS)
    blocks = [conv_block(c_in, c1, spec, norm, kernel_size=5, pool=nn.MaxPool2d(2)),
              conv_block(c1, c2, spec, norm, kernel_size=5, pool=nn.MaxPool2d(2)),
              # A global max-pool: measured here, it beats a global average pool by 9 points with bp
              # and 24 with fa (docs/networks.md).
              conv_block(c2, c3, spec, norm, kernel_size=5, pool=nn.Sequential(nn.AdaptiveMaxPool2d(1), nn.Flatten()))]
    hidden = _hidden(spec, [256])
    dense, head = dense_stack(c3, hidden, num_classes, spec, norm)
    return BlockNet([*blocks, *dense], head, input_shape, num_classes, arch="lenet", hidden=hidden,
                    description=_description(spec, norm=norm))


# ----- resnet ------------------------------------------------------------------------------------
class ResidualUnit(nn.Module):
    """act( conv3x3-BN-act-conv3x3-BN (x) + shortcut(x) ); the shortcut is a 1x1 conv + BN where the shape changes."""

    def __init__(self, c_in: int, c_out: int, stride: int, norm: str, activation: str | None):
        super().__init__()
        with_norm = norm == "batch"

        def normalised(c: int) -> list[nn.Module]:
            return [nn.BatchNorm2d(c)] if with_norm else []

        self.residual = nn.Sequential(
            nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=not with_norm), *normalised(c_out),
            make_activation(activation),
            nn.Conv2d(c_out, c_out, 3, padding=1, bias=not with_norm), *normalised(c_out))
        if stride != 1 or c_in != c_out:
            self.shortcut: nn.Module = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=not with_norm),
                                                     *normalised(c_out))
        else:
            self.shortcut = nn.Identity()
        self.activation = make_activation(activation)

    def forward(self, x):
        return self.activation(self.residual(x) + self.shortcut(x))


register_layer(ResidualUnit, "container")  # its forward composes its children and adds the two paths


def resnet(spec: NetSpec, input_shape: tuple[int, ...], num_classes: int) -> BlockNet:
    """CIFAR ResNet-(6k+2): stem, 3 stages of k residual units (16, 32, 64 channels x width), global pool, head."""
    c_in, _, _ = _image_shape("resnet", input_shape)
    depth = DEFAULT_DEPTH if spec.depth is None else spec.depth
    if depth < 8 or (depth - 2) % 6:
        raise UserError(f"--depth must be 6k+2 with k >= 1 (8, 14, 20, 32, 56, 110), got {depth}")
    units = (depth - 2) // 6
    norm = spec.norm or "batch"
    stem_channels = _scaled(16, spec.width)
    blocks: list[nn.Module] = [conv_block(c_in, stem_channels, spec, norm)]
    c = stem_channels
    for stage, channels in enumerate((16, 32, 64)):
        c_out = _scaled(channels, spec.width)
        for unit in range(units):
            stride = 2 if stage > 0 and unit == 0 else 1
            blocks.append(ResidualUnit(c, c_out, stride, norm, spec.activation))
            c = c_out
    hidden = _hidden(spec, [])
    dense, head = dense_stack(c, hidden, num_classes, spec, norm, front=[nn.AdaptiveAvgPool2d(1), nn.Flatten()])
    return BlockNet([*blocks, *dense], head, input_shape, num_classes, arch="resnet", hidden=hidden,
                    description=_description(spec, depth=depth, norm=norm))


register_architecture("mlp", mlp, options=("hidden", "activation", "norm", "dropout"))
# On CPU, torch's pooling and batch-norm kernels run several times faster on channels-last maps than on
# the default layout, and a conv with channels-last weights makes channels-last maps from any input:
# a VGG step takes about 0.6x the time in every rule (docs/networks.md, "Memory layout").
register_architecture("conv", convnet, options=("hidden", "activation", "channels", "width", "norm", "dropout"),
                      memory_format=torch.channels_last)
register_architecture("lenet", lenet, options=("hidden", "activation", "width", "norm", "dropout"),
                      memory_format=torch.channels_last)
register_architecture("vgg", vgg, options=("hidden", "activation", "channels", "width", "norm", "dropout"),
                      memory_format=torch.channels_last)
# Not the ResNet: torch 2.13's CPU kernel for the weight gradient of a 1x1 stride-2 conv (its shortcuts)
# on channels-last maps writes out of bounds when the conv has fewer than 8 input channels (heap
# corruption, wrong gradients; --width 0.125 gives 2). tests/test_nets.py keeps channels-last nets free
# of such convs.
register_architecture("resnet", resnet, options=("hidden", "activation", "width", "depth", "norm"))
