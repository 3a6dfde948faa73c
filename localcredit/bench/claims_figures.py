"""The claims report's figures: an arm's finished runs read back (``Stats``, through ``Context``, which reads
each run folder once), how two test errors are compared (the tolerance: see claims_report), and the
verdict a case's analysis fills in (``Verdict``, ``CaseReport``, ``not_run``).
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .claims_cases import Arm, Case, ClaimsPlan
from .claims_runs import ClaimRun, command_text, final_runs
from .plan import read_result

MIN_TOLERANCE = 0.05  # points of test error
HOLDS, PARTLY, NOT, UNTESTABLE, NOT_RUN = "holds", "holds partly", "does not hold", "cannot be tested here", "not run"


# ----- figures of runs -------------------------------------------------------------------------------
@dataclass
class Stats:
    """An arm's final runs on one data set: test error (%) of each finished run, final and best epoch."""

    planned: int = 0
    final: list[float] = field(default_factory=list)
    best: list[float] = field(default_factory=list)
    best_epoch: list[int] = field(default_factory=list)
    curves: list[list[float]] = field(default_factory=list)
    diverged: int = 0
    lr: float | None = None
    command: str = ""

    @property
    def done(self) -> bool:
        return self.planned > 0 and len(self.final) == self.planned

    @property
    def mean(self) -> float:
        return statistics.mean(self.final)


def errors_of(result: dict) -> list[float]:
    return [100 * (1 - a) for a in result.get("test_accuracy_per_epoch", []) if isinstance(a, (int, float))]


class Context:
    """The plan, the output folder, and the runs read so far (each folder once)."""

    def __init__(self, plan: ClaimsPlan, out: Path):
        self.plan, self.out = plan, out
        self._results: dict[Path, dict | None] = {}

    def result(self, job: ClaimRun) -> dict | None:
        folder = job.folder(self.out)
        if folder not in self._results:
            self._results[folder] = read_result(folder)
        return self._results[folder]

    def jobs(self, arm: Arm, data: str) -> list[ClaimRun | None]:
        runs = final_runs(self.plan, arm, self.out)
        i = arm.datasets.index(data)
        return runs[i * arm.seeds:(i + 1) * arm.seeds]

    def stats(self, arm: Arm, data: str) -> Stats:
        stats = Stats(planned=arm.seeds)
        for job in self.jobs(arm, data):
            if job is None:
                continue
            stats.lr = job.run.lr
            stats.command = stats.command or command_text(job, self.out)
            result = self.result(job) or {}
            errors = errors_of(result)
            if result.get("status") == "diverged":  # counted at chance level (90 % error on 10 classes)
                stats.diverged += 1
                errors = [*errors, 90.0]
            elif result.get("status") != "ok" or result.get("epochs_completed") != result.get("epochs") or not errors:
                continue
            best = min(errors)
            stats.final.append(errors[-1])
            stats.best.append(best)
            stats.best_epoch.append(errors.index(best) + 1)
            stats.curves.append(errors)
        return stats

    def measure(self, case: Case, name: str) -> dict | None:
        measure = next((m for m in case.measures if m.name == name), None)
        path = measure.file(self.out, case.name) if measure else None
        return json.loads(path.read_text()) if path is not None and path.exists() else None


def fmt(values: Sequence[float], digits: int = 2) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def cell(stats: Stats, best: bool = False) -> str:
    if not stats.final:
        return "not run" if stats.planned else "-"
    text = fmt(stats.best if best else stats.final)
    if best:
        text += f" (ep. {'/'.join(map(str, stats.best_epoch))})"
    if not stats.done:
        text += f" ({len(stats.final)} of {stats.planned} seeds)"
    if stats.diverged:
        text += f" ({stats.diverged} diverged)"
    return text


def tolerance(a: Sequence[float], b: Sequence[float] = ()) -> float:
    """Twice the standard error of the difference of two means (a published figure: b empty), at least 0.05."""
    variance = sum(statistics.variance(v) / len(v) for v in (a, b) if len(v) > 1)
    return max(2 * math.sqrt(variance), MIN_TOLERANCE)


def compare(a: Sequence[float], b: Sequence[float]) -> int:
    """-1: a's error is lower beyond the tolerance; 1: higher; 0: a tie."""
    d = statistics.mean(a) - statistics.mean(b)
    t = tolerance(a, b)
    return -1 if d < -t else 1 if d > t else 0


def seeds_text(n: int) -> str:
    return "seed 0" if n == 1 else f"seeds 0-{n - 1}"


# ----- verdicts --------------------------------------------------------------------------------------
@dataclass
class Verdict:
    ours: str = "not run"
    bp: str = "-"
    verdict: str = NOT_RUN
    evidence: str = ""
    command: str = ""
    read: bool = False  # read from results made elsewhere (not this suite's runs): the same at any budget


@dataclass
class CaseReport:
    verdicts: dict[str, Verdict] = field(default_factory=dict)
    lines: list[str] = field(default_factory=list)
    plots: list[str] = field(default_factory=list)


def not_run(ctx: Context, case: Case, missing: str = "") -> Verdict:
    quick = " --quick" if ctx.plan.quick else ""
    hint = f"`localcredit bench --suite claims{quick} --cases {case.name} --out {ctx.out} --resume`"
    return Verdict(evidence=f"{missing or 'Its runs are not all finished'}; run {hint}.")
