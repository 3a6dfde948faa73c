"""What a run leaves on disk, and how it stops: never overwrite a run by accident, read its files back
with one-line errors when they are damaged, and turn SIGTERM / SIGINT into a clean stop.

A cluster scheduler sends SIGTERM before it pre-empts a job, and a user presses Ctrl-C (SIGINT). Both
are only *noted* here (:class:`StopRequests`); the Trainer looks at the note between two steps,
writes a checkpoint and ``result.json`` with ``"status": "interrupted"``, and raises
:class:`Interrupted`, which the command turns into one line and the shell's exit code for that
signal (143 for SIGTERM, 130 for SIGINT). Finishing the current step costs at most one step's time.
The command line keeps the signals noted until its process ends (:func:`keep_stop_signals_until_exit`,
:func:`exit_process`): one that comes after the run's files are written still ends it with that code.

Only one process works in a run folder at a time: it holds ``OUT/.lock`` (:func:`hold_run_folder`).
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import json
import os
import pickle
import re
import shlex
import shutil
import signal
import sys
import threading
import time
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import UserError

CHECKPOINT = "checkpoint.pt"
RESULT = "result.json"
CONFIG = "config.yaml"
#: The files whose presence means a folder holds a run (train and continual write them).
RUN_FILES = (RESULT, CHECKPOINT, CONFIG)
#: What `bench` writes at the top of its folder.
BENCH_FILES = ("results.csv", "RESULTS.md")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
#: The lock file of a run folder: locked (flock) by the process working there, holding its PID as text.
LOCK = ".lock"


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
    check_not_held(out)
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


# ----- one process per run folder ---------------------------------------------------------------------
#: How long a process tries to lock a run folder whose lock is taken (another process may be only checking it).
LOCK_PATIENCE_S = 0.5


def _in_use(out: Path) -> UserError:
    try:
        pid = (out / LOCK).read_text().strip()
    except OSError:
        pid = ""
    holder = f"PID {pid}" if pid.isdigit() else "another process"
    return UserError(f"{out} is in use by another localcredit process ({holder}); wait for it to end, "
                     f"or use another --out")


def check_not_held(out: str | Path) -> None:
    """Refuse a run folder another process is working in (it holds OUT/.lock); write nothing."""
    out = Path(out)
    try:
        fd = os.open(out / LOCK, os.O_RDONLY)
    except OSError:  # no lock file (or no folder): nobody works there
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        raise _in_use(out) from None
    finally:
        os.close(fd)  # and with it the shared lock this check took


class RunLock:
    """This process's hold on a run folder: ``OUT/.lock``, locked with ``flock`` and holding its PID.

    The operating system releases the lock however the process ends (``kill -9`` included), so a
    stale file never blocks anyone. :meth:`release` removes the file, and the folders the hold
    created when nothing else was written in them (a refused command leaves nothing behind).
    """

    def __init__(self, out: str | Path):
        self.out = Path(out)
        self.path = self.out / LOCK
        self.fd: int | None = None
        self.created: list[Path] = []  # deepest first

    def acquire(self) -> RunLock:
        folder = self.out.absolute()
        while not folder.exists():
            self.created.append(folder)
            folder = folder.parent
        try:
            self.out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"cannot create the run folder {self.out}: {exc.strerror or exc}") from None
        deadline = time.monotonic() + LOCK_PATIENCE_S
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                if time.monotonic() < deadline:
                    time.sleep(0.02)
                    continue
                self._remove_created()
                raise _in_use(self.out) from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # the holder released (and removed) the file between our open and our lock
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            self.fd = fd
            return self

    def release(self) -> None:
        if self.fd is None:
            return
        self.path.unlink(missing_ok=True)  # still locked: no other process holds this file
        os.close(self.fd)
        self.fd = None
        self._remove_created()

    def _remove_created(self) -> None:
        for folder in self.created:
            try:
                folder.rmdir()
            except OSError:  # something was written there: keep it (and the folders above it)
                break
        self.created = []

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def hold_run_folder(out: str | Path) -> RunLock:
    """Create ``out`` if needed and hold it (a RunLock, also a context manager that releases it);
    refused with one line naming the folder and the holder's PID when another process holds it."""
    return RunLock(out).acquire()


#: What :func:`atomic_write_bytes <localcredit.training.checkpoint.atomic_write_bytes>` names its temporary files.
_TEMPORARY = re.compile(r"\.(.+)\.[A-Za-z0-9_]{8}")


def remove_temporaries(out: str | Path, names: tuple[str, ...] = RUN_FILES) -> None:
    """Remove the temporary files of atomic writes that a killed process left (``.checkpoint.pt.k3x9_a2q``).

    Call it holding the folder: no other process is writing there then.
    """
    out = Path(out)
    if not out.is_dir():
        return
    for path in out.iterdir():
        match = _TEMPORARY.fullmatch(path.name)
        if match and match.group(1) in names and path.is_file():
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


def load_checkpoint(path: Path, device: torch.device | str, keys: tuple[str, ...] = CHECKPOINT_KEYS,
                    kind: str = "training") -> dict[str, Any]:
    """A checkpoint holding ``keys`` (default: a Trainer's); a truncated, random or foreign file is one line
    naming it (UserError)."""
    damaged = f"the checkpoint {path} is damaged or incomplete"
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except (RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile,
            UnicodeDecodeError, AttributeError, KeyError, IndexError) as exc:
        if isinstance(exc, OSError) and exc.errno is not None:
            raise UserError(f"cannot read the checkpoint {path}: {exc.strerror}") from None
        raise UserError(f"{damaged} (torch.load: {_first_line(exc)}); delete it to start over, "
                        f"or use another --out") from None
    if not isinstance(state, dict) or any(key not in state for key in keys):
        raise UserError(f"{path} is not a localcredit {kind} checkpoint; use another --out")
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
    def at_step(cls, signum: int, epoch: int, step: int, resume_hint: str = "") -> Interrupted:
        return cls(signum, f"checkpoint written at epoch {epoch}, step {step}", resume_hint, epoch, step)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def resume_command(argv: Sequence[str]) -> str:
    """The command line that continues this run: the same one, with --resume instead of --overwrite."""
    kept = [a for a in argv if a not in ("--overwrite", "--resume")]
    return "localcredit " + shlex.join([*kept, "--resume"])


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


#: Set by the command line (keep_stop_signals_until_exit): a StopRequests that ends leaves the stop
#: signals noted (note_late_stop_signal) instead of restoring their default action.
_UNTIL_EXIT = False
#: Set by exit_process: the command is done and the process is ending.
_EXITING = False


def keep_stop_signals_until_exit() -> None:
    """For a command's process: once a run's StopRequests ends (its result.json is written, or about to
    be), stop signals stay noted until the process exits, rather than killing it by their default
    action. The command then ends with 128 + the signal (see :func:`exit_process`)."""
    global _UNTIL_EXIT
    _UNTIL_EXIT = True


def note_late_stop_signal(signum: int, frame: Any = None) -> None:
    """A stop signal after a run's work: noted for the command; while the process ends, it ends at once
    with the signal's code (everything is written by then)."""
    note_stop_signal(signum)
    if _EXITING:
        _flush_stdio()
        with contextlib.suppress(OSError):
            os.write(2, _late_stop_line(signum).encode())
        os._exit(128 + signum)


def _late_stop_line(signum: int) -> str:
    return (f"localcredit: stopped by {signal.Signals(signum).name} as it ended; everything it had to write "
            f"is written\n")


def note_late_stop_signals() -> None:
    """Install :func:`note_late_stop_signal` for SIGTERM and SIGINT (main thread only)."""
    if threading.current_thread() is threading.main_thread():
        for sig in STOP_SIGNALS:
            signal.signal(sig, note_late_stop_signal)


def _flush_stdio() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError, AttributeError):  # closed, or a broken pipe: nothing more can be said
            pass


def exit_process(code: int) -> None:
    """End a command's process with ``code``, or with 128 + a stop signal noted after its work.

    The interpreter's own ending switches Python's signal handlers off before it frees every module
    and tensor (and torch's C++ state after that), so a SIGTERM arriving then would kill the process
    by the default action instead of ending it with the documented code. Here the stop signals stay
    noted while the atexit callbacks run (a signal then ends the process at once with its code),
    and the process then leaves without that teardown: everything is written and flushed by then.
    """
    global _EXITING
    note_late_stop_signals()
    _EXITING = True
    if _NOTED_SIGNAL and code == 0:
        code = 128 + _NOTED_SIGNAL
        print(_late_stop_line(_NOTED_SIGNAL), end="", file=sys.stderr)
    _flush_stdio()
    atexit._run_exitfuncs()  # what the interpreter would run: multiprocessing's finalisers, logging, ...
    _flush_stdio()
    os._exit(code)


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

    def __enter__(self) -> StopRequests:
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
            signal.signal(sig, note_late_stop_signal if _UNTIL_EXIT else previous)
        self._previous.clear()
