"""The Trainer: epochs of ``rule.step`` over shuffled batches, evaluation, checkpoints, results.

It knows no rule: it only calls ``rule.step``, ``rule.predict``, ``rule.start_epoch``,
``rule.statistics`` and the rule's checkpoint state. The loop reads like a textbook one and
exposes hooks (``before_epoch``, ``after_step``, ``after_epoch``) for code that wants to watch
or steer a run without subclassing.
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


class Trainer:
    """Train ``rule`` on ``data``; with ``out_dir``, write result.json and a checkpoint after each epoch."""

    def __init__(self, rule: Rule, data: Dataset, config: TrainConfig, out_dir: str | Path | None = None,
                 run_info: dict[str, Any] | None = None, device: str | torch.device = "cpu"):
        config.validate()
        self.rule = rule
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
            self.out_dir.mkdir(parents=True, exist_ok=True)
            if resume:
                self._load_checkpoint()
        try:
            for epoch in range(self.epochs_done, self.config.epochs):
                self._call("before_epoch", epoch)
                self.rule.start_epoch(epoch, self.config.epochs)
                self.train_epoch(epoch)
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

    def train_epoch(self, epoch: int) -> None:
        n, batch = len(self.x_train), self.config.batch_size
        order = epoch_order(n, self.config.seed, epoch).to(self.device)
        totals: dict[str, float] = defaultdict(float)
        steps = math.ceil(n / batch)
        bar = tqdm(range(steps), desc=f"epoch {epoch + 1}/{self.config.epochs}", unit="batch",
                   disable=not self.config.progress or None, leave=False, file=sys.stderr)
        start = time.perf_counter()
        for step in bar:
            index = order[step * batch:(step + 1) * batch]
            stats = self.rule.step(self.x_train[index], self.y_train[index])
            if not math.isfinite(stats["loss"]):
                raise Diverged(epoch + 1, step + 1, "the loss")
            for key, value in stats.items():
                totals[key] += value
            if step % 20 == 0:
                bar.set_postfix(loss=f"{stats['loss']:.4f}")
            self._call("after_step", epoch, step, stats)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - start
        if not all(torch.isfinite(p).all() for p in self.rule.parameters()):
            raise Diverged(epoch + 1, steps, "a weight")
        self.history["seconds_per_epoch"].append(seconds)
        for key, total in totals.items():
            self.history[f"train_{key}"].append(total / steps)

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
            "device": str(self.device),
            "torch_version": torch.__version__,
        }
        if message:
            result["message"] = message
        return result

    def _write_result(self, result: dict[str, Any]) -> None:
        if self.out_dir is not None:
            write_json(self.out_dir / RESULT, result)

    def _fingerprint(self) -> dict[str, Any]:
        """What must match for a checkpoint to be resumed by this run."""
        keep = ("rule", "data", "arch", "hidden", "activation", "options", "optimizer", "lr")
        return {"train": {k: v for k, v in asdict(self.config).items() if k != "progress"},
                "run": {k: self.run_info.get(k) for k in keep}}

    def _save_checkpoint(self) -> None:
        if self.out_dir is None:
            return
        state = {"epochs_done": self.epochs_done, "fingerprint": json.dumps(self._fingerprint(), sort_keys=True),
                 "rule": self.rule.checkpoint_state(), "history": dict(self.history),
                 "torch_rng": torch.get_rng_state()}
        atomic_write_bytes(self.out_dir / CHECKPOINT, lambda handle: torch.save(state, handle))

    def _load_checkpoint(self) -> None:
        path = self.out_dir / CHECKPOINT
        if not path.exists():
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
