"""The suite's learning tests as functions of a seed, and the breakages a floor must catch.

A learning test trains on real data and asserts a floor. Floats differ between CPUs and BLAS builds
and training turns that into points of accuracy, so every floor is set from a measured spread:
``benchmarks/learning_floors.py`` runs each case below over seeds 0-4 with 1 and 2 threads (the
suite runs seed 0) and over a *broken* rule (its update zeroed, or its sign flipped), and writes
``results/learning-floors/``. Each floor's comment records the min / median of that spread.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from localcredit.rules.base import Rule
from localcredit.training.progress import Diverged
from localcredit.training.trainer import Trainer

Breakage = Literal["zero", "flip"]

#: name -> function(seed, broken) -> final test accuracy, for the learning tests outside RuleContract
#: (each test module registers its own with :func:`learning_case`); the floor is the test's own
CASES: dict[str, tuple[Callable[[int, Breakage | None], float], float]] = {}


def learning_case(name: str, floor: float):
    """Register ``fn(seed, broken=None) -> accuracy`` as the learning case ``name`` with ``floor``."""
    def register(fn: Callable[..., float]) -> Callable[..., float]:
        CASES[name] = (fn, floor)
        return fn
    return register


def break_rule(rule: Rule, how: Breakage | None) -> Rule:
    """Make ``rule`` broken in a way a learning floor must catch: every gradient it assigns is zeroed
    (``zero``: nothing learns) or negated (``flip``: gradient ascent on the rule's own losses), right
    before the optimisers step. ``None`` leaves it as it is."""
    if how is None:
        return rule

    def sabotage(rule: Rule, stats: Any) -> None:
        for p in rule.parameters():
            if p.grad is not None:
                p.grad.zero_() if how == "zero" else p.grad.neg_()

    rule.gradient_hooks.append(sabotage)
    return rule


def fit(trainer: Trainer, broken: Breakage | None = None) -> dict[str, Any]:
    """``trainer.fit()``; a broken rule may diverge, and then scores what its network predicts."""
    if broken is None:
        return trainer.fit()
    try:
        return trainer.fit()
    except Diverged:
        accuracy = trainer.evaluate()
        return {"test_accuracy": accuracy, "test_accuracy_per_epoch": ["diverged", accuracy]}
