"""Benchmark suites: every registered rule x data set x seed, one command, resumable.

``localcredit bench --suite quick|full [--out DIR] [--seeds N]`` plans the runs of a suite,
executes each as its own ``localcredit train`` process (so every run's peak memory and timing are
its own, and a killed bench loses at most the steps since a run's last checkpoint: with ``--resume``
a run with a checkpoint is resumed, a run with a final result.json is skipped; SIGTERM/SIGINT are
passed on to the running trainings, which checkpoint and stop), then measures what a run's result.json does
not hold (per-layer alignment with BP of the trained weights; the time and memory of a training
step, probed one rule at a time so that no other run shares the CPU)
and writes results.csv, RESULTS.md and plots (``bench_report``).

Fairness, by construction:

* every rule trains the suite's hidden sizes; a rule that needs its own kind of network (GAIT-prop's
  invertible one) keeps those sizes in that architecture, and BP is run on that architecture too, so
  each rule's speed and memory are compared with BP on the very same network;
* with ``tune_epochs`` the learning rate of every rule (and of BP) is chosen from the same grid
  around the rule's default, by accuracy on a validation split carved from the training data
  (``--data val:NAME``); the test split is only ever evaluated by the final runs.

New rules need no change here: the suites enumerate ``rules.available()``.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from tqdm import tqdm

from ..errors import UserError
from ..experiment import RunSpec, build_rule
from ..spec import to_argv
from ..training.runfiles import (
    BENCH_FILES,
    RUN_FILES,
    Interrupted,
    StopRequests,
    check_not_held,
    hold_run_folder,
    load_checkpoint,
    read_json,
)
from .plan import (  # noqa: F401
    REFERENCE,
    SUITES,
    Entry,
    Run,
    Suite,
    default_lr,
    entries,
    entry_network,
    final_runs,
    get_suite,
    grid_value,
    initial_grid,
    is_finished,
    read_result,
    spec_of,
    suite_entries,
    train_arguments,
    validate_suite,
)
from .report import write_cases_report, write_report


# ----- running ---------------------------------------------------------------------------------
class Trainings:
    """The processes (trainings, probes) running now, so that a stop signal reaches each of them."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.running: set[subprocess.Popen] = set()
        self.stopping = 0  # the signal that stops the bench: no new training starts

    def forward(self, signum: int) -> None:
        self.stopping = self.stopping or signum
        with self.lock:
            for process in self.running:
                process.send_signal(signum)

    def run(self, command: list[str], **kwargs) -> subprocess.CompletedProcess | None:
        """The finished process, or None when the bench is stopping and the command was not started."""
        with self.lock:
            if self.stopping:
                return None
            process = subprocess.Popen(command, **kwargs)
            self.running.add(process)
        try:
            out, err = process.communicate()
            return subprocess.CompletedProcess(command, process.returncode, out, err)
        finally:
            with self.lock:
                self.running.discard(process)

    def check(self) -> None:
        """Raise Interrupted once a stop signal has come."""
        if self.stopping:
            raise Interrupted(self.stopping, "every running training wrote its checkpoint")


TRAININGS = Trainings()


def execute(argv: list[str], folder: Path, threads: int) -> int | None:
    """Run ``localcredit <argv>`` in a fresh process, resuming from a checkpoint if a previous try left one."""
    folder.mkdir(parents=True, exist_ok=True)
    if (folder / "checkpoint.pt").exists():
        argv = [*argv, "--resume"]
    elif any((folder / name).exists() for name in RUN_FILES):
        argv = [*argv, "--overwrite"]  # an unfinished try that left no checkpoint (killed in its first steps)
    with open(folder / "log.txt", "a") as log:
        log.write("$ localcredit " + " ".join(argv) + "\n")
        log.flush()
        done = TRAININGS.run([sys.executable, "-m", "localcredit", *argv], stdout=log, stderr=subprocess.STDOUT,
                             env={**os.environ, "OMP_NUM_THREADS": str(threads)})
        return None if done is None else done.returncode


def run_stage(runs: list[Run], suite: Suite, out: Path, workers: int, threads: int, progress: bool,
              desc: str, passed_on: Sequence[str] = ()) -> tuple[int, int]:
    """Train every unfinished run of a stage, ``workers`` at a time; return (trained now, skipped as finished)."""
    todo = [run for run in runs if not is_finished(read_result(run.folder(out)))]
    failed = run_pool(todo, lambda run: train_one(run, suite, out, threads, passed_on), workers, progress, desc,
                      label=lambda run: run.entry.label, ok_codes=(0, 1))  # 1 = diverged, recorded in its result.json
    TRAININGS.check()
    if failed:
        raise RuntimeError(f"{len(failed)} run(s) failed; see log.txt in {failed[0].folder(out)}")
    return len(todo), len(runs) - len(todo)


def run_pool(jobs: Sequence, start: Callable[[Any], int | None], workers: int, progress: bool, desc: str,
             label: Callable[[Any], str] = str, ok_codes: tuple[int, ...] = (0,)) -> list:
    """Start every job (``start``: a process's exit code, None when a stop kept it from starting), ``workers``
    at a time; return the jobs that failed: an exit code outside ``ok_codes`` that no stop signal explains."""
    failed = []
    with ThreadPoolExecutor(max_workers=workers) as pool:  # threads only wait: each run is its own process
        futures = {pool.submit(start, job): job for job in jobs}
        bar = tqdm(as_completed(futures), total=len(futures), desc=desc, unit="run", disable=not progress or None,
                   file=sys.stderr)
        for future in bar:
            code = future.result()
            stopped = TRAININGS.stopping and code in (None, 128 + TRAININGS.stopping)
            if code not in ok_codes and not stopped:
                failed.append(futures[future])
            bar.set_postfix_str(label(futures[future]))
    return failed


def train_one(run: Run, suite: Suite, out: Path, threads: int, passed_on: Sequence[str] = ()) -> int | None:
    code = execute(train_arguments(run, suite, out, threads, passed_on), run.folder(out), threads)
    if run.stage == "tune" and is_finished(read_result(run.folder(out))):
        # Only the validation accuracy of a tuning run is used; its weights would fill the disk
        # (the full suite's tuning checkpoints take gigabytes).
        (run.folder(out) / "checkpoint.pt").unlink(missing_ok=True)
    return code


Grids = dict[tuple[Entry, str], list[float]]


def tuning_runs(grids: Grids) -> list[Run]:
    return [Run("tune", entry, data, 0, lr) for (entry, data), lrs in grids.items() for lr in lrs]


def best_lr(entry: Entry, data: str, lrs: Sequence[float], out: Path, suite: Suite | None = None) -> float:
    """The learning rate whose tuning run ended with the best validation accuracy.

    Diverged or missing runs count as accuracy -inf; ties go to the value closest to the rule's default.
    """
    scored = []
    for lr in lrs:
        result = read_result(Run("tune", entry, data, 0, lr).folder(out)) or {}
        accuracy = result.get("test_accuracy") if result.get("status") == "ok" else None
        scored.append((-math.inf if accuracy is None else accuracy, -abs(math.log(lr / default_lr(entry, suite))), lr))
    return max(scored)[2]


def widen(lrs: Sequence[float], best: float, step: float) -> float | None:
    """The next learning rate to try when the best one lies on an edge of the grid (None: it is inside)."""
    if best == max(lrs):
        return grid_value(max(lrs) * step)
    if best == min(lrs):
        return grid_value(min(lrs) / step)
    return None


def tune(suite: Suite, chosen: Sequence[Entry], out: Path,
         run: Callable[[list[Run]], object]) -> tuple[dict[tuple[Entry, str], float], list[Run]]:
    """Choose every (entry, data set)'s learning rate on the validation split; return the choice and the runs.

    Each round trains the grid's unfinished runs (``run``); a grid whose best value lies on its edge
    gets one more value beyond it, for at most ``lr_extensions`` rounds. Without ``tune_epochs``
    every rule keeps its default.
    """
    grids: Grids = {(e, d): initial_grid(e, suite) if suite.tune_epochs else [default_lr(e, suite)]
                    for d in suite.datasets for e in chosen}
    if not suite.tune_epochs:
        return {key: lrs[0] for key, lrs in grids.items()}, []
    for round_ in range(suite.lr_extensions + 1):
        run(tuning_runs(grids))
        widened = False
        for (entry, data), lrs in grids.items():
            extra = widen(lrs, best_lr(entry, data, lrs, out, suite), suite.lr_step)
            if extra is not None and round_ < suite.lr_extensions:
                lrs.append(extra)
                lrs.sort()
                widened = True
        if not widened:
            break
    return {(e, d): best_lr(e, d, lrs, out, suite) for (e, d), lrs in grids.items()}, tuning_runs(grids)


# ----- measurements a run's result.json does not hold --------------------------------------------
ALIGNMENT = "alignment.json"


def measure_alignment(run: Run, suite: Suite, out: Path, datasets: dict) -> dict:
    """Per-layer cosine with BP at initialisation and with the trained weights, on one fixed batch."""
    from ..rules.alignment import alignment
    from ..training.config import epoch_order
    from ..training.runfiles import CHECKPOINT

    folder = run.folder(out)
    path = folder / ALIGNMENT
    if path.exists():
        return read_json(path, "alignment file")
    data = datasets[run.data]
    rule = build_rule(spec_of(run, suite), data)
    n_train = min(len(data.x_train), suite.limit_train or len(data.x_train))
    index = epoch_order(n_train, run.seed, 0)[:suite.align_batch]
    x, y = data.x_train[index], data.y_train[index]
    at_init = alignment(rule, x, y)
    checkpoint = load_checkpoint(folder / CHECKPOINT, "cpu")
    rule.load_checkpoint_state(checkpoint["rule"])
    payload = {"batch": len(index), "init": at_init, "final": alignment(rule, x, y)}
    path.write_text(json.dumps(payload) + "\n")
    return payload


def probe_file(entry: Entry, out: Path) -> Path:
    return out / "probes" / f"{entry.slug}.json"


PROBE_RECIPE = ("epochs", "limit_train", "eval_every", "augment", "lr_schedule", "milestones", "lr_decay")


def probe_command(entry: Entry, data: str, suite: Suite, steps: int | None = None,
                  timed_steps: int | None = None) -> list[str]:
    """``python -m localcredit.bench.probe`` on an entry's network, rule options and optimiser (not the loop's recipe)."""
    spec = spec_of(Run("final", entry, data, 0, default_lr(entry, suite)), suite)
    spec = replace(spec, **{name: getattr(RunSpec(rule="bp", data=data), name) for name in PROBE_RECIPE})
    counts = [*(["--steps", str(steps)] if steps else []), *(["--timed-steps", str(timed_steps)] if timed_steps else [])]
    return [sys.executable, "-m", "localcredit.bench.probe", *to_argv(spec), "--threads", "1", *counts]


def probe(entry: Entry, data: str, suite: Suite, out: Path) -> dict:
    """Step time and memory of an entry, measured alone in a fresh process (``localcredit.bench.probe``), one thread."""
    path = probe_file(entry, out)
    if path.exists():
        return read_json(path, "probe file")
    command = probe_command(entry, data, suite)
    done = TRAININGS.run(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    TRAININGS.check()  # a stop ended (or prevented) the probe: nothing of it is written
    assert done is not None  # run() gives None only while stopping, and check() has raised then
    if done.returncode != 0:
        raise RuntimeError(f"probing {entry.label} on {data} failed: {done.stderr.strip()[-300:]}")
    payload = {**json.loads(done.stdout.strip().splitlines()[-1]), "data": data}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload) + "\n")
    return payload


# ----- the whole suite -------------------------------------------------------------------------
@dataclass(kw_only=True)
class PoolOptions:
    """What every suite that starts its runs through the process pool takes (train, continual, modules, claims)."""

    workers: int = 1
    threads: int = 1
    progress: bool = True
    command: str = ""
    resume: bool = False
    overwrite: bool = False
    resume_hint: str = ""
    device: str | None = None  # passed on to every training as --device (None: train's default, auto)
    log: str = "none"  # passed on to every training as --log (none | csv | tensorboard)

    def passed_on(self) -> list[str]:
        """The bench's options that every training gets as they were given: --device, --log."""
        return [*(["--device", self.device] if self.device else []),
                *(["--log", self.log] if self.log != "none" else [])]


@dataclass
class BenchOptions(PoolOptions):
    suite: Suite
    out: Path
    rule_names: list[str] | None  # None: the suite's rows (every registered rule, for most suites)
    cases: list[str] | None = None  # of a suite with cases: the ones to run (None: all)


def check_options(options: BenchOptions) -> None:
    if options.suite.seeds < 1:
        raise UserError(f"--seeds must be at least 1, got {options.suite.seeds}")
    if options.workers < 1:
        raise UserError(f"--workers must be at least 1, got {options.workers}")
    if options.threads < 1:
        raise UserError(f"--threads must be at least 1, got {options.threads}")
    if options.rule_names is not None and not options.rule_names:
        raise UserError("--rules selects no rule")
    if options.cases is not None and not options.suite.cases:
        raise UserError(f"--cases applies to a suite with cases (paper), not to {options.suite.name}")
    for name in options.cases or ():
        options.suite.case(name)  # unknown names raise UserError listing the cases
    if options.resume and options.overwrite:
        raise UserError("--resume and --overwrite contradict each other; pass one of them")


def claim_bench_dir(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse a folder that holds a bench's runs or report unless --resume or --overwrite says what to do,
    and one that another bench is working in."""
    check_not_held(out)
    held = [out / name for name in BENCH_FILES if (out / name).exists()]
    held += [path for name in RUN_FILES for path in out.glob(f"**/{name}")] if out.is_dir() else []
    if not held or resume:
        return
    if not overwrite:
        raise UserError(f"{out} already holds a bench ({held[0].relative_to(out)}); pass --resume to continue it "
                        f"(finished runs are kept) or --overwrite to run it all again")
    for path in held:
        path.unlink(missing_ok=True)


def run_bench(options: BenchOptions) -> dict:
    """Plan, run (skipping finished runs), measure and report a suite; return a summary."""
    from ..data import load

    check_options(options)
    if options.suite.cases:
        return run_cases(options)
    suite, out = options.suite, options.out
    chosen = suite_entries(suite, options.rule_names)
    validate_suite(suite, chosen)
    datasets = {name: load(name) for name in suite.datasets}  # missing data fails here, before any run
    claim_bench_dir(out, options.resume, options.overwrite)
    with hold_run_folder(out):  # no other bench works in `out` until this one ends
        return _run_suite(options, chosen, datasets)


def _run_suite(options: BenchOptions, chosen: list[Entry], datasets: dict) -> dict:
    suite, out = options.suite, options.out
    stage: dict[str, Any] = dict(suite=suite, out=out, workers=options.workers, threads=options.threads,
                                 progress=options.progress, passed_on=options.passed_on())
    trained = []

    def train(runs: list[Run], desc: str) -> None:
        trained.append(run_stage(runs, desc=desc, **stage)[0])

    TRAININGS.stopping = 0
    try:
        with StopRequests(on_signal=TRAININGS.forward):
            learning_rates, tune_runs = tune(suite, chosen, out, lambda runs: train(runs, "tuning (validation split)"))
            final = final_runs(suite, chosen, learning_rates)
            train(final, "final runs (test split)")
            # Each has its result.json now: run_stage raised unless every run ended ok or diverged.
            finished_runs = [run for run in final if (read_result(run.folder(out)) or {}).get("status") == "ok"]
            # One at a time, after the runs: a probe's timing must not share the CPU with anything of ours.
            probes = {e: probe(e, suite.datasets[0], suite, out)
                      for e in tqdm(chosen, desc="probes (step time, memory)", disable=not options.progress or None,
                                    file=sys.stderr)}
            alignments = {}
            for run in finished_runs:
                TRAININGS.check()
                alignments[run] = measure_alignment(run, suite, out, datasets)
            report = write_report(options, chosen, tune_runs, final, learning_rates, alignments, probes)
    except Interrupted as exc:
        raise Interrupted(exc.signum, "every running training wrote its checkpoint", options.resume_hint) from None
    return {"trained": sum(trained), "skipped": len(tune_runs) + len(final) - sum(trained), **report}


def selected_cases(options: BenchOptions) -> list[Suite]:
    """The cases ``--cases`` names (all by default) that hold at least one of the ``--rules`` rows."""
    cases = [options.suite.case(n) for n in options.cases] if options.cases else list(options.suite.cases)
    if options.rule_names is None:
        return cases
    kept = [case for case in cases if set(options.rule_names) & set(case.rules or ())]
    if not kept:
        raise UserError(f"--rules {','.join(options.rule_names)} names no row of the chosen cases")
    return kept


def case_options(options: BenchOptions, case: Suite) -> BenchOptions:
    names = None if options.rule_names is None else [n for n in options.rule_names if n in (case.rules or ())]
    return replace(options, suite=case, out=options.out / case.name, rule_names=names, cases=None)


def run_cases(options: BenchOptions) -> dict:
    """Each chosen case of a suite as its own bench in OUT/<case>, then OUT/RESULTS.md over every case run so far."""
    with hold_run_folder(options.out):  # each case's folder is held too, while it runs
        summaries = [run_bench(case_options(options, case)) for case in selected_cases(options)]
        report = write_cases_report(options)
    return {"trained": sum(s["trained"] for s in summaries), "skipped": sum(s["skipped"] for s in summaries),
            **report}


# ----- what a suite would cost ----------------------------------------------------------------------
def planned_steps(suite: Suite, train_size: int) -> tuple[int, int]:
    """Training steps of one row on one data set: (every seed's final runs, the first grid of tuning runs)."""
    final_size = min(train_size, suite.limit_train or train_size)
    tune_size = min(train_size - round(train_size / 6), suite.tune_limit_train or suite.limit_train or train_size)
    final = suite.seeds * suite.epochs * math.ceil(final_size / suite.batch_size)
    grid = (2 * suite.lr_span + 1) if suite.tune_epochs else 0
    return final, grid * suite.tune_epochs * math.ceil(tune_size / suite.batch_size)


def estimate(options: BenchOptions, steps: int = 3, timed_steps: int = 5) -> list[dict]:
    """Each row's CPU hours on this machine: a short probe's step time (one thread) x the suite's planned steps.

    Counts training steps only (evaluation adds a few per cent) and the first tuning grid (a widened
    grid adds up to ``lr_extensions`` runs more); runs side by side (``--workers``) divide the wall time.
    """
    from ..data import load

    check_options(options)
    cases = selected_cases(options) if options.suite.cases else [options.suite]
    rows = []
    for case in cases:
        names = case_options(options, case).rule_names if options.suite.cases else options.rule_names
        chosen = suite_entries(case, names)
        validate_suite(case, chosen)
        sizes = {data: len(load(data).y_train) for data in case.datasets}
        for entry in chosen:
            done = TRAININGS.run(probe_command(entry, case.datasets[0], case, steps, timed_steps),
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                 env={**os.environ, "OMP_NUM_THREADS": "1"})
            if done is None or done.returncode != 0:
                raise RuntimeError(f"probing {entry.label}: {'' if done is None else done.stderr.strip()[-300:]}")
            ms = json.loads(done.stdout.strip().splitlines()[-1])["ms_per_step_mean"]
            planned = [planned_steps(case, sizes[data]) for data in case.datasets]
            final, tuning = sum(p[0] for p in planned), sum(p[1] for p in planned)
            rows.append({"case": case.name, "row": entry.label, "ms_per_step": ms, "steps": final + tuning,
                         "hours": ms * (final + tuning) / 3.6e6, "load_average_1min": os.getloadavg()[0]})
    return rows


def with_seeds(suite: Suite, seeds: int | None) -> Suite:
    if seeds is None:
        return suite
    return replace(suite, seeds=seeds, cases=tuple(replace(case, seeds=seeds) for case in suite.cases))
