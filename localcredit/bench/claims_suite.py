"""The claims suite: every claim of the four seed papers checked by an experiment, a verdict each (issue 28).

``localcredit bench --suite claims [--quick] [--cases a,b] [--resume]`` plans one *case* per claim (or
per group of claims one experiment answers): a set of runs -- rules x networks x data sets x seeds, each
an ordinary ``localcredit train`` process -- and measurements that a run's result.json does not hold
(``claims_measure``: memory traffic, alignment with BP over training, where an LFNN reads its prediction);
``claims_report`` then reads everything back and writes one verdict row per claim.

Runs live in *settings*: a network and a recipe (``plan.Suite`` records, so ``plan.spec_of`` writes their
command lines). A run's folder is ``OUT/<setting>/runs/<stage>/<data>/<row>-<arch>/lr<lr>-seed<s>``, so
two cases that need the same run (the fixed-random case and the BP-free comparison both train local-random
on the VGG) share it, and it trains once.

Fairness, by construction (the bench's rules):

* every rule of a setting trains its network (a rule that needs an invertible one trains the nearest
  invertible network, with BP beside it on that network);
* in a setting that tunes, every rule, BP included, gets the same budget: its default learning rate x
  1/3, 1, 3 (one more step beyond an edge that wins), one epoch on a validation split carved from the
  training data (``--data val:NAME``), seed 0; the test split is seen only by the final runs;
* a setting that follows a published recipe (the LFNN authors') fixes its learning rate for every rule
  and tunes none; its learning-rate ablation is a sub-case.

``--quick`` keeps every case and every claim's row at a tiny budget (2 epochs on 1,000-2,000 images,
1 seed, no tuning): it checks that the suite runs end to end; its verdicts say that they come from the
quick budget and test nothing.

The suite's modules: ``claims_cases`` (the settings, claims and cases: the plan as data), ``claims_runs``
(run folders, command lines, tuning grids), this one (checking the plan and running it), ``claims_measure``
(the measurements), and ``claims_report`` (with its ``claims_*`` helpers: the verdicts and RESULTS.md).
"""

from __future__ import annotations

import copy
import json
import os
import resource
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import rules
from ..errors import UserError
from ..experiment import validate
from ..rules.base import OptimConfig
from ..training.runfiles import CHECKPOINT, Interrupted, StopRequests, hold_run_folder
from .claims_cases import Case, ClaimsPlan, claims_plan, selected
from .claims_runs import (
    TIMING,
    ClaimRun,
    final_runs,
    grid_of,
    measure_arguments,
    train_arguments,
    tune_run,
    tuning_keys,
)
from .plan import Entry, Run, default_lr, is_finished, read_result, spec_of
from .runner import TRAININGS, PoolOptions, claim_bench_dir, execute, run_pool


# ----- validation --------------------------------------------------------------------------------------
def validate_plan(plan: ClaimsPlan, cases: Sequence[Case]) -> None:
    """Check every run's options and build every row's rule once (no data): a bad plan fails before anything
    trains. Each network is built once (a deep invertible net's orthogonal initialisation takes seconds) and
    every rule on it gets a copy."""
    seen: set[tuple[str, Entry, str]] = set()
    networks: dict[tuple[str, ...], Any] = {}
    for case in cases:
        for arm in (*case.arms, *(m.arm for m in case.measures)):
            setting = plan.settings[arm.setting]
            data = arm.datasets[0]
            if (arm.setting, arm.entry, data) in seen:
                continue
            seen.add((arm.setting, arm.entry, data))
            spec = spec_of(Run("final", arm.entry, data, 0, arm.lr or default_lr(arm.entry, setting)), setting)
            rule_cls = rules.get(arm.entry.rule)
            if not rule_cls.trains(arm.entry.arch):
                raise UserError(f"case {case.name}: {arm.entry.rule} cannot train --arch {arm.entry.arch}")
            shape = (3, 32, 32) if data in ("cifar10", "svhn") else (1, 28, 28)
            key = (repr(spec.net_spec()), repr(shape))
            if key not in networks:
                networks[key] = rule_cls.build_network(spec.net_spec(), shape, 10)
            rule_cls(copy.deepcopy(networks[key]), validate(spec), spec.part(OptimConfig))


# ----- running ---------------------------------------------------------------------------------------
@dataclass
class ClaimsOptions(PoolOptions):
    out: Path
    quick: bool = False
    cases: list[str] | None = None  # None: every case
    seeds: int | None = None  # the main rows' seeds (None: the suite's, 3; 1 with --quick)


def check_options(options: ClaimsOptions) -> None:
    for name, value in (("--workers", options.workers), ("--threads", options.threads)):
        if value < 1:
            raise UserError(f"{name} must be at least 1, got {value}")
    if options.seeds is not None and options.seeds < 1:
        raise UserError(f"--seeds must be at least 1, got {options.seeds}")
    if options.cases is not None and not options.cases:
        raise UserError("--cases selects no case")
    if options.resume and options.overwrite:
        raise UserError("--resume and --overwrite contradict each other; pass one of them")


def run_claims(options: ClaimsOptions, plan: ClaimsPlan | None = None) -> dict:
    """Plan, run (finished runs skipped, interrupted ones resumed), measure and report; return a summary."""
    from ..data import load

    check_options(options)
    plan = plan or claims_plan(options.quick, options.seeds)
    cases = selected(plan, options.cases)
    validate_plan(plan, cases)
    for name in sorted({d for case in cases for arm in case.arms for d in arm.datasets} - {"svhn"}):
        load(name)  # missing data fails here, before any run
    claim_bench_dir(options.out, options.resume, options.overwrite)
    with hold_run_folder(options.out):
        return _run(options, plan, cases)


class _ProcessClock:
    """Wall seconds the suite's processes ran, summed (with the CPU seconds of this process's children, the
    share of a core they got: how much other work slowed them)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.wall = 0.0
        self.processes = 0

    def add(self, seconds: float) -> None:
        with self.lock:
            self.wall += seconds
            self.processes += 1


CLOCK = _ProcessClock()


def _start_training(job: ClaimRun, out: Path, threads: int, passed_on: Sequence[str]) -> int | None:
    folder = job.folder(out)
    start = time.perf_counter()
    code = execute(train_arguments(job, out, threads, passed_on), folder, threads)
    CLOCK.add(time.perf_counter() - start)
    if job.run.stage == "tune" and is_finished(read_result(folder)):
        (folder / CHECKPOINT).unlink(missing_ok=True)  # only its validation accuracy is used
    return code


def _start_measure(argv: list[str], file: Path, threads: int) -> int | None:
    file.parent.mkdir(parents=True, exist_ok=True)
    with open(file.with_suffix(".log"), "a") as log:
        log.write("$ " + " ".join(argv) + "\n")
        log.flush()
        start = time.perf_counter()
        done = TRAININGS.run(argv, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    if done is None:
        return None
    CLOCK.add(time.perf_counter() - start)
    code = done.returncode
    return 128 - code if code < 0 else code  # killed by a signal: as a shell says it


def _run(options: ClaimsOptions, plan: ClaimsPlan, cases: list[Case]) -> dict:
    from .claims_report import write_report

    out = options.out
    counts = {"trained": 0, "skipped": 0, "measured": 0}
    failed: list[str] = []
    started = time.time()
    CLOCK.wall, CLOCK.processes = 0.0, 0
    cpu_before = _children_cpu()

    def pool(jobs: Sequence[Any], start: Callable[[Any], int | None], desc: str, label: Callable[[Any], str],
             ok_codes: tuple[int, ...] = (0,)) -> None:
        failed.extend(label(job) for job in run_pool(jobs, start, options.workers, options.progress, desc, label,
                                                     ok_codes))
        TRAININGS.check()

    def train(jobs: list[ClaimRun], desc: str) -> None:
        unique = list({job.folder(out): job for job in jobs}.values())
        todo = [job for job in unique if not is_finished(read_result(job.folder(out)))]
        counts["trained"] += len(todo)
        counts["skipped"] += len(unique) - len(todo)
        pool(todo, lambda job: _start_training(job, out, options.threads, options.passed_on()), desc,
             lambda job: str(job.folder(out).relative_to(out)), ok_codes=(0, 1))  # 1 = diverged, in its result.json

    TRAININGS.stopping = 0
    try:
        with StopRequests(on_signal=TRAININGS.forward):
            keys = tuning_keys(plan, cases)
            while True:  # rounds: the grids, then one more value beyond an edge that won
                jobs = []
                for key in keys:
                    lrs, complete = grid_of(plan, key, out)
                    if not complete:
                        setting = plan.settings[key[0]]
                        jobs += [tune_run(setting, key[1], key[2], lr) for lr in lrs]
                if not jobs or all(is_finished(read_result(j.folder(out))) for j in jobs):
                    break
                train(jobs, "tuning (validation split)")
                if failed:
                    break
            finals = [job for case in cases for arm in case.arms for job in final_runs(plan, arm, out)]
            train([job for job in finals if job is not None], "final runs (test split)")
            measures = []
            for case in cases:
                for measure in case.measures:
                    file = measure.file(out, case.name)
                    argv = measure_arguments(plan, measure, out, options.threads)
                    if not file.exists() and argv is not None:
                        measures.append((argv, file))
            counts["measured"] = len(measures)
            pool(measures, lambda job: _start_measure(job[0], job[1], options.threads), "measurements",
                 lambda job: str(job[1].relative_to(out)))
            _log_timing(out, options, started, cpu_before)
            report = write_report(plan, out, options.command, options.resume_hint)
    except Interrupted as exc:
        _log_timing(out, options, started, cpu_before, interrupted=True)
        raise Interrupted(exc.signum, "every running training wrote its checkpoint", options.resume_hint) from None
    if failed:
        raise RuntimeError(f"{len(failed)} job(s) failed (the report marks them); see the log of {failed[0]} in {out}")
    return {**counts, **report}
def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _log_timing(out: Path, options: ClaimsOptions, started: float, cpu_before: float,
                interrupted: bool = False) -> None:
    """Append this invocation's wall time, its processes' wall and CPU seconds and the load averages to
    OUT/timing.json (a resumed run adds an entry)."""
    path = out / TIMING
    log = json.loads(path.read_text()) if path.exists() else []
    log.append({"command": options.command, "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(started)),
                "wall_seconds": round(time.time() - started, 1), "processes": CLOCK.processes,
                "process_wall_seconds": round(CLOCK.wall, 1), "process_cpu_seconds": round(_children_cpu() - cpu_before, 1),
                "load_average_at_end": [round(v, 2) for v in os.getloadavg()], "workers": options.workers,
                "threads": options.threads, "interrupted": interrupted})
    path.write_text(json.dumps(log, indent=1) + "\n")
