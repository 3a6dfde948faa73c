"""Networks as a sequence of blocks plus a head, with no knowledge of how they learn.

A block is any ``nn.Module`` mapping h_{l-1} to h_l: one layer, conv-BN-activation-pool-dropout, a
residual unit, a whole stage. The block is the unit of *credit*: a local rule puts one local loss
on each block's output, DFA injects its error there, ``align`` reports one figure per block. The
head is the last block; its output is the logits.

A network's blocks can be cut into contiguous **modules** (:meth:`BlockNet.in_modules`, ``--modules K``):
the result is a BlockNet whose blocks are the modules, so a rule that puts one loss on each block puts
one on each module, and a block pipeline keeps each module on one process, without knowing about it.

The network owns its forward. Rules run it through :meth:`BlockNet.walk` (every block's output,
optionally on detached inputs) or :meth:`BlockNet.block_forward` (one block), never by reaching into
a block; rules that need per-layer math inside blocks get it from :mod:`localcredit.nets.layers`.

Batch-norm statistics change only in training forwards of blocks that train: a frozen block runs
in eval mode, shapes are found in eval mode without gradients, and measurements that are not
training (``align``) run inside :meth:`BlockNet.statistics_kept`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ..errors import UserError
from .flops import balanced_split, layer_flops


class BlockNet(nn.Module):
    """``blocks`` (hidden) followed by ``head`` (the output block, logits)."""

    def __init__(self, blocks: Sequence[nn.Module], head: nn.Module, input_shape: Sequence[int],
                 num_classes: int, arch: str = "custom", hidden: Sequence[int] = (),
                 description: dict[str, Any] | None = None):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.head = head
        self.input_shape = tuple(input_shape)
        self.num_classes = num_classes
        self.arch = arch
        self.hidden = list(hidden)  # the dense hidden sizes it was built with, for result.json
        self.description = dict(description or {})
        #: the layout a rule keeps this net's 4-d weights in (``make_rule`` converts them, and the
        #: rule's own 4-d weights, once): channels-last for the built-in conv nets, whose pooling and
        #: batch norm run several times faster on it on CPU; the default layout for any other net
        self.memory_format = torch.contiguous_format
        #: per-sample shape of every layer's output (hidden blocks, then the head)
        self.output_shapes = probe_output_shapes(self.layers, self.input_shape)
        if self.output_shapes[-1] != (num_classes,):
            raise UserError(f"the head's output has per-sample shape {self.output_shapes[-1]}; "
                            f"it must be ({num_classes},), one logit per class")

    @property
    def layers(self) -> list[nn.Module]:
        """Every block that trains, hidden ones first, the head last."""
        return [*self.blocks, self.head]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x)

    def block_forward(self, l: int, h: torch.Tensor, *, detach_input: bool = False,
                      frozen: bool = False) -> torch.Tensor:
        """Layer ``l`` (``len(blocks)`` is the head) on ``h``.

        ``detach_input``: no gradient reaches the layers below. ``frozen``: the block runs in eval
        mode and without a graph, as a fixed feature extractor (its statistics stay as they are).
        """
        block = self.layers[l]
        if detach_input:
            h = h.detach()
        if not frozen:
            return block(h)
        block.eval()
        try:
            with torch.no_grad():
                return block(h)
        finally:
            block.train(self.training)

    def walk(self, x: torch.Tensor, *, detach_inputs: bool = False) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """(l, h_{l-1}, h_l) for every layer, the head last; with ``detach_inputs`` each layer's
        input is detached, so a gradient from h_l reaches only layer l."""
        h = x
        for l in range(len(self.layers)):
            h_in = h.detach() if detach_inputs else h
            h = self.block_forward(l, h_in)
            yield l, h_in, h

    def hidden_shapes(self) -> list[tuple[int, ...]]:
        """Per-sample shape of each hidden block's output h_l."""
        return self.output_shapes[:-1]

    def in_modules(self, modules: int | Sequence[int]) -> BlockNet:
        """This network with its hidden blocks cut into contiguous **modules**, each one block of the result.

        ``modules``: K, for K modules of about equal forward FLOPs (:func:`module_sizes`), or the number
        of blocks in each module, e.g. ``[1, 3, 3, 2]``. The head stays a block of its own. A rule sees
        each module as one block: a local rule puts its loss on the module's output (the output of its
        last block) and detaches the module's input, so inside a module the error travels by backprop
        and no error crosses a module. A module of one block is that block itself, so cutting into as
        many modules as blocks gives a network whose blocks, weights and forward are this one's.

        The blocks are used as they are, not copied: both networks share their weights.
        """
        sizes = module_sizes(self, modules)
        blocks, start = [], 0
        for size in sizes:
            group = list(self.blocks[start:start + size])
            blocks.append(group[0] if size == 1 else nn.Sequential(*group))
            start += size
        grouped = BlockNet(blocks, self.head, self.input_shape, self.num_classes, arch=self.arch,
                           hidden=self.hidden, description={**self.description, "modules": sizes})
        grouped.memory_format = self.memory_format  # the same layers: the same layout
        return grouped

    @contextmanager
    def statistics_kept(self) -> Iterator[None]:
        """Forwards inside leave every buffer (batch-norm statistics) as it was.

        The buffers are restored on the way out, in place: run the backward passes inside too
        (autograd checks that the buffers it saved are unchanged).
        """
        saved = [(buffer, buffer.clone()) for buffer in self.buffers()]
        try:
            yield
        finally:
            with torch.no_grad():
                for buffer, value in saved:
                    buffer.copy_(value)


def probe_output_shapes(layers: Sequence[nn.Module], input_shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Per-sample output shape of each layer, from one eval-mode forward of zeros without gradients.

    Eval mode: batch norm uses (and keeps) its running statistics, dropout is off. A layer that
    cannot take its input is a user error naming it.
    """
    modes = [(m, m.training) for layer in layers for m in layer.modules()]
    parameter = next((p for layer in layers for p in layer.parameters()), None)
    h = torch.zeros(2, *input_shape, device=parameter.device if parameter is not None else None,
                    dtype=parameter.dtype if parameter is not None else None)
    shapes = []
    try:
        for layer in layers:
            layer.eval()
        with torch.no_grad():
            for l, layer in enumerate(layers):
                try:
                    h = layer(h)
                except RuntimeError as exc:
                    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                    raise UserError(f"block {l} ({type(layer).__name__}) cannot take an input of per-sample "
                                    f"shape {tuple(h.shape[1:])}: {first}") from None
                shapes.append(tuple(h.shape[1:]))
    finally:
        for module, training in modes:
            module.training = training
    return shapes


def module_sizes(net: BlockNet, modules: int | Sequence[int]) -> list[int]:
    """Blocks per module when ``net``'s hidden blocks are cut into ``modules`` (see :meth:`BlockNet.in_modules`).

    K (an int): the K contiguous modules whose largest forward FLOPs per sample is smallest (of those cuts,
    the most even, then the earliest; :func:`~localcredit.nets.flops.balanced_split`). A list: the counts
    themselves, checked to be positive and to add up to the number of hidden blocks.
    """
    blocks = len(net.blocks)
    if isinstance(modules, bool) or not isinstance(modules, (int, list, tuple)):
        raise UserError(f"modules must be K (an int) or a list of blocks per module, got {modules!r}")
    if isinstance(modules, int):
        if not 1 <= modules <= blocks:
            raise UserError(f"cannot cut {blocks} hidden block(s) into {modules} modules: K must be between 1 and "
                            f"{blocks} (the head is a block of its own, in no module)")
        return balanced_split(layer_flops(list(net.blocks), net.input_shape), modules)
    sizes = list(modules)
    if not sizes or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in sizes) or sum(sizes) != blocks:
        raise UserError(f"modules {','.join(map(str, sizes)) or '(none)'} must be positive counts of blocks that add "
                        f"up to the network's {blocks} hidden block(s) (the head is a block of its own)")
    return sizes


def has_parameters(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


def blocknet(model: nn.Module | Sequence[nn.Module], input_shape: Sequence[int], num_classes: int,
             group: Sequence[int] | None = None, cut_at: Sequence[str] | None = None) -> BlockNet:
    """Your own model as a BlockNet: blocks of the children of ``model`` (an ``nn.Sequential`` or a list),
    or, with ``cut_at``, of any traceable model's forward; the last block is the head.

    A block needs trainable parameters. Without ``group``, each child with parameters is a block and the
    children without (activations, pooling, Flatten) join the block before them (leading ones the
    next): ``Conv2d, ReLU, MaxPool2d, Flatten, Linear`` makes two blocks. ``group`` joins consecutive
    children into one block instead: ``group=[4, 4, 2]`` makes blocks of the first four children, the
    next four, and the last two (the head).

    ``cut_at=["layer1", "layer2"]`` traces ``model`` (any ``nn.Module`` whose forward ``torch.fx`` can
    trace, e.g. a ResNet with its own forward) and cuts its forward after each named submodule:
    block i runs from the previous cut to the end of ``cut_at[i]``, the head everything after the last
    (:mod:`localcredit.nets.traced`).

    The modules are used as they are, not copied: the BlockNet and ``model`` share their weights.
    """
    if len(input_shape) == 0 or any(int(s) < 1 for s in input_shape):
        raise UserError(f"input_shape must be the per-sample shape, e.g. (1, 28, 28); got {tuple(input_shape)}")
    if cut_at is not None:
        if group is not None:
            raise UserError("blocknet takes group (children of an nn.Sequential) or cut_at (a traced forward), not both")
        if not isinstance(model, nn.Module):
            raise UserError(f"blocknet(cut_at=...) takes an nn.Module; got {type(model).__name__}")
        from .traced import trace_blocks  # torch.fx, only for models that need it

        pieces = trace_blocks(model, cut_at)
        names = [f"up to {name}" for name in cut_at] + [f"after {cut_at[-1]}" if cut_at else "the whole forward"]
        _check_blocks(pieces, names, hint="cut elsewhere with cut_at=[...]")
        return BlockNet(pieces[:-1], pieces[-1], tuple(int(s) for s in input_shape), num_classes, arch="custom",
                        description={"model": type(model).__name__, "cut_at": list(cut_at)})
    if isinstance(model, nn.Sequential) or (isinstance(model, (list, tuple)) and
                                            all(isinstance(m, nn.Module) for m in model)):
        children = list(model)
    else:
        raise UserError(f"blocknet takes an nn.Sequential (or a list of modules) whose children run in order, "
                        f"or any model with cut_at=[submodule names]; got {type(model).__name__}")
    groups = _grouped(children, group)
    if len(groups) < 1:
        raise UserError("blocknet needs at least one module (the head)")
    layers = [g[0] if len(g) == 1 else nn.Sequential(*g) for g in groups]
    _check_blocks(layers, [", ".join(type(m).__name__ for m in g) for g in groups],
                  hint="join it to a neighbour with group=[...]")
    return BlockNet(layers[:-1], layers[-1], tuple(int(s) for s in input_shape), num_classes, arch="custom",
                    description={"blocks": [[type(m).__name__ for m in g] for g in groups]})


def _check_blocks(layers: Sequence[nn.Module], names: Sequence[str], hint: str) -> None:
    for l, layer in enumerate(layers):
        if not has_parameters(layer):
            what = "the head" if l == len(layers) - 1 else f"block {l}"
            raise UserError(f"{what} ({names[l]}) has no trainable parameters: {hint}")


def _grouped(children: list[nn.Module], group: Sequence[int] | None) -> list[list[nn.Module]]:
    if group is None:
        # Each child with parameters a block; the others join the block before them (leading ones the next).
        groups: list[list[nn.Module]] = []
        leading: list[nn.Module] = []
        for child in children:
            if has_parameters(child):
                groups.append([*leading, child])
                leading = []
            elif groups:
                groups[-1].append(child)
            else:
                leading.append(child)
        return groups if not leading else [leading]  # only parameter-free children: refused by the check
    sizes = list(group)
    if any(not isinstance(n, int) or n < 1 for n in sizes) or sum(sizes) != len(children):
        raise UserError(f"group={sizes} must be positive counts of consecutive children that add up to the "
                        f"model's {len(children)} children")
    groups, start = [], 0
    for n in sizes:
        groups.append(children[start:start + n])
        start += n
    return groups
