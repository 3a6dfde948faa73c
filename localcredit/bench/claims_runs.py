"""The runs and measurements of a claims plan in its output folder: each run's folder and ``localcredit
train`` command line, the tuning grids and the learning rate they choose, each measurement's command line,
and the name of the folder's timing log. ``claims_suite`` runs them; ``claims_report`` reads them back.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..spec import flag_of, option_fields, to_argv
from ..training.runfiles import CHECKPOINT
from .claims_cases import Arm, Case, ClaimsPlan, Measure
from .plan import Entry, Run, Suite, default_lr, initial_grid, is_finished, read_result, spec_of
from .runner import best_lr, widen


# ----- runs ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ClaimRun:
    """A training of the suite: a plan.Run in a setting."""

    setting: Suite
    run: Run

    def folder(self, out: Path) -> Path:
        return self.run.folder(out / self.setting.name)


#: A run's command line starts with these options, written even at their defaults: it states the whole recipe.
LEADING_FIELDS = ("rule", "data", "arch", "hidden", "channels", "epochs", "batch_size", "optimizer", "lr", "seed")


def train_arguments(job: ClaimRun, out: Path, threads: int, passed_on: Sequence[str] = ()) -> list[str]:
    """The ``localcredit train`` command line of one run, the recipe's main fields always written."""
    from ..experiment import RunSpec

    spec = spec_of(job.run, job.setting)
    flags = {f.name: flag_of(f) for f in option_fields(RunSpec)}
    given = to_argv(spec)
    pairs = list(zip(given[::2], given[1::2]))
    for name in LEADING_FIELDS:
        value = getattr(spec, name)
        if value is not None and value != [] and all(flag != flags[name] for flag, _ in pairs):
            pairs.append((flags[name], ",".join(map(str, value)) if isinstance(value, list) else str(value)))
    order = [flags[name] for name in LEADING_FIELDS]
    pairs.sort(key=lambda pair: order.index(pair[0]) if pair[0] in order else len(order))  # stable: the rest keep theirs
    return ["train", *(word for pair in pairs for word in pair), "--threads", str(threads), *passed_on,
            "--out", str(job.folder(out)), "--quiet"]


def command_text(job: ClaimRun, out: Path) -> str:
    """What a reader types to make the run (one thread, its folder as the bench names it)."""
    return "localcredit " + " ".join(train_arguments(job, out, 1)[:-1])


def tuned(arm: Arm, setting: Suite) -> bool:
    return arm.lr is None and setting.tune_epochs > 0


def tuning_keys(plan: ClaimsPlan, cases: Sequence[Case]) -> list[tuple[str, Entry, str]]:
    """(setting, entry, data) of every tuned row of ``cases``, once each."""
    keys: dict[tuple[str, Entry, str], None] = {}
    for case in cases:
        for arm in (*case.arms, *(m.arm for m in case.measures)):
            setting = plan.settings[arm.setting]
            if tuned(arm, setting):
                keys.update({(arm.setting, arm.entry, data): None for data in arm.datasets})
    return list(keys)


def tune_run(setting: Suite, entry: Entry, data: str, lr: float) -> ClaimRun:
    return ClaimRun(setting, Run("tune", entry, data, 0, lr))


def grid_of(plan: ClaimsPlan, key: tuple[str, Entry, str], out: Path) -> tuple[list[float], bool]:
    """A tuned row's grid as far as its runs went, and whether it is complete (every round's runs finished)."""
    setting = plan.settings[key[0]]
    lrs = initial_grid(key[1], setting)
    for round_ in range(setting.lr_extensions + 1):
        if not all(is_finished(read_result(tune_run(setting, key[1], key[2], lr).folder(out))) for lr in lrs):
            return lrs, False
        extra = widen(lrs, best_lr(key[1], key[2], lrs, out / setting.name, setting), setting.lr_step)
        if extra is None or round_ == setting.lr_extensions:
            return lrs, True
        lrs = sorted([*lrs, extra])
    return lrs, True


def chosen_lr(plan: ClaimsPlan, arm: Arm, data: str, out: Path) -> float | None:
    """The learning rate of an arm's final runs on ``data``; None while its tuning is unfinished."""
    setting = plan.settings[arm.setting]
    if arm.lr is not None:
        return arm.lr
    if not tuned(arm, setting):
        return default_lr(arm.entry, setting)
    lrs, complete = grid_of(plan, (arm.setting, arm.entry, data), out)
    return best_lr(arm.entry, data, lrs, out / setting.name, setting) if complete else None


def final_runs(plan: ClaimsPlan, arm: Arm, out: Path) -> list[ClaimRun | None]:
    """An arm's final runs (None for a data set whose learning rate is not chosen yet), data set by data set."""
    setting = plan.settings[arm.setting]
    runs: list[ClaimRun | None] = []
    for data in arm.datasets:
        lr = chosen_lr(plan, arm, data, out)
        runs += [None if lr is None else ClaimRun(setting, Run("final", arm.entry, data, seed, lr))
                 for seed in range(arm.seeds)]
    return runs


def measure_arguments(plan: ClaimsPlan, measure: Measure, out: Path, threads: int) -> list[str] | None:
    """``python -m localcredit.bench.claims_measure ...`` of a measurement (None while what it needs is missing)."""
    case = next(c for c in plan.cases if measure in c.measures)
    setting = plan.settings[measure.arm.setting]
    head = [sys.executable, "-m", "localcredit.bench.claims_measure", measure.kind]
    tail = [*measure.extra, "--threads", str(threads), "--out", str(measure.file(out, case.name))]
    lr = chosen_lr(plan, measure.arm, measure.data, out)
    if lr is None:
        return None
    job = ClaimRun(setting, Run("final", measure.arm.entry, measure.data, measure.seed, lr))
    if measure.kind in ("memory", "align-curve"):
        return [*head, *to_argv(spec_of(job.run, setting)), *tail]
    if not is_finished(read_result(job.folder(out))) or not (job.folder(out) / CHECKPOINT).exists():
        return None
    return [*head, "--run", str(job.folder(out)), *tail]


#: OUT/timing.json: each invocation's wall time, its processes' wall and CPU seconds and the load averages
#: (claims_suite writes it, the report reads it).
TIMING = "timing.json"
