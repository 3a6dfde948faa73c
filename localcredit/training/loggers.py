"""Run loggers: a run's figures while it trains, for TensorBoard or a spreadsheet (``--log``).

``--log none | csv | tensorboard`` (an option of :class:`~localcredit.training.config.TrainSpec`)
names a logger of :data:`LOGGERS`. A training loop (the Trainer; the continual runner may use the
same calls) makes one for its run folder, hands it numbers, and closes it on every way out::

    logger = make_logger("csv", out_dir)                 # a new run: earlier logs in OUT/logs/ are removed
    logger = make_logger("csv", out_dir, resume_step=n)  # a resumed run: what came after step n is dropped
    logger.step_scalars(step, {"loss": 0.31, "lr": 1e-3, "samples_per_second": 5.1e4})
    logger.epoch_scalars(epoch, {"test_accuracy": 0.87, "rule/alignment/0": 0.42}, step=step)
    logger.close()

Steps count from 1 over the whole run (step s of epoch e, both from 1, is (e - 1) * steps_per_epoch
+ s), so a resumed run goes on numbering where its checkpoint stopped; epochs count from 1. A value
that is None is left out. Names are the columns of the CSV files and, in TensorBoard, the tags: a
name without ``/`` is filed under ``step/`` or ``epoch/``, one with ``/`` (``rule/alignment/0``)
is a tag of its own group. :func:`numeric_leaves` flattens JSON-like statistics into such names.

* ``none``: nothing.
* ``csv``: OUT/logs/steps.csv (``step``, then a column per name) and OUT/logs/epochs.csv
  (``epoch``, ``step``, ...); a name first seen later adds a column (the file is rewritten with it);
  every row is flushed as it is written, so ``tail -f`` follows it.
* ``tensorboard``: event files in OUT/logs/ (``tensorboard --logdir OUT/logs``), via
  ``torch.utils.tensorboard.SummaryWriter``; epoch figures are drawn at the ``step`` that ended the
  epoch when one is given (at the epoch number otherwise). Needs ``pip install 'localcredit[log]'``.

A logger writes only what it is handed: which steps are logged (the Trainer logs each step's
figures when it reads them from the device anyway, see ``localcredit.training.progress``) and in
which process is the caller's business.
"""

from __future__ import annotations

import csv
import importlib
import io
import numbers
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TextIO

from tqdm import tqdm

from ..errors import UserError
from .progress import EpochFigures, read_figures

#: The folder of a run folder that loggers write to.
LOGS = "logs"
#: What loggers write in OUT/logs/ (glob patterns): a new run removes them, whatever the logger.
LOG_FILES = ("steps.csv", "epochs.csv", "events.out.tfevents.*")
INSTALL = "pip install 'localcredit[log]'"

Scalars = Mapping[str, "float | None"]


class RunLogger:
    """The interface, and ``--log none``: logs nothing.

    A logger is made for ``folder`` (OUT/logs/); ``resume_step``: None for a new run, else the
    last step the run's checkpoint holds (what was logged after it is dropped).
    """

    #: Whether it writes anything (a loop may skip gathering figures for one that does not).
    active = False

    def __init__(self, folder: Path | None = None, resume_step: int | None = None):
        self.folder = folder

    @classmethod
    def missing(cls) -> str | None:
        """What this logger needs that is not installed, as the end of a sentence (None: nothing)."""
        return None

    def step_scalars(self, step: int, values: Scalars) -> None:
        """The figures of training step ``step`` (counted from 1 over the whole run)."""

    def epoch_scalars(self, epoch: int, values: Scalars, step: int | None = None) -> None:
        """The figures of epoch ``epoch`` (from 1); ``step``: the step that ended it."""

    def close(self) -> None:
        """Write out what is buffered and release the files; a second call does nothing."""


LOGGERS: dict[str, type[RunLogger]] = {"none": RunLogger}


def register_logger(name: str) -> Callable[[type[RunLogger]], type[RunLogger]]:
    def add(cls: type[RunLogger]) -> type[RunLogger]:
        LOGGERS[name] = cls
        return cls
    return add


def logger_problem(kind: str) -> str | None:
    """What is wrong with ``--log kind`` (the option's check), as the end of a sentence; None: nothing."""
    if kind not in LOGGERS:
        return f"must be one of {', '.join(LOGGERS)}, got {kind!r}"
    missing = LOGGERS[kind].missing()
    return f"{kind} {missing}" if missing else None


def make_logger(kind: str, out_dir: str | Path, resume_step: int | None = None) -> RunLogger:
    """The logger ``kind`` for the run folder ``out_dir`` (it writes in OUT/logs/).

    A new run (``resume_step`` None) first removes what loggers wrote in OUT/logs/ before (a run
    that ``--overwrite`` replaces); a resumed one keeps what was logged up to ``resume_step``.
    """
    problem = logger_problem(kind)
    if problem:
        raise UserError(f"--log {problem}")
    folder = Path(out_dir) / LOGS
    if resume_step is None and folder.is_dir():
        for pattern in LOG_FILES:
            for path in folder.glob(pattern):
                path.unlink()
    return LOGGERS[kind](folder, resume_step)


# ----- csv ---------------------------------------------------------------------------------------
class _CsvTable:
    """One CSV file of rows, appended and flushed row by row; a new name adds a column."""

    def __init__(self, path: Path, resume_step: int | None):
        self.path = path
        self.columns: list[str] = []
        rows: list[dict[str, str]] = []
        if resume_step is not None and path.exists():
            with path.open(newline="") as handle:
                reader = csv.DictReader(handle)
                self.columns = list(reader.fieldnames or [])
                rows = [row for row in reader if not _after(row.get("step"), resume_step)]
        self.handle = self._rewrite(rows)

    def write(self, row: dict[str, Any]) -> None:
        new = [name for name in row if name not in self.columns]
        if new:
            self.handle.close()
            with self.path.open(newline="") as handle:
                rows = list(csv.DictReader(handle))
            self.columns += new
            self.handle = self._rewrite(rows)
        csv.DictWriter(self.handle, self.columns, restval="").writerow(
            {name: "" if value is None else value for name, value in row.items()})
        self.handle.flush()

    def _rewrite(self, rows: list[dict[str, str]]) -> TextIO:
        """The file anew (header and ``rows``), written atomically; the handle that appends to it."""
        from .checkpoint import atomic_write_bytes  # not at the top: checkpoint -> config -> loggers

        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, self.columns, restval="", extrasaction="ignore")
        if self.columns:
            writer.writeheader()
        writer.writerows(rows)
        atomic_write_bytes(self.path, lambda handle: handle.write(text.getvalue().encode()))
        return self.path.open("a", newline="")

    def close(self) -> None:
        self.handle.close()  # a second close does nothing


def _after(step: str | None, resume_step: int) -> bool:
    try:
        return int(step) > resume_step  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False


@register_logger("csv")
class CsvLogger(RunLogger):
    """OUT/logs/steps.csv and OUT/logs/epochs.csv, one row per step / epoch."""

    active = True

    def __init__(self, folder: Path, resume_step: int | None = None):
        super().__init__(folder, resume_step)
        folder.mkdir(parents=True, exist_ok=True)
        self.steps = _CsvTable(folder / "steps.csv", resume_step)
        self.epochs = _CsvTable(folder / "epochs.csv", resume_step)

    def step_scalars(self, step: int, values: Scalars) -> None:
        self.steps.write({"step": step, **values})

    def epoch_scalars(self, epoch: int, values: Scalars, step: int | None = None) -> None:
        self.epochs.write({"epoch": epoch, "step": step, **values})

    def close(self) -> None:
        self.steps.close()
        self.epochs.close()


# ----- tensorboard -------------------------------------------------------------------------------
def summary_writer_class() -> type:
    """``torch.utils.tensorboard.SummaryWriter``; ImportError when the tensorboard package is missing."""
    return importlib.import_module("torch.utils.tensorboard").SummaryWriter


@register_logger("tensorboard")
class TensorBoardLogger(RunLogger):
    """Event files in OUT/logs/; a resumed run hides the events after its checkpoint (``purge_step``)."""

    active = True

    def __init__(self, folder: Path, resume_step: int | None = None):
        super().__init__(folder, resume_step)
        folder.mkdir(parents=True, exist_ok=True)
        purge = resume_step + 1 if resume_step is not None else None
        self.writer = summary_writer_class()(str(folder), purge_step=purge, flush_secs=30)

    @classmethod
    def missing(cls) -> str | None:
        try:
            summary_writer_class()
        except ImportError:
            return f"needs the tensorboard package: {INSTALL}"
        return None

    def step_scalars(self, step: int, values: Scalars) -> None:
        self._add("step", values, step)

    def epoch_scalars(self, epoch: int, values: Scalars, step: int | None = None) -> None:
        self._add("epoch", values, epoch if step is None else step)

    def _add(self, group: str, values: Scalars, x: int) -> None:
        for name, value in values.items():
            if value is not None:
                self.writer.add_scalar(name if "/" in name else f"{group}/{name}", value, x)

    def close(self) -> None:
        self.writer.close()  # a closed SummaryWriter ignores a second close


# ----- what a loop hands them --------------------------------------------------------------------
def numeric_leaves(value: Any, prefix: str) -> dict[str, float]:
    """The numbers of a JSON-like value by path: ``{"a": {"b": [1, 2]}, "c": "x"}`` under ``rule`` ->
    ``{"rule/a/b/0": 1.0, "rule/a/b/1": 2.0}``; strings, None and booleans are left out."""
    if isinstance(value, bool) or value is None:
        return {}
    if isinstance(value, numbers.Real):
        return {prefix: float(value)}
    if isinstance(value, Mapping):
        items: Any = value.items()
    else:
        items = enumerate(value) if isinstance(value, (list, tuple)) else ()
    leaves: dict[str, float] = {}
    for key, item in items:
        leaves.update(numeric_leaves(item, f"{prefix}/{key}"))
    return leaves


StepsRead = Callable[[list[int], list[dict[str, float]], float], None]


class LoggedFigures(EpochFigures):
    """:class:`~localcredit.training.progress.EpochFigures` that also hands every step's figures, once
    read from the device (where they are read anyway: no extra wait), to ``on_read(steps, figures,
    seconds)``; ``steps`` are 0-based within the epoch, ``seconds`` the time since the last read."""

    def __init__(self, epoch: int, totals: dict[str, float], every: int, bar: tqdm, on_read: StepsRead):
        super().__init__(epoch, totals, every, bar)
        self.on_read = on_read
        self.since = time.perf_counter()

    def read(self) -> None:
        steps = [step for step, _ in self.unread]
        figures = read_figures([step_figures for _, step_figures in self.unread])
        self.unread = list(zip(steps, figures))  # type: ignore[arg-type]  # floats now: super() reads nothing more
        super().read()  # Diverged at a step whose loss is not finite: the window is not logged
        if steps:
            now = time.perf_counter()
            self.on_read(steps, figures, now - self.since)
            self.since = now

