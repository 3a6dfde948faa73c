"""Elastic weight consolidation (Kirkpatrick et al. 2017, PNAS 114(13), "Overcoming catastrophic forgetting
in neural networks").

After each task k the importance of every parameter is its diagonal Fisher information F_k at the
task's end point theta*_k; learning later tasks adds the quadratic penalty

    L_EWC = (lambda / 2) * sum_k sum_i F_k,i (theta_i - theta*_k,i)^2,

whose gradient lambda * sum_k F_k (theta - theta*_k) is added to the rule's update. The Fisher is
the mean over samples of the squared per-sample update: for BP that is the gradient of the
log-likelihood; for a rule that does not back-propagate it is the rule's own update signal (its
``.grad`` for one sample), the only credit the rule has. The labels are the model's own
predictions by default (the Fisher of the model's predictive distribution at its mode, as van de
Ven's implementation does), or the true labels (the "empirical Fisher").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

from ...errors import UserError
from ...rules.base import Rule
from ...spec import option
from ...training.config import smallest_step
from ..scenarios import Task
from .base import Strategy, add_penalty_gradient, register, rule_update, trainable


@dataclass
class FisherOptions:
    fisher_samples: int = option(1000, "training samples of each task the Fisher is averaged over")
    fisher_labels: Literal["predicted", "true"] = option(
        "predicted", "labels of the Fisher's log-likelihood: the model's predictions or the true labels")

    def validate(self) -> None:
        if self.fisher_samples < 1:
            raise UserError(f"option fisher_samples must be at least 1, got {self.fisher_samples}")


def diagonal_fisher(strategy: Strategy, task: Task, options: FisherOptions) -> list[torch.Tensor]:
    """Mean squared per-sample update of the rule over ``fisher_samples`` of the task's training samples
    (two at a time when batch norm cannot normalise one), with the head the task trained with."""
    rule = strategy.rule
    params = trainable(rule)
    data = task.data
    count = min(options.fisher_samples, len(data.y_train))
    index = torch.randperm(len(data.y_train), generator=strategy.generator)[:count]
    head = strategy.stream.head(task.index, task.index)
    fisher = [torch.zeros_like(p) for p in params]
    per_step = smallest_step(rule)
    starts = range(0, count - per_step + 1, per_step)
    for start in starts:
        x, y = data.x_train[index[start:start + per_step]], data.y_train[index[start:start + per_step]]
        if options.fisher_labels == "predicted":
            with rule.outputs_restricted(head):
                y = rule.predict(x)
        for f, g in zip(fisher, rule_update(rule, x, y, head)):
            f.add_(g.square())
    return [f / len(starts) for f in fisher]


@dataclass
class EWCConfig(FisherOptions):
    strength: float = option(1e4, "lambda: weight of the quadratic penalty")

    def validate(self) -> None:
        super().validate()
        if self.strength < 0:
            raise UserError(f"option strength must be at least 0, got {self.strength}")


@register("ewc")
class EWC(Strategy):
    """Elastic weight consolidation (Kirkpatrick 2017): a Fisher-weighted anchor per finished task."""

    Config = EWCConfig

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.fishers: list[list[torch.Tensor]] = []
        self.anchors: list[list[torch.Tensor]] = []

    def adjust_gradients(self, rule: Rule) -> None:
        params = trainable(rule)
        if not self.fishers:
            return
        with torch.no_grad():
            penalty = [torch.zeros_like(p) for p in params]
            for fisher, anchor in zip(self.fishers, self.anchors):
                for total, f, a, p in zip(penalty, fisher, anchor, params):
                    total.add_(f * (p - a))
            add_penalty_gradient(params, [self.config.strength * total for total in penalty])

    def end_task(self, task: Task) -> None:
        self.fishers.append(diagonal_fisher(self, task, self.config))
        self.anchors.append([p.detach().clone() for p in trainable(self.rule)])

    def extra_state(self) -> dict[str, Any]:
        return {"fishers": self.fishers, "anchors": self.anchors}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.fishers, self.anchors = state["fishers"], state["anchors"]
