"""What a run leaves on disk, and how it stops: never overwrite a run by accident, read its files back
with one-line errors when they are damaged, and turn SIGTERM / SIGINT into a clean stop.

A cluster scheduler sends SIGTERM before it pre-empts a job, and a user presses Ctrl-C (SIGINT). Both
are only *noted* here (:class:`StopRequests`); the Trainer looks at the note between two steps,
writes a checkpoint and ``result.json`` with ``"status": "interrupted"``, and raises
:class:`Interrupted`, which the command turns into one line and the shell's exit code for that
signal (143 for SIGTERM, 130 for SIGINT). Finishing the current step costs at most one step's time.
"""

from __future__ import annotations

import json
import pickle
import re
import shutil
import signal
import threading
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from .errors import UserError

CHECKPOINT = "checkpoint.pt"
RESULT = "result.json"
CONFIG = "config.yaml"
#: The files whose presence means a folder holds a run (train and continual write them).
RUN_FILES = (RESULT, CHECKPOINT, CONFIG)
#: What `bench` writes at the top of its folder.
BENCH_FILES = ("results.csv", "RESULTS.md")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


# ----- refusing to overwrite ------------------------------------------------------------------------
def held_run_file(out: Path, names: tuple[str, ...] = RUN_FILES) -> Path | None:
    """The first of ``names`` present in ``out`` (None when ``out`` holds no run)."""
    return next((out / name for name in names if (out / name).exists()), None)


def claim_out_dir(out: str | Path, resume: bool, overwrite: bool, names: tuple[str, ...] = RUN_FILES,
                  can_resume: bool = True, remove: bool = True) -> None:
    """Refuse an ``out`` that holds a run unless the user said --resume or --overwrite.

    With --overwrite the run's own files are removed (nothing else in the folder) unless ``remove``
    is False (a process that is not the writer only checks). Call it after every other check, so a
    refused command changes nothing on disk.
    """
    out = Path(out)
    if resume and overwrite:
        raise UserError("--resume and --overwrite contradict each other; pass one of them")
    held = held_run_file(out, names)
    if held is None or resume:
        return
    if not overwrite:
        how = "--resume to continue it or --overwrite to replace it" if can_resume else "--overwrite to replace it"
        raise UserError(f"{out} already holds a run ({held.name}); pass {how}")
    if not remove:
        return
    for name in names:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


# ----- reading back -----------------------------------------------------------------------------------
def read_json(path: str | Path, what: str = "result file") -> dict[str, Any]:
    """A JSON object from ``path``; a damaged or foreign file is one line naming it."""
    path = Path(path)
    try:
        value = json.loads(path.read_text())
    except OSError as exc:
        raise UserError(f"cannot read the {what} {path}: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise UserError(f"the {what} {path} is damaged (not valid JSON); delete it or use another --out") from None
    if not isinstance(value, dict):
        raise UserError(f"the {what} {path} is not a localcredit {what} (not a JSON object)")
    return value


#: The entries every checkpoint of this version has.
CHECKPOINT_KEYS = ("epochs_done", "fingerprint", "rule", "history")


def load_checkpoint(path: Path, device: torch.device | str) -> dict[str, Any]:
    """A Trainer checkpoint; a truncated, random or foreign file is one line naming it (UserError)."""
    damaged = f"the checkpoint {path} is damaged or incomplete"
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except (RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile,
            UnicodeDecodeError, AttributeError, KeyError, IndexError) as exc:
        if isinstance(exc, OSError) and exc.errno is not None:
            raise UserError(f"cannot read the checkpoint {path}: {exc.strerror}") from None
        raise UserError(f"{damaged} (torch.load: {_first_line(exc)}); delete it to start over, "
                        f"or use another --out") from None
    if not isinstance(state, dict) or any(key not in state for key in CHECKPOINT_KEYS):
        raise UserError(f"{path} is not a localcredit training checkpoint; use another --out")
    return state


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return re.sub(r"\s+", " ", text[0])[:160] if text else type(exc).__name__


# ----- --checkpoint-every -----------------------------------------------------------------------------
@dataclass(frozen=True)
class CheckpointEvery:
    """Mid-epoch checkpoints: every ``steps`` training steps, or every ``seconds`` of training."""

    steps: int | None = None
    seconds: float | None = None


def parse_checkpoint_every(text: str) -> CheckpointEvery:
    """``"500"`` (steps), ``"10m"`` / ``"30s"`` / ``"1h"`` (time) or ``"off"`` (epoch ends only)."""
    text = str(text).strip().lower()
    if text in ("off", "none", "0"):
        return CheckpointEvery()
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([smh]?)", text)
    if match is None or float(match.group(1)) <= 0 or (not match.group(2) and "." in match.group(1)):
        raise UserError(f"--checkpoint-every expects steps (500), a time (10m, 30s, 1h) or off; got {text!r}")
    number, unit = match.groups()
    if not unit:
        return CheckpointEvery(steps=int(number))
    return CheckpointEvery(seconds=float(number) * {"s": 1, "m": 60, "h": 3600}[unit])


# ----- signals ----------------------------------------------------------------------------------------
class Interrupted(Exception):
    """A run stopped on a signal after saving what it had; ``exit_code`` is the shell's for the signal."""

    def __init__(self, signum: int, what: str, resume_hint: str = "", epoch: int | None = None,
                 step: int | None = None):
        self.signum, self.epoch, self.step = signum, epoch, step
        hint = f"resume with: {resume_hint}" if resume_hint else "resume with --resume"
        super().__init__(f"stopped by {signal.Signals(signum).name}: {what}; {hint}")

    @classmethod
    def at_step(cls, signum: int, epoch: int, step: int, resume_hint: str = "") -> "Interrupted":
        return cls(signum, f"checkpoint written at epoch {epoch}, step {step}", resume_hint, epoch, step)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


#: A stop signal noted while no StopRequests was active (a process of a multi-process run that is still
#: starting, or already ending); see note_stop_signal.
_NOTED_SIGNAL = 0
#: Called with every stop signal this process notes (set by the launcher of a multi-process run).
_STOP_HOOK: Callable[[int], None] | None = None


def note_stop_signal(signum: int, frame: Any = None) -> None:
    """A signal handler: keep a stop signal for the Trainer instead of ending the process.

    For the processes of a multi-process run: a signal that reaches one of them while it is still
    loading data must stop the run cleanly at its first step, like the others, not kill it alone.
    """
    global _NOTED_SIGNAL
    _NOTED_SIGNAL = _NOTED_SIGNAL or signum
    if _STOP_HOOK is not None:
        _STOP_HOOK(signum)


def noted_stop_signal() -> int:
    return _NOTED_SIGNAL


def keep_stop_signals(hook: Callable[[int], None] | None = None) -> None:
    """From now on, in this process, stop signals are noted (note_stop_signal), and ``hook`` sees each."""
    global _STOP_HOOK
    _STOP_HOOK = hook
    for sig in STOP_SIGNALS:
        signal.signal(sig, note_stop_signal)


class StopRequests:
    """While active, SIGTERM and SIGINT set ``signum`` instead of ending the process.

    Only the main thread can install handlers; elsewhere (a run started from a worker thread) this
    is inert and signals keep their usual effect. Handlers are restored on exit.
    """

    def __init__(self, on_signal: Callable[[int], None] | None = None) -> None:
        self.signum = 0
        self.on_signal = on_signal  # e.g. pass the signal on to child processes
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopRequests":
        self.signum = self.signum or _NOTED_SIGNAL
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._note)
        return self

    def _note(self, signum: int, frame: Any) -> None:
        # The first signal wins: a forwarded copy of the same stop must not change the exit code.
        self.signum = self.signum or signum
        if self.on_signal is not None:
            self.on_signal(signum)
        if _STOP_HOOK is not None:  # a process of a multi-process run: noted for the whole process too
            note_stop_signal(signum)

    def __exit__(self, *exc: Any) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()
