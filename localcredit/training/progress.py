"""An epoch under way: its progress (what a mid-epoch checkpoint carries), its logged figures (read
from the device in batches, checked for divergence) and :class:`Diverged`.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from tqdm import tqdm

from ..rules.base import StepFigures


class Diverged(RuntimeError):
    """The loss or the weights stopped being finite.

    ``step`` is the step whose loss first was not finite; on CUDA the Trainer reads the losses every
    :data:`CUDA_SYNC_EVERY` steps, so it stops up to that many steps after that one.
    """

    def __init__(self, epoch: int, step: int, what: str):
        super().__init__(f"training diverged at epoch {epoch}, step {step}: {what} is not finite "
                         f"(try a smaller --lr)")
        self.epoch, self.step = epoch, step


@dataclass
class EpochProgress:
    """An epoch under way: what a mid-epoch checkpoint carries so that a resumed run ends the same."""

    epoch: int
    steps_done: int = 0
    totals: dict[str, float] = field(default_factory=dict)  # per-step figures summed so far
    seconds: float = 0.0  # training time of the steps done, before the current sitting

    def state(self) -> dict[str, Any]:
        return asdict(self)


#: On CUDA the Trainer reads the steps' logged figures (the loss) on the host once per this many
#: steps, all of them in one transfer. Reading a figure makes the host wait until the device has
#: computed it, which empties the queue of launched kernels: every step would then wait for its
#: own kernels, and the next step's launches would no longer overlap this step's work. The cost: a
#: non-finite loss is noticed up to this many steps late (still named by the step it happened at).
CUDA_SYNC_EVERY = 50


def steps_per_read(device: torch.device) -> int:
    """How many steps' figures the Trainer keeps unread on ``device``: 1 on the CPU, which has nothing
    to wait for (every step is checked at once, as it always was)."""
    return CUDA_SYNC_EVERY if device.type == "cuda" else 1


def read_figures(steps: list[StepFigures]) -> list[dict[str, float]]:
    """The figures of ``steps`` as floats, every tensor among them read in one transfer (one wait).

    Each tensor goes through float64, which holds a float32 or bfloat16 value exactly: the floats are
    those ``.item()`` gives.
    """
    tensors = [value for figures in steps for value in figures.values() if isinstance(value, torch.Tensor)]
    read = iter(torch.stack([t.detach().to(tensors[0].device, torch.float64) for t in tensors]).tolist()
                if tensors else [])
    return [{key: next(read) if isinstance(value, torch.Tensor) else value for key, value in figures.items()}
            for figures in steps]


class EpochFigures:
    """An epoch's logged figures, summed per name; each step's read on the host ``every`` steps.

    ``add`` keeps a step's figures as the rule returned them; every ``every`` steps, and whenever
    the sums are asked for (a checkpoint, the epoch's end), the unread ones are read at once, the
    loss checked for divergence, and added to the sums in step order -- so the sums are the same
    floats whatever ``every`` is.
    """

    def __init__(self, epoch: int, totals: dict[str, float], every: int, bar: tqdm):
        self.epoch, self.every, self.bar = epoch, every, bar
        self.totals = defaultdict(float, totals)
        self.unread: list[tuple[int, StepFigures]] = []

    def add(self, step: int, figures: StepFigures) -> None:
        self.unread.append((step, figures))
        if len(self.unread) >= self.every:
            self.read()

    def read(self) -> None:
        """Read the unread steps' figures; Diverged at the first step whose loss is not finite."""
        steps = [step for step, _ in self.unread]
        read = read_figures([figures for _, figures in self.unread])
        self.unread = []
        for step, figures in zip(steps, read):
            if not math.isfinite(figures["loss"]):
                raise Diverged(self.epoch + 1, step + 1, "the loss")
            for key, value in figures.items():
                self.totals[key] += value
            if step % 20 == 0:
                self.bar.set_postfix(loss=f"{figures['loss']:.4f}")

    def summed(self) -> dict[str, float]:
        """Every step's figures so far, summed (what a checkpoint saves and the epoch's log divides)."""
        self.read()
        return dict(self.totals)
