"""Checkpoints and atomic writes: saving, reading, checking and restoring a Trainer's checkpoint
(:class:`CheckpointMixin`, which :class:`~localcredit.training.trainer.Trainer` inherits), and what a
checkpoint's fingerprint and process layout say.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch

from ..errors import UserError
from .config import LOOP_ONLY
from .progress import EpochProgress
from .runfiles import CHECKPOINT, load_checkpoint

if TYPE_CHECKING:
    from ..rules.base import Rule
    from .config import TrainConfig
    from .trainer import Parallelism, Trainer


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


class CheckpointMixin:
    """The Trainer's checkpoint methods; they use its rule, config, run_info, out_dir, device, parallel,
    history, epochs_done and schedulers."""

    # The Trainer's attributes these methods use (declared for the type checker; the Trainer sets them).
    rule: Rule
    config: TrainConfig
    run_info: dict[str, Any]
    out_dir: Path | None
    device: torch.device
    parallel: Parallelism
    history: dict[str, list]
    epochs_done: int
    schedulers: list[torch.optim.lr_scheduler.LRScheduler | None]
    last_checkpoint: float

    def _fingerprint(self) -> dict[str, Any]:
        """What must match for a checkpoint to be resumed by this run (not where the data lives, nor the command)."""
        return {"train": {k: v for k, v in asdict(self.config).items() if k not in LOOP_ONLY},
                "run": {k: v for k, v in self.run_info.items() if k not in ("command", "data_root")}}

    def _save_checkpoint(self, progress: EpochProgress | None) -> None:
        """Every process calls this (the layout may gather state); the writer writes, atomically.

        ``progress``: the epoch under way for a mid-epoch checkpoint, None at an epoch's end.
        """
        extra = self.parallel.checkpoint_extra(cast("Trainer", self), progress)  # the mixin's one host
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
        assert self.out_dir is not None  # called only for a run with an output folder
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
        self.parallel.load_checkpoint_extra(cast("Trainer", self), state.get("parallel") or {})
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

    --epochs may grow on resume (train a finished run further; see _total_epochs_schedule), and how the
    loop reports (LOOP_ONLY: --log) may change; nothing else may. The network's description counts only
    when no option explains the difference.
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
            if key == "epochs" or key in LOOP_ONLY or old.get(key) == new.get(key):
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
