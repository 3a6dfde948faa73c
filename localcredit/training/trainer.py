"""The Trainer: epochs of ``rule.step`` over shuffled batches, evaluation, checkpoints, results.

It knows no rule: it only calls ``rule.step``, ``rule.predict``, ``rule.start_epoch``,
``rule.statistics``, the rule's optimisers (for learning-rate schedules) and its checkpoint state.
The training recipe -- epochs, batches, data order, augmentation, schedule, evaluation cadence -- is
:class:`TrainSpec`, the same for every rule.

Batches come from a :class:`BatchSource`: slices of in-memory tensors, or a DataLoader for data
that is streamed from disk.

It knows no process layout either: a :class:`Parallelism` runs its epochs and steps and says
whether this process is the one that evaluates and writes. The default is one process doing
everything; ``localcredit.training.distributed`` provides data-parallel and block-pipeline ones.
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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator

import torch
from tqdm import tqdm

from .augment import augment_batch, augment_seed, parse_augment
from ..data import Dataset
from ..data.streaming import StreamedDataset
from ..errors import UserError
from ..rules.base import Rule, StepFigures
from .runfiles import (CHECKPOINT, RESULT, Interrupted, StopRequests, hold_run_folder, load_checkpoint,
                       parse_checkpoint_every, read_json, remove_temporaries)
from ..spec import at_least, check, one_of, option, parse_ints, positive


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


class Diverged(RuntimeError):
    """The loss or the weights stopped being finite.

    ``step`` is the step whose loss first was not finite; on CUDA the Trainer reads the losses every
    :data:`CUDA_SYNC_EVERY` steps, so it stops up to that many steps after that one.
    """

    def __init__(self, epoch: int, step: int, what: str):
        super().__init__(f"training diverged at epoch {epoch}, step {step}: {what} is not finite "
                         f"(try a smaller --lr)")
        self.epoch, self.step = epoch, step


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


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process: allocated device memory on CUDA, else peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def current_umask() -> int:
    """The process's umask, read without changing it (Linux); elsewhere set and restored at once."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: Path, write: Callable[[Any], None]) -> None:
    """Write via a temporary file in the same folder and rename, so a crash never leaves half a file.

    The file gets the permissions of any file this process creates (0o666 less the umask), not
    mkstemp's private 0o600.
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), 0o666 & ~current_umask())
            write(handle)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path: Path, payload: dict[str, Any]) -> None:
    atomic_write_bytes(path, lambda handle: handle.write((json.dumps(payload, indent=2) + "\n").encode()))


#: DataLoader worker processes that decode streamed data while the network trains.
LOADER_WORKERS = min(2, os.cpu_count() or 1)


class BatchSource:
    """Training and test batches of in-memory tensors (sliced, never copied sample by sample)."""

    def __init__(self, data: Dataset, limit: int | None, device: torch.device):
        limit = limit or len(data.x_train)
        self.x_train = data.x_train[:limit].to(device)
        self.y_train = data.y_train[:limit].to(device)
        self.x_test = data.x_test.to(device)
        self.y_test = data.y_test.to(device)

    @property
    def train_size(self) -> int:
        return len(self.y_train)

    @property
    def test_size(self) -> int:
        return len(self.y_test)

    def train_batches(self, batches: list[torch.Tensor]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for index in batches:
            yield self.x_train[index], self.y_train[index]

    def test_batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for start in range(0, self.test_size, batch_size):
            yield self.x_test[start:start + batch_size], self.y_test[start:start + batch_size]

    def black(self) -> torch.Tensor:
        """Per-channel smallest training value: what augmentation pads with."""
        return self.x_train.amin(dim=(0, *range(2, self.x_train.dim())))


class StreamedSource:
    """Training and test batches of a streamed data set, decoded by DataLoader workers.

    The same index batches as in memory (the epoch's seeded order), so a streamed run sees its
    samples in the order an in-memory run of the same data would.
    """

    def __init__(self, data: StreamedDataset, limit: int | None, device: torch.device, workers: int):
        self.data, self.device, self.workers = data, device, workers
        self.train_size = min(limit or len(data.y_train), len(data.y_train))
        self.test_size = len(data.y_test)

    def _batches(self, split: str, batches: list) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for x, y in self.data.loader(split, batches, self.workers):
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def train_batches(self, batches: list[torch.Tensor]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self._batches("train", [b.tolist() for b in batches])

    def test_batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        starts = range(0, self.test_size, batch_size)
        return self._batches("test", [list(range(s, min(s + batch_size, self.test_size))) for s in starts])

    def black(self) -> torch.Tensor:
        """Per-channel smallest value of the first (up to) 512 training images."""
        x, _ = next(self._batches("train", [list(range(min(512, self.train_size)))]))
        return x.amin(dim=(0, 2, 3))


def batch_source(data: Dataset | StreamedDataset, limit: int | None, device: torch.device,
                 workers: int = LOADER_WORKERS) -> BatchSource | StreamedSource:
    if isinstance(data, StreamedDataset):
        return StreamedSource(data, limit, device, workers)
    return BatchSource(data, limit, device)


#: TrainConfig fields that change how the loop reports or saves, never the numbers: not part of a run's identity.
LOOP_ONLY = ("progress", "eval_batch_size", "checkpoint_every", "resume_hint")


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


#: Processes agree whether to checkpoint or stop every this many steps (single process: every step).
AGREE_EVERY = 8


class Parallelism:
    """How a Trainer's work is spread over processes. This default: one process does everything."""

    #: This process evaluates, writes result.json and checkpoints, and shows the progress bar.
    writer: bool = True

    def attach(self, trainer: "Trainer") -> None:
        """Once per fit, after a resume has loaded the checkpoint, before the first epoch."""

    def train_epoch(self, trainer: "Trainer", progress: EpochProgress) -> None:
        trainer.train_epoch(progress)

    def step(self, trainer: "Trainer", x: torch.Tensor, y: torch.Tensor) -> StepFigures:
        """One training step on the whole global batch ``x``, ``y`` (augmented already); its figures, unread."""
        return trainer.rule.step(x, y)

    def finish_epoch(self, trainer: "Trainer") -> None:
        """After an epoch's training, before the writer evaluates and checkpoints it."""

    def agree(self, wants: tuple[int, int], steps_done: int) -> tuple[int, int] | None:
        """(checkpoint now?, stop signal) as all processes see it, or None: no decision at this step."""
        return wants

    def settle(self, wants: tuple[int, int]) -> tuple[int, int]:
        """The same, at an epoch's end, where every process is waiting anyway (always decides)."""
        return wants

    def checkpoint_extra(self, trainer: "Trainer", progress: EpochProgress | None) -> dict[str, Any]:
        """Called by every process before a checkpoint: what the writer saves beyond its own state."""
        return {}

    def load_checkpoint_extra(self, trainer: "Trainer", extra: dict[str, Any]) -> None:
        """Every process, on resume: take this process's share of ``checkpoint_extra``."""

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
        self.source = batch_source(data, config.limit_train, self.device)
        check_step_sizes(self.source.train_size, config.batch_size, smallest_step(rule))
        #: Samples per step of every epoch (with batch norm, a last step of 1 sample joins the one before).
        self.step_sizes = step_sizes(self.source.train_size, config.batch_size, smallest_step(rule))
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

    @property
    def x_train(self) -> torch.Tensor:
        """The in-memory training inputs (what the multi-process layouts slice)."""
        return self.source.x_train

    @property
    def y_train(self) -> torch.Tensor:
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
        return augment_batch(x, self.augment, generator, self.black)

    def progress_bar(self, epoch: int, steps: int, done: int = 0) -> tqdm:
        """A bar over the epoch's steps, ``done`` of them already (a resumed epoch); call ``update()`` per step."""
        return tqdm(total=steps, initial=done, desc=f"epoch {epoch + 1}/{self.config.epochs}", unit="batch",
                    disable=not (self.config.progress and self.parallel.writer) or None, leave=False,
                    file=sys.stderr)

    def train_epoch(self, progress: EpochProgress) -> None:
        epoch, steps = progress.epoch, self.steps_per_epoch
        bar = self.progress_bar(epoch, steps, progress.steps_done)
        figures = EpochFigures(epoch, progress.totals, self.sync_every, bar)
        start = time.perf_counter()
        for step, (x, y) in zip(range(progress.steps_done, steps), self.training_batches(epoch, progress.steps_done)):
            figures.add(step, self.parallel.step(self, x, y))
            bar.update()
            progress.steps_done = step + 1
            self.at_step_boundary(progress, time.perf_counter() - start, totals=figures.summed)
        totals = figures.summed()
        bar.close()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = progress.seconds + time.perf_counter() - start
        self.record_epoch(epoch, seconds, {k: v / steps for k, v in totals.items()})

    @property
    def steps_per_epoch(self) -> int:
        return len(self.step_sizes)

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
            correct += (self.rule.predict(x) == y).sum().item()
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

    def _fingerprint(self) -> dict[str, Any]:
        """What must match for a checkpoint to be resumed by this run (not where the data lives, nor the command)."""
        return {"train": {k: v for k, v in asdict(self.config).items() if k not in LOOP_ONLY},
                "run": {k: v for k, v in self.run_info.items() if k not in ("command", "data_root")}}

    def _save_checkpoint(self, progress: EpochProgress | None) -> None:
        """Every process calls this (the layout may gather state); the writer writes, atomically.

        ``progress``: the epoch under way for a mid-epoch checkpoint, None at an epoch's end.
        """
        extra = self.parallel.checkpoint_extra(self, progress)
        self.last_checkpoint = time.monotonic()
        if self.out_dir is None or not self.parallel.writer:
            return
        state = {"epochs_done": self.epochs_done, "fingerprint": json.dumps(self._fingerprint(), sort_keys=True),
                 "rule": self.rule.checkpoint_state(), "history": dict(self.history),
                 "schedulers": [s.state_dict() if s is not None else None for s in self.schedulers],
                 "torch_rng": torch.get_rng_state(), "parallel": extra, "layout": self.layout(),
                 "epoch_progress": progress.state() if progress is not None else None}
        if self.device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        atomic_write_bytes(self.out_dir / CHECKPOINT, lambda handle: torch.save(state, handle))

    def _read_checkpoint(self) -> dict[str, Any] | None:
        """The checkpoint in out_dir, checked to be whole and of this run (None when there is none)."""
        path = self.out_dir / CHECKPOINT
        if not path.exists():
            if self.parallel.writer:
                print(f"no checkpoint in {self.out_dir}; starting from epoch 1", file=sys.stderr)
            return None
        state = load_checkpoint(path, self.device)
        try:
            saved = json.loads(state["fingerprint"])
        except (TypeError, ValueError):
            raise UserError(f"{path} is not a localcredit training checkpoint; use another --out") from None
        current = json.loads(json.dumps(self._fingerprint(), sort_keys=True))  # as the checkpoint holds it
        differences = _run_differences(saved, current)
        if differences is None:
            raise UserError(f"{path} is not a localcredit training checkpoint; use another --out")
        if differences:
            raise UserError(f"the checkpoint in {self.out_dir} was made with other options "
                            f"({'; '.join(differences)}); use another --out or the same options to resume")
        planned, epochs = saved["train"].get("epochs"), self.config.epochs
        schedule = _total_epochs_schedule(current)
        if schedule and planned != epochs:
            raise UserError(f"the checkpoint in {self.out_dir} follows {schedule} over {planned} epoch(s); "
                            f"--epochs {epochs} would change that schedule: resume with --epochs {planned}, "
                            f"or start a new run (another --out, or --overwrite)")
        saved_layout = checkpoint_layout(state)
        if state.get("epoch_progress") and saved_layout != self.layout():
            # Mid-epoch, each layout keeps its own partial state (per-stage sums, per-process statistics).
            raise UserError(f"the checkpoint in {self.out_dir} stopped in the middle of an epoch under "
                            f"{describe_layout(saved_layout)}; resume it the same way, not under "
                            f"{describe_layout(self.layout())} (a layout may change at an epoch's end)")
        return state

    def layout(self) -> dict[str, Any]:
        """How this run is spread over processes: {"mode": none | data | blocks, "procs": K}."""
        described = self.parallel.describe()
        return {"mode": described["mode"], "procs": described["procs"]}

    def _restore(self, state: dict[str, Any]) -> EpochProgress | None:
        """Load a checkpoint's state; the epoch it stopped in, when it stopped mid-epoch."""
        self.rule.load_checkpoint_state(state["rule"])
        for scheduler, saved_schedule in zip(self.schedulers, state.get("schedulers", []), strict=False):
            if scheduler is not None and saved_schedule is not None:
                scheduler.load_state_dict(saved_schedule)
        self.history = defaultdict(list, {k: list(v) for k, v in state["history"].items()})
        self.epochs_done = min(state["epochs_done"], self.config.epochs)
        torch.set_rng_state(state["torch_rng"].cpu())
        if "cuda_rng" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"].cpu(), self.device)
        self.parallel.load_checkpoint_extra(self, state.get("parallel") or {})
        progress = state.get("epoch_progress")
        return EpochProgress(**progress) if progress else None


def checkpoint_layout(state: dict[str, Any]) -> dict[str, Any]:
    """The process layout a checkpoint was written under (inferred for a checkpoint that does not say)."""
    if isinstance(state.get("layout"), dict):
        return state["layout"]
    ranks = (state.get("parallel") or {}).get("ranks") or []
    totals = (state.get("epoch_progress") or {}).get("totals") or {}
    return {"mode": "blocks" if "per_rank" in totals else "data" if ranks else "none", "procs": max(len(ranks), 1)}


def describe_layout(layout: dict[str, Any]) -> str:
    if layout["mode"] == "none" or layout["procs"] == 1:
        return "one process"
    return f"--parallel {layout['mode']} --procs {layout['procs']}"


def _run_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str] | None:
    """What differs between a checkpoint's fingerprint and this run's, one ``--flag: X in the checkpoint,
    Y now`` per option (None: a fingerprint of another shape, not this run's).

    --epochs may grow on resume (train a finished run further; see _total_epochs_schedule); nothing
    else may change. The network's description counts only when no option explains the difference.
    """
    try:
        pairs = [(saved[part], current[part]) for part in ("train", "run")]
    except (KeyError, TypeError):
        return None
    if not all(isinstance(old, dict) and isinstance(new, dict) for old, new in pairs):
        return None
    found: dict[str, str] = {}
    for old, new in pairs:
        for key in sorted(set(old) | set(new)):
            if key == "epochs" or old.get(key) == new.get(key):
                continue
            if key == "options" and isinstance(old.get(key), dict) and isinstance(new.get(key), dict):
                for option in sorted(set(old[key]) | set(new[key])):
                    was, now = old[key].get(option, "unset"), new[key].get(option, "unset")
                    if was != now:
                        found[f"--set {option}"] = _was_now(was, now)
            else:
                found.setdefault(f"--{key.replace('_', '-')}", _was_now(old.get(key, "unset"), new.get(key, "unset")))
    if "--rule" in found:  # another rule has other options (and maybe another network): the rule says it all
        found = {flag: values for flag, values in found.items() if not flag.startswith("--set ")}
    if len(found) > 1:
        found.pop("--network", None)
    return [f"{flag}: {values}" for flag, values in found.items()]


def _was_now(old: Any, new: Any) -> str:
    def text(value: Any) -> str:
        if value is None:  # left to its default (a rule's learning rate, ...)
            return "default"
        if isinstance(value, list):
            return ",".join(map(str, value)) or "none"
        return str(value)
    return f"{text(old)} in the checkpoint, {text(new)} now"


def _total_epochs_schedule(fingerprint: dict[str, Any]) -> str | None:
    """What in a run is planned over its total epochs, so that --epochs cannot change on resume."""
    if fingerprint["train"].get("lr_schedule") == "cosine":
        return "a cosine learning-rate schedule (--lr-schedule cosine)"
    options = fingerprint["run"].get("options")
    if isinstance(options, dict) and options.get("schedule") == "layerwise":
        return "a layer-wise schedule (--set schedule=layerwise)"
    return None
