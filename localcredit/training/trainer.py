"""The Trainer: epochs of ``rule.step`` over shuffled batches, evaluation, checkpoints, results.

It knows no rule: it only calls ``rule.step``, ``rule.predict``, ``rule.start_epoch``,
``rule.statistics``, the rule's optimisers (for learning-rate schedules) and its checkpoint state.
The training recipe -- epochs, batches, data order, augmentation, schedule, evaluation cadence -- is
:class:`~localcredit.training.config.TrainSpec`, the same for every rule.

Batches come from a :class:`~localcredit.training.batches.BatchSource`: slices of in-memory tensors,
or a DataLoader for data that is streamed from disk. Checkpoints are saved, checked and restored by
:class:`~localcredit.training.checkpoint.CheckpointMixin`.

It knows no process layout either: a :class:`Parallelism` runs its epochs and steps and says
whether this process is the one that evaluates and writes. The default is one process doing
everything; ``localcredit.training.data_parallel`` and ``block_parallel`` provide the multi-process ones.
"""

from __future__ import annotations

import resource
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Protocol

import torch
from tqdm import tqdm

from ..data import Dataset
from ..data.streaming import StreamedDataset
from ..errors import UserError
from ..rules.base import Rule, StepFigures
from .augment import augment_batch, augment_seed, parse_augment
from .batches import BatchSource, batch_source
from .checkpoint import CheckpointMixin, write_json
from .config import TrainConfig, check_step_sizes, epoch_order, make_scheduler, smallest_step, step_sizes
from .loggers import LoggedFigures, RunLogger, make_logger, numeric_leaves
from .progress import Diverged, EpochFigures, EpochProgress, steps_per_read
from .runfiles import (
    RESULT,
    Interrupted,
    StopRequests,
    hold_run_folder,
    parse_checkpoint_every,
    read_json,
    remove_temporaries,
)


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process: allocated device memory on CUDA, else peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


#: Processes agree whether to checkpoint or stop every this many steps (single process: every step).
AGREE_EVERY = 8


class Parallelism:
    """How a Trainer's work is spread over processes. This default: one process does everything."""

    #: This process evaluates, writes result.json and checkpoints, and shows the progress bar.
    writer: bool = True

    def attach(self, trainer: Trainer) -> None:
        """Once per fit, after a resume has loaded the checkpoint, before the first epoch."""

    def train_epoch(self, trainer: Trainer, progress: EpochProgress) -> None:
        trainer.train_epoch(progress)

    def step(self, trainer: Trainer, x: torch.Tensor, y: torch.Tensor) -> StepFigures:
        """One training step on the whole global batch ``x``, ``y`` (augmented already); its figures, unread."""
        return trainer.rule.step(x, y)

    def finish_epoch(self, trainer: Trainer) -> None:
        """After an epoch's training, before the writer evaluates and checkpoints it."""

    def agree(self, wants: tuple[int, int], steps_done: int) -> tuple[int, int] | None:
        """(checkpoint now?, stop signal) as all processes see it, or None: no decision at this step."""
        return wants

    def settle(self, wants: tuple[int, int]) -> tuple[int, int]:
        """The same, at an epoch's end, where every process is waiting anyway (always decides)."""
        return wants

    def checkpoint_extra(self, trainer: Trainer, progress: EpochProgress | None) -> dict[str, Any]:
        """Called by every process before a checkpoint: what the writer saves beyond its own state."""
        return {}

    def load_checkpoint_extra(self, trainer: Trainer, extra: dict[str, Any]) -> None:
        """Every process, on resume: take this process's share of ``checkpoint_extra``."""

    def describe(self) -> dict[str, Any]:
        """The ``parallel`` entry of result.json."""
        return {"mode": "none", "procs": 1, "backend": None}


class EpochWork(Protocol):
    """How a process layout runs one epoch's steps; :meth:`Trainer.train_epoch` drives it."""

    def batches(self) -> Iterable[tuple[Any, Any]]:
        """(x, y) of each step this process runs, from the progress's ``steps_done`` on."""
        ...

    def run_step(self, step: int, x: Any, y: Any) -> None:
        ...

    def summed(self) -> dict[str, Any]:
        """The epoch's figures so far, as a mid-epoch checkpoint saves them."""
        ...

    def end(self) -> dict[str, float]:
        """After the last step: the epoch's per-step mean of every logged figure (Diverged where not finite)."""
        ...


#: Makes an epoch's work from the trainer, the epoch's progress and its progress bar.
WorkFactory = Callable[["Trainer", EpochProgress, tqdm], EpochWork]


class StepWork:
    """One process steps the rule on each whole batch (``parallel.step``); its figures are read from the
    device every ``sync_every`` steps (:class:`EpochFigures`), and logged per step with ``--log``."""

    def __init__(self, trainer: Trainer, progress: EpochProgress, bar: tqdm):
        self.trainer, self.progress = trainer, progress
        epoch, every = progress.epoch, trainer.sync_every
        self.figures = (LoggedFigures(epoch, progress.totals, every, bar, trainer.log_steps(epoch))
                        if trainer.logger.active else EpochFigures(epoch, progress.totals, every, bar))

    def batches(self) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        return self.trainer.training_batches(self.progress.epoch, self.progress.steps_done)

    def run_step(self, step: int, x: torch.Tensor, y: torch.Tensor) -> None:
        self.figures.add(step, self.trainer.parallel.step(self.trainer, x, y))

    def summed(self) -> dict[str, float]:
        return self.figures.summed()

    def end(self) -> dict[str, float]:
        totals = self.figures.summed()
        device = self.trainer.device
        if device.type == "cuda":  # the epoch's time includes its last kernels
            torch.cuda.synchronize(device)
        return {k: v / self.trainer.steps_per_epoch for k, v in totals.items()}


class Trainer(CheckpointMixin):
    """Train ``rule`` on ``data``; with ``out_dir``, write result.json and a checkpoint after each epoch."""

    def __init__(self, rule: Rule, data: Dataset | StreamedDataset, config: TrainConfig,
                 out_dir: str | Path | None = None, run_info: dict[str, Any] | None = None,
                 device: str | torch.device = "cpu", parallel: Parallelism | None = None):
        config.validate()
        self.rule = rule
        self.parallel = parallel if parallel is not None else Parallelism()
        self.config = config
        self.device = torch.device(device)
        self.out_dir = Path(out_dir) if out_dir is not None else None
        if config.log != "none" and self.out_dir is None:
            raise UserError(f"--log {config.log} writes into the run folder's logs/: train with an output folder")
        self.run_info = dict(run_info or {})
        self.source = batch_source(data, config.limit_train, self.device)
        smallest = smallest_step(rule)
        check_step_sizes(self.source.train_size, config.batch_size, smallest)
        #: Samples per step of every epoch (with batch norm, a last step of 1 sample joins the one before).
        self.step_sizes = step_sizes(self.source.train_size, config.batch_size, smallest)
        self.augment = parse_augment(config.augment)
        if self.augment.active and len(data.input_shape) != 3:
            raise UserError(f"--augment needs image data (C, H, W); this data set has per-sample shape "
                            f"{tuple(data.input_shape)}")
        self.black = self.source.black() if self.augment.active else None
        self.history: dict[str, list] = defaultdict(list)
        self.epochs_done = 0
        self.rule.to(self.device)
        self.schedulers = [make_scheduler(optimizer, config) for optimizer in rule.optimizers]
        self.checkpoint_every = parse_checkpoint_every(config.checkpoint_every)
        self.stop = StopRequests()  # inert until fit() enters it
        self.last_checkpoint = time.monotonic()
        self.sync_every = steps_per_read(self.device)  # steps between reads of the logged figures
        self.logger = RunLogger()  # --log: fit() makes the run's, in the writing process

    @property
    def x_train(self) -> torch.Tensor:
        """The in-memory training inputs (what the multi-process layouts slice)."""
        assert isinstance(self.source, BatchSource)  # the multi-process layouts refuse streamed data
        return self.source.x_train

    @property
    def y_train(self) -> torch.Tensor:
        assert isinstance(self.source, BatchSource)  # the multi-process layouts refuse streamed data
        return self.source.y_train

    # ----- the loop ------------------------------------------------------------------------
    def fit(self, resume: bool = False, on_start: Callable[[], None] | None = None) -> dict[str, Any]:
        """Train to the end (or from the checkpoint in out_dir on, with ``resume``); the result dict.

        ``on_start``: called in the writing process once the checkpoint has been read and checked,
        before anything is written (a damaged checkpoint must leave the folder untouched).
        The writing process holds out_dir (``OUT/.lock``) until it returns: another process that
        would work there is refused (localcredit.training.runfiles.hold_run_folder).
        """
        hold = hold_run_folder(self.out_dir) if self.out_dir is not None and self.parallel.writer else None
        try:
            return self._fit(resume, on_start)
        finally:
            self.logger.close()
            if hold is not None:
                hold.release()

    def _fit(self, resume: bool, on_start: Callable[[], None] | None) -> dict[str, Any]:
        saved = self._read_checkpoint() if resume and self.out_dir is not None else None
        if self.out_dir is not None and self.parallel.writer:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            remove_temporaries(self.out_dir)  # of atomic writes that a killed process left halfway
            if on_start is not None:
                on_start()
        resumed = self._restore(saved) if saved is not None else None
        finished = self._finished_result() if saved is not None else None
        if finished is not None:
            return finished
        if self.out_dir is not None and self.parallel.writer:  # a resumed run logs on from its checkpoint's step
            done = self.epochs_done * self.steps_per_epoch + (resumed.steps_done if resumed is not None else 0)
            self.logger = make_logger(self.config.log, self.out_dir, done if saved is not None else None)
        self.parallel.attach(self)
        with StopRequests() as self.stop:
            self.last_checkpoint = time.monotonic()
            try:
                for epoch in range(self.epochs_done, self.config.epochs):
                    self.run_epoch(resumed if resumed is not None and resumed.epoch == epoch else EpochProgress(epoch))
            except Diverged as exc:
                self._write_result(self.result(status="diverged", message=str(exc)))
                raise
            except Interrupted as exc:
                result = self.result(status="interrupted", message=str(exc))
                result["interrupted_at"] = {"epoch": exc.epoch, "step": exc.step, "signal": exc.signum}
                self._write_result(result)
                raise
        result = self.result(status="ok")
        self._write_result(result)
        return result

    def _finished_result(self) -> dict[str, Any] | None:
        """A resumed run that has trained all its epochs already: its result.json as it is (nothing rewritten)."""
        assert self.out_dir is not None  # a run resumes only from a checkpoint in its output folder
        path = self.out_dir / RESULT
        if self.epochs_done < self.config.epochs or not path.exists():
            return None
        result = read_json(path)
        if result.get("status") != "ok":
            return None
        if self.parallel.writer:
            print(f"{self.out_dir} holds this run finished ({self.epochs_done} epochs): reusing it "
                  f"(--overwrite trains it again)", file=sys.stderr)
        return result

    def run_epoch(self, progress: EpochProgress) -> None:
        """Train (the rest of) one epoch, then schedule, evaluate, checkpoint, and stop if asked to."""
        epoch = progress.epoch
        if progress.steps_done == 0:  # a mid-epoch resume has the rule's state of that moment already
            self.rule.start_epoch(epoch, self.config.epochs)
        self.parallel.train_epoch(self, progress)
        self.parallel.finish_epoch(self)
        for scheduler in self.schedulers:
            if scheduler is not None:
                scheduler.step()
        self.history["learning_rate"].append(self.learning_rates())
        if self.parallel.writer:
            self.history["test_accuracy"].append(self.evaluate() if self.evaluates(epoch) else None)
        self.epochs_done = epoch + 1
        if self.logger.active:
            self.log_epoch(epoch)
        self._save_checkpoint(None)
        _, signum = self.parallel.settle((0, self.stop.signum))
        if signum and self.epochs_done < self.config.epochs:
            raise Interrupted.at_step(signum, epoch + 2, 0, self.config.resume_hint)

    def at_step_boundary(self, progress: EpochProgress, seconds: float,
                         totals: Callable[[], dict[str, float]] | None = None) -> None:
        """Between two steps: checkpoint when --checkpoint-every says so, and stop on SIGTERM/SIGINT.

        ``seconds``: training time of this sitting so far; ``totals``: the epoch's summed figures when
        they are not ``progress.totals`` (the Trainer's are read from the device only when asked for,
        the pipeline keeps its own); called only when a checkpoint is written.
        """
        if progress.steps_done >= self.steps_per_epoch:
            return  # the epoch's end checkpoints and looks at signals itself
        decision = self.parallel.agree((int(self.checkpoint_due(progress)), self.stop.signum), progress.steps_done)
        if decision is None:
            return
        checkpoint, signum = decision
        if checkpoint or signum:
            saved = EpochProgress(progress.epoch, progress.steps_done,
                                  totals() if totals is not None else dict(progress.totals), progress.seconds + seconds)
            self._save_checkpoint(saved)
        if signum:
            raise Interrupted.at_step(signum, progress.epoch + 1, progress.steps_done, self.config.resume_hint)

    def checkpoint_due(self, progress: EpochProgress) -> bool:
        every = self.checkpoint_every
        if self.out_dir is None:
            return False
        if every.steps is not None:
            return (progress.epoch * self.steps_per_epoch + progress.steps_done) % every.steps == 0
        return every.seconds is not None and time.monotonic() - self.last_checkpoint >= every.seconds

    def learning_rates(self) -> list[float]:
        """The learning rate of every optimiser (the first group's): what the next epoch uses."""
        return [optimizer.param_groups[0]["lr"] for optimizer in self.rule.optimizers]

    def evaluates(self, epoch: int) -> bool:
        """Whether the test split is evaluated after ``epoch`` (0-based): every --eval-every, and the last."""
        return (epoch + 1) % self.config.eval_every == 0 or epoch + 1 == self.config.epochs

    def epoch_batches(self, epoch: int, first_step: int = 0) -> list[torch.Tensor]:
        """The sample indices of every step of ``epoch`` from ``first_step`` on, in order (the same in every process)."""
        order = epoch_order(self.source.train_size, self.config.seed, epoch).to(self.device)
        return list(order.split(self.step_sizes))[first_step:]

    def training_batches(self, epoch: int, first_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(x, y) of every step of ``epoch`` from ``first_step`` on, augmented: the same in every process."""
        batches = self.source.train_batches(self.epoch_batches(epoch, first_step))
        for step, (x, y) in enumerate(batches, start=first_step):
            yield self.augmented(x, epoch, step), y

    def augmented(self, x: torch.Tensor, epoch: int, step: int) -> torch.Tensor:
        if not self.augment.active:
            return x
        generator = torch.Generator(device=x.device).manual_seed(augment_seed(self.config.seed, epoch, step))
        assert self.black is not None  # made with the augmentation
        return augment_batch(x, self.augment, generator, self.black)

    def progress_bar(self, epoch: int, steps: int, done: int = 0) -> tqdm:
        """A bar over the epoch's steps, ``done`` of them already (a resumed epoch); call ``update()`` per step."""
        return tqdm(total=steps, initial=done, desc=f"epoch {epoch + 1}/{self.config.epochs}", unit="batch",
                    disable=not (self.config.progress and self.parallel.writer) or None, leave=False,
                    file=sys.stderr)

    def train_epoch(self, progress: EpochProgress, work: WorkFactory | None = None) -> None:
        """The epoch loop, for every process layout: (the rest of) an epoch's steps as ``work`` runs them
        (default: :class:`StepWork`, ``parallel.step`` on the whole batch), a checkpoint or a stop between
        two steps when due, then the epoch's figures recorded."""
        epoch, steps = progress.epoch, self.steps_per_epoch
        bar = self.progress_bar(epoch, steps, progress.steps_done)
        runner = (work or StepWork)(self, progress, bar)
        start = time.perf_counter()
        for step, (x, y) in zip(range(progress.steps_done, steps), runner.batches()):
            runner.run_step(step, x, y)
            bar.update()
            progress.steps_done = step + 1
            self.at_step_boundary(progress, time.perf_counter() - start, totals=runner.summed)
        bar.close()
        mean_figures = runner.end()
        seconds = progress.seconds + time.perf_counter() - start
        self.record_epoch(epoch, seconds, mean_figures)

    @property
    def steps_per_epoch(self) -> int:
        return len(self.step_sizes)

    def log_steps(self, epoch: int) -> Callable[[list[int], list[dict[str, float]], float], None]:
        """What hands ``epoch``'s steps to the logger once their figures are read: each step's figures, the
        learning rates, and the samples per second since the previous read (one value for all its steps)."""
        def log(steps: list[int], figures: list[dict[str, float]], seconds: float) -> None:
            rates = self.learning_rates()
            common: dict[str, float | None] = ({"lr": rates[0]} if len(rates) == 1
                                               else {f"lr_{i}": rate for i, rate in enumerate(rates)})
            common["samples_per_second"] = sum(self.step_sizes[s] for s in steps) / seconds if seconds > 0 else None
            for step, values in zip(steps, figures):
                self.logger.step_scalars(epoch * self.steps_per_epoch + step + 1, {**values, **common})
        return log

    def log_epoch(self, epoch: int) -> None:
        """The epoch's test accuracy, mean training figures, seconds and the rule's statistics, to the
        logger; before the checkpoint that holds them (a resumed run drops what came after that)."""
        last = {key: values[-1] for key, values in self.history.items() if values and key != "learning_rate"}
        values = {"test_accuracy": last.get("test_accuracy"), "seconds": last.get("seconds_per_epoch"),
                  **{key: value for key, value in last.items() if key.startswith("train_")},
                  **numeric_leaves(self.rule.statistics(), "rule")}
        self.logger.epoch_scalars(epoch + 1, values, step=(epoch + 1) * self.steps_per_epoch)

    def record_epoch(self, epoch: int, seconds: float, mean_stats: dict[str, float]) -> None:
        """Check the weights, then log an epoch's duration and its per-step mean of every logged figure."""
        if not all(torch.isfinite(p).all() for p in self.rule.parameters()):
            raise Diverged(epoch + 1, self.steps_per_epoch, "a weight")
        self.history["seconds_per_epoch"].append(seconds)
        for key, mean in mean_stats.items():
            self.history[f"train_{key}"].append(mean)

    @torch.no_grad()
    def evaluate(self) -> float:
        """Test accuracy of the rule's predictions."""
        correct = 0
        for x, y in self.source.test_batches(self.config.eval_batch_size):
            correct += int((self.rule.predict(x) == y).sum().item())
        return correct / self.source.test_size

    # ----- results and checkpoints ---------------------------------------------------------
    def result(self, status: str, message: str | None = None) -> dict[str, Any]:
        seconds = self.history.get("seconds_per_epoch", [])
        accuracy = self.history.get("test_accuracy", [])
        evaluated = [a for a in accuracy if a is not None]
        result = {
            **self.run_info,
            "status": status,
            "epochs": self.config.epochs,
            "epochs_completed": self.epochs_done,
            "seed": self.config.seed,
            "batch_size": self.config.batch_size,
            "train_samples": self.source.train_size,
            "test_accuracy": evaluated[-1] if evaluated else None,
            "test_accuracy_per_epoch": accuracy,
            "train_loss_per_epoch": self.history.get("train_loss", []),
            "learning_rates_after_epoch": self.history.get("learning_rate", []),
            "seconds_per_epoch": seconds,
            "samples_per_second": self.source.train_size / (sum(seconds) / len(seconds)) if seconds else None,
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
