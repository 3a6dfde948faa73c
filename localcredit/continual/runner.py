"""Continual learning: train the tasks of a stream in order with any rule under any strategy.

After each task every task is evaluated (the accuracy matrix R, ``localcredit.continual.metrics``);
every ``curve_every`` steps the tasks seen so far are evaluated on a slice of their test sets, the
accuracy over training steps that shows the stability gap (a dip in old tasks' accuracy right
after a task switch, de Lange et al. 2023). A task trains for a fixed number of steps on batches
drawn in passes over its training set (a seeded permutation per pass, as an epoch of ``train``).

Nothing is lost on a stop: a checkpoint is written at the end of every task, every
``checkpoint_every`` within one, and on SIGTERM / SIGINT between two steps (then
:class:`~localcredit.training.runfiles.Interrupted`, exit 128 + signal). Resuming restores the rule,
its optimisers, the strategy and the random state, so a resumed run ends with the same matrix as an
uninterrupted one.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from ..errors import UserError
from ..rules.base import Rule
from ..training.checkpoint import _run_differences, atomic_write_bytes, write_json
from ..training.loggers import RunLogger, make_logger, numeric_leaves
from ..training.progress import Diverged
from ..training.runfiles import CHECKPOINT, RESULT, Interrupted, StopRequests, load_checkpoint, parse_checkpoint_every
from .metrics import summarise
from .scenarios import Stream, Task
from .strategies.base import Batch, Strategy

#: The entries every continual checkpoint has.
CHECKPOINT_KEYS = ("fingerprint", "task", "step", "matrix", "rule", "strategy", "torch_rng")


class TaskDiverged(Diverged):
    """The loss or the weights stopped being finite in a task (``epoch`` holds the task, 1-based)."""

    def __init__(self, task: int, step: int, what: str):
        RuntimeError.__init__(self, f"training diverged in task {task + 1}, step {step + 1}: {what} is not finite "
                                    f"(try a smaller --lr, or a weaker strategy)")
        self.epoch, self.step = task + 1, step + 1


@dataclass
class Loop:
    """How the tasks are trained and watched (the numbers depend on the first four only)."""

    steps_per_task: int
    batch_size: int = 128
    seed: int = 0
    curve_every: int = 50          # steps between evaluations of the seen tasks (0: none)
    curve_samples: int = 1000      # test samples per task in those evaluations
    eval_batch_size: int = 2000
    checkpoint_every: str = "10m"
    progress: bool = True
    resume_hint: str = ""


def pass_order(n: int, seed: int, task: int, passes: int) -> torch.Tensor:
    # One generator per (seed, task, pass): a resumed run draws exactly the batches of an uninterrupted one.
    generator = torch.Generator().manual_seed(seed * 1_000_003 + task * 10_007 + passes)
    return torch.randperm(n, generator=generator)


def evaluate(rule: Rule, task: Task, head: list[int] | None, batch_size: int = 2000, limit: int | None = None) -> float:
    """Test accuracy on ``task`` with ``head`` competing (None: every output)."""
    x, y = task.data.x_test[:limit], task.data.y_test[:limit]
    with rule.outputs_restricted(head), torch.no_grad():
        correct = sum((rule.predict(x[s:s + batch_size]) == y[s:s + batch_size]).sum().item()
                      for s in range(0, len(x), batch_size))
    return correct / len(x)


class ContinualRun:
    """One rule, one strategy, one stream: the loop, its checkpoints and its record."""

    def __init__(self, rule: Rule, stream: Stream, strategy: Strategy, loop: Loop, out_dir: str | Path | None = None,
                 fingerprint: dict[str, Any] | None = None, log: str = "none"):
        self.rule, self.stream, self.strategy, self.loop = rule, stream, strategy, loop
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.fingerprint = fingerprint or {}
        self.log = log
        self.logger: RunLogger = RunLogger()
        self.checkpoint_every = parse_checkpoint_every(loop.checkpoint_every)
        # what the run has done: the state a checkpoint holds besides the rule's and the strategy's
        self.task, self.step = 0, 0
        self.matrix: list[list[float]] = []
        self.curve: list[dict[str, Any]] = []
        self.losses: list[float] = []           # mean training loss per task
        self.loss_sum = 0.0                     # of the task under way
        self.rule_statistics: list[dict[str, Any]] = []
        self.seconds = 0.0
        self._orders: dict[int, torch.Tensor] = {}

    # ----- the loop ------------------------------------------------------------------------------
    def run(self, resume: bool = False) -> dict[str, Any]:
        if resume:
            self._resume()
        if self.out_dir is not None:
            self.logger = make_logger(self.log, self.out_dir, resume_step=self.global_step if resume else None)
        hook = lambda rule, stats: self.strategy.adjust_gradients(rule)  # noqa: E731
        self.rule.gradient_hooks.append(hook)
        try:
            with StopRequests() as stop:
                while self.task < len(self.stream):
                    self._train_task(self.stream.tasks[self.task], stop)
        finally:
            self.rule.gradient_hooks.remove(hook)
            self.rule.restrict_outputs(None)
            self.logger.close()
        return self.record()

    def _train_task(self, task: Task, stop: StopRequests) -> None:
        self.strategy.begin_task(task)
        samples = self.strategy.training_set(task)
        steps = self.loop.steps_per_task
        bar = tqdm(total=steps, initial=self.step, desc=f"task {task.index + 1}/{len(self.stream)}", unit="step",
                   disable=not self.loop.progress or None, leave=False, file=sys.stderr)
        started, last_save = time.perf_counter(), time.monotonic()
        while self.step < steps:
            if self.loop.curve_every and self.step % self.loop.curve_every == 0:
                self._curve_point(task)
            self._train_step(task, samples)
            self.step += 1
            bar.update()
            due = self._checkpoint_due(last_save)
            if stop.signum or (due and self.step < steps):
                self.seconds += time.perf_counter() - started
                started, last_save = time.perf_counter(), time.monotonic()
                self._save()
                if stop.signum:
                    bar.close()
                    raise Interrupted(stop.signum, f"checkpoint written in task {task.index + 1}, step {self.step}",
                                      self.loop.resume_hint)
        bar.close()
        self._finish_task(task)
        self.seconds += time.perf_counter() - started
        self._save()
        if stop.signum:  # arrived during the task's evaluation: everything is saved
            raise Interrupted(stop.signum, f"checkpoint written after task {task.index}", self.loop.resume_hint)

    def _train_step(self, task: Task, samples: Batch) -> None:
        batch = self.strategy.batch(self._batch(task, samples), task)
        self.rule.restrict_outputs(self.stream.training_mask(batch.task, task.index))
        stats = self.rule.step(batch.x, batch.y)
        self.strategy.after_step(self.rule)
        loss = float(stats["loss"]) if "loss" in stats else 0.0
        if loss != loss or loss in (float("inf"), float("-inf")):
            raise TaskDiverged(task.index, self.step, "the loss")
        self.loss_sum += loss
        self.logger.step_scalars(self.global_step + 1, {k: float(v) for k, v in stats.items()})

    def _batch(self, task: Task, samples: Batch) -> Batch:
        n, size = len(samples.y), min(self.loop.batch_size, len(samples.y))
        per_pass = n // size
        passes, within = divmod(self.step, per_pass)
        if within == 0 or passes not in self._orders:
            self._orders = {passes: pass_order(n, self.loop.seed, task.index, passes)}
            self.rule.start_epoch(passes, -(-self.loop.steps_per_task // per_pass))
        index = self._orders[passes][within * size:(within + 1) * size]
        return Batch(samples.x[index], samples.y[index], samples.task[index])

    @property
    def global_step(self) -> int:
        return self.task * self.loop.steps_per_task + self.step

    def _curve_point(self, task: Task) -> None:
        accuracy = [evaluate(self.rule, t, self.stream.head(t.index, task.index), self.loop.eval_batch_size,
                             self.loop.curve_samples) for t in self.stream.tasks[:task.index + 1]]
        self.curve.append({"task": task.index, "step": self.step, "global_step": self.global_step,
                           "accuracy": accuracy})

    def _finish_task(self, task: Task) -> None:
        if not all(torch.isfinite(p).all() for p in self.rule.parameters()):
            raise TaskDiverged(task.index, self.step, "a weight")
        self.strategy.end_task(task)
        row = [evaluate(self.rule, t, self.stream.head(t.index, task.index), self.loop.eval_batch_size)
               for t in self.stream.tasks]
        self.matrix.append(row)
        if self.loop.curve_every:
            self._curve_point(task)
        self.losses.append(self.loss_sum / max(1, self.step))
        self.rule_statistics.append(self.rule.statistics())
        self.logger.epoch_scalars(task.index + 1, {"average_accuracy_seen": sum(row[:task.index + 1]) / (task.index + 1),
                                                    **{f"accuracy/task{i + 1}": a for i, a in enumerate(row)},
                                                    **numeric_leaves(self.strategy.statistics(), "strategy")},
                                  step=self.global_step)
        self.task, self.step, self.loss_sum = self.task + 1, 0, 0.0
        self._orders = {}

    def _checkpoint_due(self, last_save: float) -> bool:
        every = self.checkpoint_every
        if every.steps:
            return self.step % every.steps == 0
        return every.seconds is not None and time.monotonic() - last_save >= every.seconds

    # ----- record and checkpoints ----------------------------------------------------------------
    def record(self) -> dict[str, Any]:
        return {**summarise(self.matrix), "accuracy_curve": self.curve, "train_loss_per_task": self.losses,
                "rule_statistics_per_task": self.rule_statistics, "strategy_statistics": self.strategy.statistics(),
                "seconds": self.seconds} if self.matrix else {}

    def _state(self) -> dict[str, Any]:
        return {"fingerprint": json.dumps(self.fingerprint, sort_keys=True), "task": self.task, "step": self.step,
                "matrix": self.matrix, "curve": self.curve, "losses": self.losses, "loss_sum": self.loss_sum,
                "rule_statistics": self.rule_statistics, "seconds": self.seconds,
                "rule": self.rule.checkpoint_state(), "strategy": self.strategy.state_dict(),
                "torch_rng": torch.get_rng_state()}

    def _save(self) -> None:
        if self.out_dir is None:
            return
        state = self._state()
        atomic_write_bytes(self.out_dir / CHECKPOINT, lambda handle: torch.save(state, handle))

    def _resume(self) -> None:
        path = self.out_dir / CHECKPOINT if self.out_dir is not None else None
        if path is None or not path.exists():
            if path is not None:
                print(f"no checkpoint in {self.out_dir}; starting from task 1", file=sys.stderr)
            return
        state = load_checkpoint(path, "cpu", keys=CHECKPOINT_KEYS, kind="continual")
        self._check_fingerprint(state, path)
        self.rule.load_checkpoint_state(state["rule"])
        self.strategy.load_state_dict(state["strategy"])
        torch.set_rng_state(state["torch_rng"])
        self.task, self.step, self.matrix, self.curve = state["task"], state["step"], state["matrix"], state["curve"]
        self.losses, self.loss_sum, self.seconds = state["losses"], state["loss_sum"], state["seconds"]
        self.rule_statistics = state["rule_statistics"]
        where = f"task {self.task + 1}, step {self.step}" if self.task < len(self.stream) else "the end"
        print(f"resuming {self.out_dir} at {where}", file=sys.stderr)

    def _check_fingerprint(self, state: dict[str, Any], path: Path) -> None:
        try:
            saved = json.loads(state["fingerprint"])
        except (KeyError, TypeError, ValueError):
            raise UserError(f"{path} is not a localcredit continual checkpoint; use another --out") from None
        current = json.loads(json.dumps(self.fingerprint, sort_keys=True))
        differences = _run_differences({"train": {}, "run": saved}, {"train": {}, "run": current})
        if differences:
            raise UserError(f"the checkpoint in {self.out_dir} was made with other options "
                            f"({'; '.join(differences)}); use another --out or the same options to resume")


def save_result(result: dict[str, Any], out_dir: Path, title: str, plot: Callable[..., None] | None = None) -> None:
    """OUT/result.json, then the plots (a plot failing never loses the numbers)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / RESULT, result)
    if plot is not None:
        plot(result, out_dir, title)
