"""The training recipe: :class:`TrainSpec` (the same for every rule), :class:`TrainConfig` (the recipe
plus how the loop reports), learning-rate schedules, and the data order and step sizes of an epoch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..errors import UserError
from ..rules.base import Rule
from ..spec import at_least, check, one_of, option, parse_ints, positive
from .augment import parse_augment
from .loggers import logger_problem
from .runfiles import parse_checkpoint_every

LR_SCHEDULES = ("none", "cosine", "step")


@dataclass(kw_only=True)
class TrainSpec:
    """The training recipe, the same for every rule: its fields are options (``localcredit.spec``)."""

    TITLE: ClassVar[str] = "training recipe (the same for every rule)"

    epochs: int = option(3, "epochs to train", parse=int, check=at_least(1))
    batch_size: int = option(128, "samples per training step", parse=int, check=at_least(1))
    seed: int = option(0, "seed of the weights, the rule's random matrices, the data order and the augmentation",
                       parse=int)
    limit_train: int | None = option(None, "train on the first N training samples only", parse=int,
                                     check=at_least(1))
    eval_every: int = option(1, "evaluate the test split every N epochs (and after the last)", parse=int,
                             check=at_least(1))
    augment: str = option("none", "crop:N (random crop, N pixels of padding) and/or flip (horizontal, p = 1/2), "
                                  "e.g. crop:2,flip", parse=lambda text: str(parse_augment(text)))
    lr_schedule: str = option("none", "none | cosine (to 0 over --epochs) | step (x --lr-decay after each of "
                                      "--milestones)", check=one_of(*LR_SCHEDULES))
    milestones: list[int] = option([], "epochs after which the step schedule decays the learning rate, e.g. 50,75",
                                   parse=parse_ints, metavar="E,E,...",
                                   check=lambda m: None if all(e >= 1 for e in m) and m == sorted(set(m))
                                   else f"must be increasing positive epochs, got {m}")
    lr_decay: float = option(0.1, "factor of the step schedule", parse=float, check=positive)
    log: str = option("none", "the figures of every step and epoch while it trains: none | csv (OUT/logs/*.csv) | "
                              "tensorboard (OUT/logs/; pip install 'localcredit[log]')", check=logger_problem)


@dataclass(kw_only=True)
class TrainConfig(TrainSpec):
    """The recipe plus how the loop reports (not part of a run's identity)."""

    eval_batch_size: int = 2000
    progress: bool = True
    #: Mid-epoch checkpoints: steps ("500"), a time ("10m") or "off" (localcredit.training.runfiles).
    checkpoint_every: str = "10m"
    #: The command that continues this run, for the line printed when a signal stops it.
    resume_hint: str = ""

    def validate(self) -> None:
        check(self)
        parse_checkpoint_every(self.checkpoint_every)
        if self.lr_schedule == "step" and not self.milestones:
            raise UserError("--lr-schedule step needs --milestones, e.g. --milestones 50,75")
        if self.milestones and self.lr_schedule != "step":
            raise UserError(f"--milestones applies to --lr-schedule step, not {self.lr_schedule}")


def make_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig):
    """The torch.optim.lr_scheduler of ``config.lr_schedule`` for one optimiser (None for none), stepped per epoch."""
    if config.lr_schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs)
    if config.lr_schedule == "step":
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=config.milestones, gamma=config.lr_decay)
    return None


#: TrainConfig fields that change how the loop reports or saves, never the numbers: not part of a run's identity.
LOOP_ONLY = ("progress", "eval_batch_size", "checkpoint_every", "resume_hint", "log")


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    # One generator per (seed, epoch): a resumed run reshuffles exactly as the uninterrupted one.
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=generator)


def smallest_step(rule: Rule) -> int:
    """The fewest samples a training step (and each process's share of one) may hold: 2 when the rule
    has batch norm (in its network or its own modules), which cannot normalise a single sample; else 1."""
    return 2 if any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in rule.modules()) else 1


def step_sizes(n: int, batch_size: int, smallest: int = 1) -> list[int]:
    """Samples per step of an epoch of ``n``: ``batch_size`` each, the rest last, merged into the step
    before when it is smaller than ``smallest`` (with batch norm, a last step of 1 sample: docs/recipe.md)."""
    sizes = [batch_size] * (n // batch_size) + ([n % batch_size] if n % batch_size else [])
    if len(sizes) > 1 and sizes[-1] < smallest:
        tail = sizes.pop()
        sizes[-1] += tail
    return sizes


def check_step_sizes(n: int, batch_size: int, smallest: int) -> None:
    """A user error when a step stays smaller than ``smallest`` (batch norm with one sample in all, or per step)."""
    if min(step_sizes(n, batch_size, smallest)) < smallest:
        cause = f"--batch-size {batch_size}" if batch_size < smallest else f"{n} training sample"
        raise UserError(f"batch norm cannot learn from a step of 1 sample ({cause}); "
                        f"train on at least {smallest} samples per step")
