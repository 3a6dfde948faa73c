"""The Rule interface: how learning signals reach each block of a :class:`~localcredit.nets.blocknet.BlockNet`.

A rule's one job is :meth:`Rule.assign_credit`: given a batch, write into ``.grad`` of every
parameter the update direction the rule wants (gradient sign convention: the optimiser subtracts
it). Everything else is shared:

* :meth:`Rule.step` = zero grads -> assign_credit -> gradient hooks -> optimiser steps,
  the skeleton the Trainer calls (the hooks are where data-parallel averaging plugs in);
* while assign_credit runs, a rule may say which gradients are already final
  (:meth:`Rule.gradients_final`, or :meth:`Rule.final_as_accumulated` around a single backward
  pass), so that data parallel averages them while the rest of the step is still computed;
* local rules (``local = True``) also expose one layer's share of a step,
  :meth:`Rule.block_step_loss`, so that a block pipeline can run their layers on different
  processes (``localcredit.training.block_parallel``);
* :meth:`Rule.update_directions` = the same directions, collected per block, for ``align``;
* optimisers are real ``torch.optim`` ones, one per parameter group the rule declares
  (local rules declare one group per block).

A rule is an ``nn.Module`` so that its fixed random matrices and auxiliary heads travel with
``state_dict``/``to(device)`` exactly like the network's weights.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..data.base import checked_device
from ..errors import UserError, did_you_mean
from ..nets.architectures import NetSpec
from ..nets.architectures import build as build_net
from ..nets.blocknet import BlockNet
from ..spec import at_least, check, check_values, describe, from_assignments, one_of, option, positive, problems

_REGISTRY: dict[str, type[Rule]] = {}


def register(name: str) -> Callable[[type[Rule]], type[Rule]]:
    """Class decorator: make a rule available as ``localcredit.rules.get(name)``."""

    def decorate(cls: type[Rule]) -> type[Rule]:
        if name in _REGISTRY:
            raise ValueError(f"rule {name!r} registered twice")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def get(name: str) -> type[Rule]:
    if name not in _REGISTRY:
        raise UserError(f"unknown rule {name!r}{did_you_mean(name, _REGISTRY)}; "
                        f"available: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def available() -> dict[str, str]:
    """Rule name -> one-line description, for every registered rule."""
    return {name: cls.summary() for name, cls in sorted(_REGISTRY.items())}


def make_rule(name: str, net: BlockNet, *, optimizer: str = "adam", lr: float | None = None,
              momentum: float = 0.9, weight_decay: float = 0.0, device: str | torch.device | None = None,
              **options: Any) -> Rule:
    """The rule ``name`` training ``net``; ``options`` are the rule's own (``localcredit rules``), checked.

    ``device`` (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"auto"``: CUDA when there is one) moves the rule
    and ``net`` there; None leaves them where ``net`` is (the CPU for a model just built).
    The rule's fixed random matrices and auxiliary heads are drawn from torch's global generator:
    seed it (``torch.manual_seed``) for a repeatable run.
    """
    rule_cls = get(name)
    if not isinstance(net, BlockNet):
        raise UserError(f"make_rule needs a BlockNet (localcredit.blocknet(...)), got {type(net).__name__}")
    if not isinstance(optimizer, str):
        raise UserError(f"make_rule: optimizer={optimizer!r} is not one of {', '.join(DEFAULT_LR)}")
    for key, value in (("lr", lr), ("momentum", momentum), ("weight_decay", weight_decay)):
        if (value is not None or key != "lr") and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise UserError(f"make_rule: {key}={value!r} is not a number")
    optim = OptimConfig(optimizer=optimizer, lr=lr, momentum=momentum, weight_decay=weight_decay)
    check(optim, source="make_rule")
    where = checked_device(device, "make_rule") if device is not None else None
    rule = laid_out(rule_cls(net, make_config(rule_cls.Config, options), optim))
    return rule.to(where) if where is not None else rule


def laid_out(rule: Rule) -> Rule:
    """``rule`` with its network's and its own 4-d weights in the network's memory layout (in place).

    The parameters stay the same objects (the optimiser's), only their strides change; later moves
    to a device keep the layout.
    """
    # Module.to takes memory_format (converting 4-d tensors only), but torch's type stubs do not say so
    return rule.to(memory_format=rule.net.memory_format)  # type: ignore[call-overload]


@dataclass
class EmptyConfig:
    """This rule has no options."""


#: Learning rate per optimiser when neither --lr nor the rule says otherwise.
DEFAULT_LR = {"adam": 1e-3, "sgd": 0.05}


@dataclass(kw_only=True)
class OptimConfig:
    """The torch.optim optimiser every parameter group of a rule gets; its fields are options (``localcredit.spec``)."""

    TITLE: ClassVar[str] = "optimiser (one per parameter group of the rule)"

    optimizer: str = option("adam", "adam | sgd", check=one_of(*DEFAULT_LR))
    lr: float | None = option(None, "learning rate (default: the rule's; 1e-3 adam, 0.05 sgd for most)",
                                   parse=float, check=positive)
    momentum: float = option(0.9, "momentum of sgd", parse=float,
                                  check=lambda m: None if 0 <= m < 1 else f"must be in [0, 1), got {m}")
    weight_decay: float = option(0.0, "L2 weight decay of the optimiser (adam: added to the gradient, "
                                           "as torch.optim.Adam does)", parse=float, check=at_least(0))

    def make(self, params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
        if self.optimizer == "adam":
            # The fused kernel is one pass over the weights: measured here it halves Adam's share
            # of a 784-1000-10 epoch (the step costs as much as forward + backward otherwise). It reads
            # each gradient's memory as if laid out as its parameter's (torch 2.13, unchecked): code that
            # sets p.grad must keep p's strides (nets/layout.in_layout_of; training/data_parallel.py).
            return torch.optim.Adam(params, lr=self.lr or DEFAULT_LR["adam"], weight_decay=self.weight_decay, fused=True)
        if self.optimizer == "sgd":
            return torch.optim.SGD(params, lr=self.lr or DEFAULT_LR["sgd"], momentum=self.momentum,
                                   weight_decay=self.weight_decay)
        raise UserError(f"unknown optimizer {self.optimizer!r}; choose adam or sgd")


def parse_options(config_cls: type, assignments: Sequence[str], owner: str = "this rule") -> Any:
    """A rule's (or a strategy's) Config from ``key=value`` strings, each read as its field's type."""
    return make_config(config_cls, from_assignments(config_cls, list(assignments), owner), owner)


def make_config(config_cls: type, values: dict[str, Any], owner: str = "this rule") -> Any:
    """A rule's (or a strategy's) Config from Python values (``lc.make_rule(..., loss="ce")``): names and
    types checked, then every option's range check and the Config's own ``validate`` (what ties options)."""
    check_values(config_cls, values, owner)
    config = config_cls(**values)
    for f, problem in problems(config)[:1]:
        raise UserError(f"option {f.name} {problem}")
    validate = getattr(config, "validate", None)
    if validate is not None:
        validate()
    return config


def describe_options(config_cls: type) -> list[dict[str, Any]]:
    """Name, type, default and help of every option, for ``localcredit rules``."""
    return describe(config_cls)


#: A step's logged figures by name ("loss" among them): floats, or 0-dim tensors that may still be
#: computing on the device. Reading a tensor (``.item()``) makes the host wait for the device, so a
#: rule returns ``loss.detach()`` and the caller decides when to read (the Trainer: every few steps
#: on CUDA, ``localcredit.training.progress.read_figures``).
StepFigures = dict[str, float | torch.Tensor]

#: ``hook(rule, stats)`` runs after assign_credit, before the optimisers step. It may rewrite the
#: gradients and the step's logged figures in place: data-parallel averaging reduces both (the
#: gradients' reductions started during assign_credit), so every process logs (and checks for
#: divergence) the same global figures.
GradientHook = Callable[["Rule", StepFigures], None]

#: ``listener(params)`` learns, while assign_credit is still running, that the gradients of
#: ``params`` are final for this step (the rule writes nothing more into them before the gradient
#: hooks run). Data parallel starts averaging them at once, overlapping the rest of the step.
GradientsFinal = Callable[[Sequence[nn.Parameter]], None]


# ----- class losses over the active classes (multi-head outputs, soft targets) --------------------
def masked_scores(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``scores`` (B, ..., C) with the classes outside ``mask`` (bool, broadcasting) at the dtype's most
    negative finite number.

    Not -inf: exp() of it underflows to exactly 0 as exp(-inf) does, so a cross-entropy against class
    indices, and its gradient, are bit for bit those with -inf; but a target distribution's term there
    is 0 * (finite) = 0, where 0 * log(0) = 0 * -inf would make the loss and every gradient NaN. The
    fill's backward gives the masked scores no gradient at all.
    """
    return scores.masked_fill(~mask, torch.finfo(scores.dtype).min)


def target_distribution(y: torch.Tensor, num_classes: int, mask: torch.Tensor | None = None,
                        dtype: torch.dtype | None = None) -> torch.Tensor:
    """(B, C) target probabilities: the one-hot rows of class indices ``y`` (B,), or ``y`` itself when it is a
    probability matrix (B, C) (a soft target, e.g. a teacher's, used as it is).

    With ``mask`` (bool, (C,) or (B, C): the active classes) the inactive classes get probability 0
    and each row is renormalised over its active ones (a row without mass there stays 0: its sample
    adds nothing to the loss). A one-hot row of an active class is unchanged.
    """
    if y.is_floating_point():
        target = y if dtype is None else y.to(dtype)
    else:
        # scatter, not F.one_hot: one_hot reads y's min and max back to the host to check them (two
        # syncs per call, each block of a local rule calls it); the labels were checked when loaded.
        target = torch.zeros(len(y), num_classes, dtype=dtype or torch.get_default_dtype(), device=y.device)
        target.scatter_(1, y.unsqueeze(1), 1.0)
    if mask is None:
        return target
    target = target * mask
    return target / target.sum(1, keepdim=True).clamp_min(torch.finfo(target.dtype).tiny)


def class_loss(scores: torch.Tensor, y: torch.Tensor, kind: str = "ce", mask: torch.Tensor | None = None) -> torch.Tensor:
    """A class loss of ``scores`` (B, C), mean over the batch, over the classes of ``mask`` only (None: all).

    ``y``: class indices (B,) or target probabilities (B, C) (:func:`target_distribution`). ``kind``:
    ``ce`` cross-entropy; ``mse`` 0.5 ||s - t||^2; ``hinge`` the one-vs-all square hinge
    sum_c max(0, 1 - (2 t_c - 1) s_c)^2. An inactive class takes no probability mass, adds nothing
    and gets no gradient; nothing is NaN (:func:`masked_scores`).
    """
    if kind == "ce":
        if y.is_floating_point():
            y = target_distribution(y, scores.shape[1], mask, scores.dtype)
        return F.cross_entropy(scores if mask is None else masked_scores(scores, mask), y)
    target = target_distribution(y, scores.shape[1], mask, scores.dtype)
    if kind == "mse":
        per_class = (scores - target).pow(2)
        return 0.5 * (per_class if mask is None else per_class * mask).sum(1).mean()
    if kind == "hinge":
        signs = 2 * target - 1  # one-vs-all: +1 for the true class, -1 for the others
        per_class = F.relu(1 - signs * scores).pow(2)
        return (per_class if mask is None else per_class * mask).sum(1).mean()
    raise ValueError(f"unknown loss {kind!r}")


class Rule(nn.Module):
    """Base class of every learning rule. Subclasses implement :meth:`assign_credit`."""

    name: ClassVar[str] = "?"
    Config: ClassVar[type] = EmptyConfig
    default_arch: ClassVar[str] = "mlp"  # what --arch means when not given
    #: the architectures this rule can train (None: any)
    networks: ClassVar[tuple[str, ...] | None] = None
    #: True when every layer learns from a signal computed at that layer alone, on a detached input:
    #: such layers can train at the same time on different processes (``--parallel blocks``).
    #: A local rule implements :meth:`block_step_loss`.
    local: ClassVar[bool] = False
    #: Why this rule's step waits for the device by design (a decision taken on values it computed),
    #: or None: its step never waits (``benchmarks/gpu.py`` checks that on CUDA, and only counts the
    #: waits of a rule that names them here).
    syncs_per_step: ClassVar[str | None] = None

    def __init__(self, net: BlockNet, config: Any = None, optim: OptimConfig | None = None):
        super().__init__()
        self.net = net
        self.config = config if config is not None else self.Config()
        self.optim = optim if optim is not None else OptimConfig()
        if self.optim.lr is None and self.optim.optimizer in DEFAULT_LR:
            self.optim = dataclasses.replace(self.optim, lr=self.default_lr(self.optim.optimizer, net.arch))
        self.gradient_hooks: list[GradientHook] = []
        self.final_gradient_listeners: list[GradientsFinal] = []
        self._optimizers: list[torch.optim.Optimizer] | None = None
        self.active_classes: torch.Tensor | None = None  # see restrict_outputs

    # ----- what a rule defines -------------------------------------------------------------
    @classmethod
    def summary(cls) -> str:
        return (cls.__doc__ or "").strip().splitlines()[0]

    @classmethod
    def build_network(cls, spec: NetSpec, input_shape: tuple[int, ...], num_classes: int) -> BlockNet:
        """The network ``spec`` describes (its arch defaulting to the rule's ``default_arch``)."""
        arch = spec.arch or cls.default_arch
        spec = dataclasses.replace(spec.net_spec(), arch=arch)
        if not cls.trains(arch):
            assert cls.networks is not None  # trains() accepts every arch when networks is None
            raise UserError(f"rule {cls.name} needs --arch {' or '.join(cls.networks)}, not {arch!r}")
        return build_net(spec, input_shape, num_classes)

    @classmethod
    def trains(cls, arch: str) -> bool:
        return cls.networks is None or arch in cls.networks

    @classmethod
    def default_lr(cls, optimizer: str, arch: str | None = None) -> float:
        """The learning rate when --lr is not given, on networks of ``arch`` (the benchmark tunes around it)."""
        return DEFAULT_LR[optimizer]

    def assign_credit(self, x: torch.Tensor, y: torch.Tensor) -> StepFigures:
        """Write this rule's update direction into ``p.grad``; return scalars to log (incl. ``loss``):
        floats or detached 0-dim tensors, never read on the host here (see :data:`StepFigures`)."""
        raise NotImplementedError

    def parameter_groups(self) -> list[list[nn.Parameter]]:
        """Parameters that share one optimiser; local rules return one group per block."""
        return [[p for p in self.parameters() if p.requires_grad]]

    def gradient_order(self) -> list[nn.Parameter]:
        """Trainable parameters in the order a step finishes their gradients (data parallel buckets
        its all-reduce in this order). Default: one backward pass through the network, which reaches
        the head first and the first block last."""
        return [p for p in self.parameters() if p.requires_grad][::-1]

    # ----- what a local rule defines as well ------------------------------------------------
    def block_step_loss(self, l: int, h_in: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Layer ``l``'s share of a training step (``l == len(net.blocks)`` is the head); local rules only.

        Runs layer ``l`` on ``h_in`` (detached first, so nothing reaches the layers below) and
        returns its output, detached, for the layer above, and the local loss whose ``backward``
        writes layer ``l``'s update into ``.grad`` (None when the layer does not train now). Inside
        a group of :meth:`layer_groups` the input is not detached, the output keeps its graph, and
        only the group's last layer returns a loss. A local rule's ``assign_credit`` is exactly
        these calls, layer after layer.
        """
        raise NotImplementedError(f"rule {self.name!r} is not local: its layers do not learn from local signals only")

    def train_layers(self, layers: Sequence[int], h: torch.Tensor, y: torch.Tensor,
                     on_output: Callable[[torch.Tensor], None] | None = None
                     ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The local step loop: ``layers``' (consecutive) share of one training step from their input ``h``.

        Each layer's local loss is backpropagated as soon as it is computed, which frees that group's graph
        before the next one runs. A whole step runs it on every layer in use; a block-pipeline stage on its
        own layers (``on_output`` gets the last layer's output before its backward pass: the next stage can
        start on it). Returns that output and the figures: ``loss``, the sum of the layers' losses, and
        ``head_loss`` where the head was among the layers.
        """
        total = h.new_zeros(())
        figures: dict[str, torch.Tensor] = {}
        for l in layers:
            h, loss = self.block_step_loss(l, h, y)
            if on_output is not None and l == layers[-1]:
                on_output(h)
            if loss is None:
                continue
            loss.backward()
            self.layer_trained(l)
            total += loss.detach()
            if l == len(self.net.blocks):
                figures["head_loss"] = loss.detach()
        return h, {"loss": total, **figures}

    def layer_trained(self, l: int) -> None:
        """Layer ``l``'s local loss has been backpropagated (its group's gradients are final this step)."""

    def layer_groups(self) -> list[range]:
        """Consecutive layers that learn as one (a local rule's module): a block pipeline keeps each
        group on one process. Default: every layer on its own."""
        return [range(l, l + 1) for l in range(len(self.net.layers))]

    def layers_in_use(self) -> int:
        """How many layers, from the input up, a training step runs now (the layers above it idle)."""
        return len(self.net.layers)

    def block_counters(self) -> list[torch.Tensor]:
        """Per-block tallies a local rule keeps (row l: layer l). In a block pipeline each process
        fills only the rows of its own layers, and the rows are summed across processes."""
        return []

    def task_loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The loss whose BP gradient ``align`` compares against: the cross-entropy of :meth:`class_loss`."""
        return self.class_loss(logits, y)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.mask_outputs(self.net(x))

    # ----- class losses, over the active classes (multi-head outputs, soft targets) ----------
    # Every class loss of every rule goes through these methods: the task loss, a local rule's
    # auxiliary and head losses, the targets built from the labels. ``y`` is class indices (B,) or
    # target probabilities (B, C) (soft targets, e.g. for distillation), as ``step`` takes it.
    def class_loss(self, scores: torch.Tensor, y: torch.Tensor, kind: str = "ce") -> torch.Tensor:
        """``kind`` (ce, mse, hinge) of class scores ``scores`` (B, C) against ``y``, mean over the batch, over
        the active classes only (:func:`class_loss`): the others get no gradient."""
        return class_loss(scores, y, kind, self.output_mask(scores))

    def target_distribution(self, y: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """(B, C) target probabilities for ``y`` (one-hot rows of indices, or soft targets as they are), zero
        outside the active classes and renormalised over them (:func:`target_distribution`)."""
        return target_distribution(y, self.net.num_classes, self.output_mask(y), dtype)

    def masked_scores(self, scores: torch.Tensor) -> torch.Tensor:
        """Class scores (B, ..., C) for a loss a rule writes itself: the inactive classes' at the most negative
        finite number (:func:`masked_scores`: no probability mass, no gradient, no NaN)."""
        mask = self.output_mask(scores)
        return scores if mask is None else masked_scores(scores, mask)

    def output_mask(self, scores: torch.Tensor) -> torch.Tensor | None:
        """The active classes as a bool tensor broadcasting against ``scores`` (B, ..., C), or against the
        targets ``y`` (B,) / (B, C); None when every class is active."""
        mask = self.active_classes
        if mask is None:
            return None
        if mask.dim() == 2:
            if len(mask) != len(scores):
                raise ValueError(f"the per-sample output mask (restrict_outputs) has {len(mask)} rows for a batch "
                                 f"of {len(scores)}")
            mask = mask.view(len(mask), *[1] * (scores.dim() - 2), mask.shape[1])
        return mask.to(scores.device)

    # ----- multi-head outputs (task-incremental learning) ----------------------------------
    def restrict_outputs(self, classes: Sequence[int] | torch.Tensor | None) -> None:
        """Let only some classes compete in every class loss and in predictions (None: all classes).

        A per-task head carved out of the shared output layer. ``classes``: class ids (a list or an
        integer tensor) or a bool (C,) mask, one head for the whole batch; or a bool (B, C) mask,
        row b the head of sample b of the batches that follow (task-incremental replay: replayed
        samples answer in their own task's head). Predictions and evaluation take a (C,) form.
        The inactive classes take no probability mass and receive no error in any class loss
        (:meth:`class_loss`, :meth:`target_distribution`, :meth:`masked_scores`); their logits are
        -inf in predictions (:meth:`logits`). The mask is kept as ``active_classes``.
        """
        if classes is None:
            self.active_classes = None
            return
        num_classes = self.net.num_classes
        if isinstance(classes, torch.Tensor) and classes.dtype == torch.bool:
            if classes.dim() not in (1, 2) or classes.shape[-1] != num_classes:
                raise ValueError(f"an output mask is (C,) or (B, C) with C = {num_classes}, got {tuple(classes.shape)}")
            mask = classes
        else:
            mask = torch.zeros(num_classes, dtype=torch.bool)
            mask[classes.tolist() if isinstance(classes, torch.Tensor) else list(classes)] = True
        self.active_classes = mask.to(next(self.net.parameters()).device)

    @contextlib.contextmanager
    def outputs_restricted(self, classes: Sequence[int] | torch.Tensor | None) -> Iterator[None]:
        """:meth:`restrict_outputs` inside, the head that was active before restored on the way out
        (an evaluation or a measurement in the middle of training a task)."""
        saved = self.active_classes
        self.restrict_outputs(classes)
        try:
            yield
        finally:
            self.active_classes = saved

    def mask_outputs(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits for predictions: the inactive classes' at -inf."""
        mask = self.output_mask(logits)
        return logits if mask is None else logits.masked_fill(~mask, float("-inf"))

    def start_epoch(self, epoch: int, epochs: int) -> None:
        """Called by the Trainer before each epoch (0-based); schedules hook in here."""

    def needs_start_epoch(self) -> bool:
        """True while the rule cannot train: its schedule depends on the epoch and :meth:`start_epoch`
        was never called (:meth:`step` then refuses, rather than train outside the schedule)."""
        return False

    def statistics(self) -> dict[str, Any]:
        """Rule-specific figures for result.json (JSON-serialisable)."""
        return {}

    # ----- shared machinery ----------------------------------------------------------------
    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        # Built lazily: subclasses add their feedback matrices or heads after super().__init__().
        if self._optimizers is None:
            self._optimizers = [self.optim.make(group) for group in self.parameter_groups() if group]
        return self._optimizers

    def gradients_final(self, params: Sequence[nn.Parameter]) -> None:
        """Called by a rule inside assign_credit: the gradients of ``params`` will not change again
        this step. Optional (whatever is not announced is final when assign_credit returns); a
        promise broken would let processes of a data-parallel run apply different updates."""
        for listener in self.final_gradient_listeners:
            listener(params)

    @contextlib.contextmanager
    def final_as_accumulated(self) -> Iterator[None]:
        """Around a rule's one backward call of a step: each gradient is final once autograd has
        accumulated it (one backward call accumulates into each parameter at most once), so it is
        announced (:meth:`gradients_final`) right then, while the backward goes on to the layers below."""
        if not self.final_gradient_listeners:  # nobody listens: no hooks to pay for
            yield
            return
        handles = [p.register_post_accumulate_grad_hook(lambda param: self.gradients_final((param,)))
                   for p in self.parameters() if p.requires_grad]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.parameters():
            p.grad = None

    def step(self, x: torch.Tensor, y: torch.Tensor) -> StepFigures:
        """One training step: the rule's credit assignment, then the optimisers; the logged figures.

        A rule on a per-epoch schedule (:meth:`needs_start_epoch`) refuses to step until
        :meth:`start_epoch` was called."""
        if self.needs_start_epoch():
            raise UserError(f"rule {self.name} follows a per-epoch schedule: call rule.start_epoch(epoch, epochs) "
                            f"before each epoch's steps (the Trainer and lc.fit do)")
        self.net.train()
        self.zero_grad()
        stats = self.assign_credit(x, y)
        for hook in self.gradient_hooks:
            hook(self, stats)
        for optimizer in self.optimizers:
            optimizer.step()
        return stats

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        self.net.eval()
        return self.logits(x).argmax(dim=1)

    def update_directions(self, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
        """Per trainable block (hidden blocks, then head): the flattened update direction, before the optimiser.

        A measurement, not a training step: batch-norm statistics are left as they were.
        """
        self.net.train()
        self.zero_grad()
        with self.net.statistics_kept():
            self.assign_credit(x, y)
        directions = [flat_grad(layer.parameters()) for layer in self.net.layers]
        self.zero_grad()
        return directions

    def checkpoint_state(self) -> dict[str, Any]:
        return {"rule": self.state_dict(), "optimizers": [o.state_dict() for o in self.optimizers],
                "extra": self.extra_state()}

    def load_checkpoint_state(self, state: dict[str, Any]) -> None:
        self.load_state_dict(state["rule"])
        for optimizer, saved in zip(self.optimizers, state["optimizers"], strict=True):
            optimizer.load_state_dict(saved)
        self.load_extra_state(state.get("extra", {}))

    def extra_state(self) -> dict[str, Any]:
        """Non-tensor bookkeeping to checkpoint (plain Python containers only)."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        pass


def flat_grad(params: Iterable[nn.Parameter]) -> torch.Tensor:
    """All gradients of ``params`` as one vector (zeros where a parameter got none)."""
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
