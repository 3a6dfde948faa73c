"""The Trainer: epochs of ``rule.step`` over shuffled batches, evaluation, checkpoints, results.

It knows no rule: it only calls ``rule.step``, ``rule.predict``, ``rule.start_epoch``,
``rule.statistics`` and the rule's checkpoint state. The loop reads like a textbook one and
exposes hooks (``before_epoch``, ``after_step``, ``after_epoch``) for code that wants to watch
or steer a run without subclassing.

It knows no process layout either: a :class:`Parallelism` runs its epochs and steps and says
whether this process is the one that evaluates and writes. The default is one process doing
everything; ``localcredit.distributed`` provides data-parallel and block-pipeline ones.
"""

from __future__ import annotations

import json
import math
import os
import resource
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm import tqdm

from .data import Dataset
from .errors import UserError
from .experiment import FINGERPRINT_FIELDS
from .rules.base import Rule

CHECKPOINT = "checkpoint.pt"
RESULT = "result.json"


@dataclass
class TrainConfig:
    epochs: int = 3
    batch_size: int = 128
    seed: int = 0
    limit_train: int | None = None  # train on the first N training samples only
    eval_batch_size: int = 2000
    progress: bool = True

    def validate(self) -> None:
        if self.epochs < 1:
            raise UserError(f"--epochs must be at least 1, got {self.epochs}")
        if self.batch_size < 1:
            raise UserError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.limit_train is not None and self.limit_train < 1:
            raise UserError(f"--limit-train must be at least 1, got {self.limit_train}")


class Diverged(RuntimeError):
    """The loss or the weights stopped being finite."""

    def __init__(self, epoch: int, step: int, what: str):
        super().__init__(f"training diverged at epoch {epoch}, step {step}: {what} is not finite "
                         f"(try a smaller --lr)")
        self.epoch, self.step = epoch, step


def seed_everything(seed: int) -> None:
    """Seed torch's global generator; rules draw their fixed random matrices from it."""
    torch.manual_seed(seed)


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    # One generator per (seed, epoch): a resumed run reshuffles exactly as the uninterrupted one.
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=generator)


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process: allocated device memory on CUDA, else peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def atomic_write_bytes(path: Path, write: Callable[[Any], None]) -> None:
    """Write via a temporary file in the same folder and rename, so a crash never leaves half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path: Path, payload: dict[str, Any]) -> None:
    atomic_write_bytes(path, lambda handle: handle.write((json.dumps(payload, indent=2) + "\n").encode()))


Hook = Callable[..., None]


class Parallelism:
    """How a Trainer's work is spread over processes. This default: one process does everything."""

    #: This process evaluates, writes result.json and checkpoints, and shows the progress bar.
    writer: bool = True

    def attach(self, trainer: "Trainer") -> None:
        """Once per fit, after a resume has loaded the checkpoint, before the first epoch."""

    def train_epoch(self, trainer: "Trainer", epoch: int) -> None:
        trainer.train_epoch(epoch)

    def step(self, trainer: "Trainer", index: torch.Tensor) -> dict[str, float]:
        """One training step on the samples ``index`` of the training set (the whole global batch)."""
        return trainer.rule.step(trainer.x_train[index], trainer.y_train[index])

    def finish_epoch(self, trainer: "Trainer") -> None:
        """After an epoch's training, before the writer evaluates and checkpoints it."""

    def describe(self) -> dict[str, Any]:
        """The ``parallel`` entry of result.json."""
        return {"mode": "none", "procs": 1, "backend": None}


class Trainer:
    """Train ``rule`` on ``data``; with ``out_dir``, write result.json and a checkpoint after each epoch."""

    def __init__(self, rule: Rule, data: Dataset, config: TrainConfig, out_dir: str | Path | None = None,
                 run_info: dict[str, Any] | None = None, device: str | torch.device = "cpu",
                 parallel: Parallelism | None = None):
        config.validate()
        self.rule = rule
        self.parallel = parallel if parallel is not None else Parallelism()
        self.config = config
        self.device = torch.device(device)
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.run_info = dict(run_info or {})
        limit = config.limit_train or len(data.x_train)
        self.x_train = data.x_train[:limit].to(self.device)
        self.y_train = data.y_train[:limit].to(self.device)
        self.x_test = data.x_test.to(self.device)
        self.y_test = data.y_test.to(self.device)
        self.hooks: dict[str, list[Hook]] = defaultdict(list)
        self.history: dict[str, list] = defaultdict(list)
        self.epochs_done = 0
        self.rule.to(self.device)

    def add_hook(self, event: str, fn: Hook) -> None:
        """``before_epoch(trainer, epoch)``, ``after_step(trainer, epoch, step, stats)``, ``after_epoch(trainer, epoch)``."""
        if event not in ("before_epoch", "after_step", "after_epoch"):
            raise ValueError(f"unknown trainer event {event!r}")
        self.hooks[event].append(fn)

    def _call(self, event: str, *args: Any) -> None:
        for fn in self.hooks[event]:
            fn(self, *args)

    # ----- the loop ------------------------------------------------------------------------
    def fit(self, resume: bool = False) -> dict[str, Any]:
        if self.out_dir is not None:
            if self.parallel.writer:
                self.out_dir.mkdir(parents=True, exist_ok=True)
            if resume:
                self._load_checkpoint()
        self.parallel.attach(self)
        try:
            for epoch in range(self.epochs_done, self.config.epochs):
                self._call("before_epoch", epoch)
                self.rule.start_epoch(epoch, self.config.epochs)
                self.parallel.train_epoch(self, epoch)
                self.parallel.finish_epoch(self)
                if self.parallel.writer:
                    self.history["test_accuracy"].append(self.evaluate(self.x_test, self.y_test))
                self.epochs_done = epoch + 1
                self._call("after_epoch", epoch)
                self._save_checkpoint()
        except Diverged as exc:
            result = self.result(status="diverged", message=str(exc))
            self._write_result(result)
            raise
        result = self.result(status="ok")
        self._write_result(result)
        return result

    def epoch_batches(self, epoch: int) -> list[torch.Tensor]:
        """The sample indices of every step of ``epoch``, in order (the same in every process)."""
        order = epoch_order(len(self.x_train), self.config.seed, epoch).to(self.device)
        return list(order.split(self.config.batch_size))

    def progress_bar(self, epoch: int, steps: int) -> tqdm:
        return tqdm(range(steps), desc=f"epoch {epoch + 1}/{self.config.epochs}", unit="batch",
                    disable=not (self.config.progress and self.parallel.writer) or None, leave=False,
                    file=sys.stderr)

    def train_epoch(self, epoch: int) -> None:
        batches = self.epoch_batches(epoch)
        totals: dict[str, float] = defaultdict(float)
        bar = self.progress_bar(epoch, len(batches))
        start = time.perf_counter()
        for step in bar:
            stats = self.parallel.step(self, batches[step])
            if not math.isfinite(stats["loss"]):
                raise Diverged(epoch + 1, step + 1, "the loss")
            for key, value in stats.items():
                totals[key] += value
            if step % 20 == 0:
                bar.set_postfix(loss=f"{stats['loss']:.4f}")
            self._call("after_step", epoch, step, stats)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.record_epoch(epoch, time.perf_counter() - start, {k: v / len(batches) for k, v in totals.items()})

    def record_epoch(self, epoch: int, seconds: float, mean_stats: dict[str, float]) -> None:
        """Check the weights, then log an epoch's duration and its per-step mean of every logged figure."""
        if not all(torch.isfinite(p).all() for p in self.rule.parameters()):
            raise Diverged(epoch + 1, math.ceil(len(self.x_train) / self.config.batch_size), "a weight")
        self.history["seconds_per_epoch"].append(seconds)
        for key, mean in mean_stats.items():
            self.history[f"train_{key}"].append(mean)

    @torch.no_grad()
    def evaluate(self, x: torch.Tensor, y: torch.Tensor) -> float:
        correct = 0
        for start in range(0, len(x), self.config.eval_batch_size):
            end = start + self.config.eval_batch_size
            correct += (self.rule.predict(x[start:end]) == y[start:end]).sum().item()
        return correct / len(x)

    # ----- results and checkpoints ---------------------------------------------------------
    def result(self, status: str, message: str | None = None) -> dict[str, Any]:
        seconds = self.history.get("seconds_per_epoch", [])
        accuracy = self.history.get("test_accuracy", [])
        result = {
            **self.run_info,
            "status": status,
            "epochs": self.config.epochs,
            "epochs_completed": self.epochs_done,
            "seed": self.config.seed,
            "batch_size": self.config.batch_size,
            "train_samples": len(self.x_train),
            "test_accuracy": accuracy[-1] if accuracy else None,
            "test_accuracy_per_epoch": accuracy,
            "train_loss_per_epoch": self.history.get("train_loss", []),
            "seconds_per_epoch": seconds,
            "samples_per_second": len(self.x_train) / (sum(seconds) / len(seconds)) if seconds else None,
            "peak_memory_mb": peak_memory_mb(self.device),
            "parameters": sum(p.numel() for p in self.rule.net.parameters()),
            "train_metrics_per_epoch": {k[len("train_"):]: v for k, v in self.history.items()
                                        if k.startswith("train_") and k != "train_loss"},
            "rule_statistics": self.rule.statistics(),
            "parallel": self.parallel.describe(),
            "device": str(self.device),
            "torch_version": torch.__version__,
        }
        if message:
            result["message"] = message
        return result

    def _write_result(self, result: dict[str, Any]) -> None:
        if self.out_dir is not None and self.parallel.writer:
            write_json(self.out_dir / RESULT, result)

    def _fingerprint(self) -> dict[str, Any]:
        """What must match for a checkpoint to be resumed by this run."""
        return {"train": {k: v for k, v in asdict(self.config).items() if k != "progress"},
                "run": {k: self.run_info.get(k) for k in FINGERPRINT_FIELDS}}

    def _save_checkpoint(self) -> None:
        if self.out_dir is None or not self.parallel.writer:
            return
        state = {"epochs_done": self.epochs_done, "fingerprint": json.dumps(self._fingerprint(), sort_keys=True),
                 "rule": self.rule.checkpoint_state(), "history": dict(self.history),
                 "torch_rng": torch.get_rng_state()}
        atomic_write_bytes(self.out_dir / CHECKPOINT, lambda handle: torch.save(state, handle))

    def _load_checkpoint(self) -> None:
        path = self.out_dir / CHECKPOINT
        if not path.exists():
            if self.parallel.writer:
                print(f"no checkpoint in {self.out_dir}; starting from epoch 1", file=sys.stderr)
            return
        state = torch.load(path, map_location=self.device, weights_only=True)
        if not _same_run(json.loads(state["fingerprint"]), self._fingerprint()):
            raise UserError(f"the checkpoint in {self.out_dir} was made with other options; "
                            f"use another --out or the same options to resume")
        self.rule.load_checkpoint_state(state["rule"])
        self.history = defaultdict(list, {k: list(v) for k, v in state["history"].items()})
        self.epochs_done = min(state["epochs_done"], self.config.epochs)
        torch.set_rng_state(state["torch_rng"].cpu())


def _same_run(saved: dict[str, Any], current: dict[str, Any]) -> bool:
    # --epochs may grow on resume (train a finished run further); nothing else may change.
    strip = lambda fp: {**fp, "train": {**fp["train"], "epochs": None}}  # noqa: E731
    return strip(saved) == strip(current)
