"""The Strategy interface: how a rule's training step changes when tasks arrive one after another.

A strategy wraps the step of any rule the way Avalanche's plugins wrap a training step, and never
asks which rule runs. Its hooks, in the order the runner calls them:

* :meth:`Strategy.begin_task`, :meth:`Strategy.training_set` - the samples a task trains on (``joint``: every task so far);
* :meth:`Strategy.batch` - the batch the rule sees: extra samples (``replay``), or soft targets in
  place of the labels (``lwf``: the old model's outputs enter every rule's own class losses);
* :meth:`Strategy.adjust_gradients` - after the rule wrote its update into ``.grad``, before the
  optimisers step: per-parameter penalties (``ewc``, ``online-ewc``, ``si``) or a projection
  (``agem``);
* :meth:`Strategy.after_step`, :meth:`Strategy.end_task` - bookkeeping and consolidation.

Why a BP-free rule stays BP-free under every strategy: penalties act on each parameter alone;
replayed samples and soft targets go through the rule's own forward and losses; A-GEM projects
within each of the rule's parameter groups (one per block for local rules), so no block's update
depends on another block's; the Fisher and the importance weights are read from the rule's own
update signal (its ``.grad``), not from a backward pass through the network.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ...errors import UserError, did_you_mean
from ...rules.base import EmptyConfig, Rule, make_config, parse_options
from ..scenarios import Stream, Task

_REGISTRY: dict[str, type[Strategy]] = {}


def register(name: str) -> Callable[[type[Strategy]], type[Strategy]]:
    """Class decorator: make a strategy available as ``--strategy name``."""

    def decorate(cls: type[Strategy]) -> type[Strategy]:
        if name in _REGISTRY:
            raise ValueError(f"strategy {name!r} registered twice")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def get(name: str) -> type[Strategy]:
    if name not in _REGISTRY:
        raise UserError(f"unknown strategy {name!r}{did_you_mean(name, _REGISTRY)}; "
                        f"available: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def available() -> dict[str, str]:
    """Strategy name -> one-line description."""
    return {name: cls.summary() for name, cls in sorted(_REGISTRY.items())}


def strategy_config(name: str, assignments: list[str]) -> Any:
    """The typed, checked options of strategy ``name`` from ``--strategy-set key=value`` strings."""
    return parse_options(get(name).Config, assignments, owner=f"strategy {name}")


@dataclass
class Batch:
    """A training batch: inputs, targets (class indices (B,), or probabilities (B, outputs)) and each
    sample's task (which head answers it in task-incremental learning)."""

    x: torch.Tensor
    y: torch.Tensor
    task: torch.Tensor


class Strategy:
    """Naive fine-tuning; every other strategy overrides some hooks. ``Config`` holds its options."""

    name: ClassVar[str] = ""
    Config: ClassVar[type] = EmptyConfig
    #: the kinds of scenario ("task", "domain", "class") the strategy applies to
    kinds: ClassVar[tuple[str, ...]] = ("task", "domain", "class")

    def __init__(self, config: Any, rule: Rule, stream: Stream, seed: int = 0):
        self.config = config if config is not None else make_config(self.Config, {})
        self.rule = rule
        self.stream = stream
        #: the strategy's own random draws (replayed samples): seeded, and checkpointed with it
        self.generator = torch.Generator().manual_seed(seed * 7919 + 17)
        self.current = 0  # the task being learned (begin_task)
        self.check(stream)

    @classmethod
    def summary(cls) -> str:
        return (cls.__doc__ or "").strip().splitlines()[0]

    def check(self, stream: Stream) -> None:
        """Refuse a scenario the strategy cannot apply to (one line)."""
        if stream.kind not in self.kinds:
            raise UserError(f"strategy {self.name} does not apply to {stream.scenario} ({stream.kind}-incremental); "
                            f"it applies to {', '.join(k + '-incremental' for k in self.kinds)} scenarios")

    # ----- hooks --------------------------------------------------------------------------------
    def begin_task(self, task: Task) -> None:
        """Before the first step of ``task``."""
        self.current = task.index

    def training_set(self, task: Task) -> Batch:
        """All samples task ``task`` trains on."""
        return task_samples(task)

    def batch(self, batch: Batch, task: Task) -> Batch:
        """The batch the rule learns from at this step."""
        return batch

    def adjust_gradients(self, rule: Rule) -> None:
        """Change the rule's update (``.grad``) before the optimisers apply it."""

    def after_step(self, rule: Rule) -> None:
        """After the optimisers stepped."""

    def end_task(self, task: Task) -> None:
        """After the last step of ``task`` (consolidation)."""

    def statistics(self) -> dict[str, Any]:
        """Figures for result.json (JSON-serialisable)."""
        return {}

    # ----- checkpoints --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), **self.extra_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self.load_extra_state(state)

    def extra_state(self) -> dict[str, Any]:
        """Tensors and plain containers that carry the strategy from task to task."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        pass


# ----- helpers the strategies share ------------------------------------------------------------
def task_samples(task: Task) -> Batch:
    data = task.data
    return Batch(data.x_train, data.y_train, torch.full((len(data.y_train),), task.index, dtype=torch.long))


def concat(*batches: Batch) -> Batch:
    return Batch(torch.cat([b.x for b in batches]), torch.cat([b.y for b in batches]),
                 torch.cat([b.task for b in batches]))


def trainable(rule: Rule) -> list[nn.Parameter]:
    """The parameters a step may change, in a fixed order (the order of the penalties' state)."""
    return [p for p in rule.parameters() if p.requires_grad]


def grads(params: list[nn.Parameter]) -> list[torch.Tensor]:
    return [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in params]


def rule_update(rule: Rule, x: torch.Tensor, y: torch.Tensor, head: Any) -> list[torch.Tensor]:
    """The update the rule would make on (x, y) answered by ``head``, per trainable parameter: its own
    credit signal (its ``.grad``, before any optimiser), measured without changing the weights, the
    batch-norm statistics, the rule's gradients or its active head."""
    params = trainable(rule)
    saved_grads = [p.grad for p in params]
    was_training = rule.net.training
    try:
        for p in params:
            p.grad = None
        rule.net.train()
        with rule.outputs_restricted(head), rule.net.statistics_kept():
            rule.assign_credit(x, y)
        return grads(params)
    finally:
        for p, g in zip(params, saved_grads):
            p.grad = g
        rule.net.train(was_training)


def add_penalty_gradient(params: list[nn.Parameter], penalty: list[torch.Tensor]) -> None:
    for p, extra in zip(params, penalty):
        p.grad = extra.clone() if p.grad is None else p.grad + extra
