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
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

from tqdm import tqdm

from . import rules
from .bench_plan import (REFERENCE, SUITES, Entry, Run, Suite, default_lr, entries, entry_network,  # noqa: F401
                         final_runs, get_suite, initial_grid, is_finished, read_result, spec_of, train_arguments,
                         validate_suite)
from .bench_report import write_report
from .errors import UserError
from .experiment import RunSpec, build_rule
from .runfiles import BENCH_FILES, RUN_FILES, Interrupted, StopRequests, load_checkpoint, read_json
from .spec import to_argv

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
              desc: str) -> tuple[int, int]:
    """Train every unfinished run of a stage, ``workers`` at a time; return (trained now, skipped as finished)."""
    todo = [run for run in runs if not is_finished(read_result(run.folder(out)))]
    failed = []
    with ThreadPoolExecutor(max_workers=workers) as pool:  # threads only wait: each run is its own process
        futures = {pool.submit(train_one, run, suite, out, threads): run for run in todo}
        bar = tqdm(as_completed(futures), total=len(futures), desc=desc, unit="run", disable=not progress or None,
                   file=sys.stderr)
        for future in bar:
            code = future.result()
            stopped = TRAININGS.stopping and code in (None, 128 + TRAININGS.stopping)
            if code not in (0, 1) and not stopped:  # 1 = diverged, recorded in its result.json
                failed.append(futures[future].folder(out))
            bar.set_postfix_str(futures[future].entry.label)
    TRAININGS.check()
    if failed:
        raise RuntimeError(f"{len(failed)} run(s) failed; see log.txt in {failed[0]}")
    return len(todo), len(runs) - len(todo)


def train_one(run: Run, suite: Suite, out: Path, threads: int) -> int | None:
    code = execute(train_arguments(run, suite, out, threads), run.folder(out), threads)
    if run.stage == "tune" and is_finished(read_result(run.folder(out))):
        # Only the validation accuracy of a tuning run is used; its weights would fill the disk
        # (the full suite's tuning checkpoints take gigabytes).
        (run.folder(out) / "checkpoint.pt").unlink(missing_ok=True)
    return code


Grids = dict[tuple[Entry, str], list[float]]


def tuning_runs(grids: Grids) -> list[Run]:
    return [Run("tune", entry, data, 0, lr) for (entry, data), lrs in grids.items() for lr in lrs]


def best_lr(entry: Entry, data: str, lrs: Sequence[float], out: Path) -> float:
    """The learning rate whose tuning run ended with the best validation accuracy.

    Diverged or missing runs count as accuracy -inf; ties go to the value closest to the rule's default.
    """
    scored = []
    for lr in lrs:
        result = read_result(Run("tune", entry, data, 0, lr).folder(out)) or {}
        accuracy = result.get("test_accuracy") if result.get("status") == "ok" else None
        scored.append((-math.inf if accuracy is None else accuracy, -abs(math.log(lr / default_lr(entry))), lr))
    return max(scored)[2]


def widen(lrs: Sequence[float], best: float, step: float) -> float | None:
    """The next learning rate to try when the best one lies on an edge of the grid (None: it is inside)."""
    if best == max(lrs):
        return max(lrs) * step
    if best == min(lrs):
        return min(lrs) / step
    return None


def tune(suite: Suite, chosen: Sequence[Entry], out: Path,
         run: Callable[[list[Run]], object]) -> tuple[dict[tuple[Entry, str], float], list[Run]]:
    """Choose every (entry, data set)'s learning rate on the validation split; return the choice and the runs.

    Each round trains the grid's unfinished runs (``run``); a grid whose best value lies on its edge
    gets one more value beyond it, for at most ``lr_extensions`` rounds. Without ``tune_epochs``
    every rule keeps its default.
    """
    grids: Grids = {(e, d): initial_grid(e, suite) if suite.tune_epochs else [default_lr(e)]
                    for d in suite.datasets for e in chosen}
    if not suite.tune_epochs:
        return {key: lrs[0] for key, lrs in grids.items()}, []
    for round_ in range(suite.lr_extensions + 1):
        run(tuning_runs(grids))
        widened = False
        for (entry, data), lrs in grids.items():
            extra = widen(lrs, best_lr(entry, data, lrs, out), suite.lr_step)
            if extra is not None and round_ < suite.lr_extensions:
                lrs.append(extra)
                lrs.sort()
                widened = True
        if not widened:
            break
    return {(e, d): best_lr(e, d, lrs, out) for (e, d), lrs in grids.items()}, tuning_runs(grids)


# ----- measurements a run's result.json does not hold --------------------------------------------
ALIGNMENT = "alignment.json"


def measure_alignment(run: Run, suite: Suite, out: Path, datasets: dict) -> dict:
    """Per-layer cosine with BP at initialisation and with the trained weights, on one fixed batch."""
    from .align import alignment
    from .train import CHECKPOINT, epoch_order

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


def probe(entry: Entry, data: str, suite: Suite, out: Path) -> dict:
    """Step time and memory of an entry, measured alone in a fresh process (``localcredit.probe``), one thread."""
    path = probe_file(entry, out)
    if path.exists():
        return read_json(path, "probe file")
    spec = RunSpec(rule=entry.rule, data=data, **asdict(entry_network(entry, suite)), batch_size=suite.batch_size)
    command = [sys.executable, "-m", "localcredit.probe", *to_argv(spec), "--threads", "1"]
    done = TRAININGS.run(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    TRAININGS.check()  # a stop ended (or prevented) the probe: nothing of it is written
    if done.returncode != 0:
        raise RuntimeError(f"probing {entry.label} on {data} failed: {done.stderr.strip()[-300:]}")
    payload = {**json.loads(done.stdout.strip().splitlines()[-1]), "data": data}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload) + "\n")
    return payload


# ----- the whole suite -------------------------------------------------------------------------
@dataclass
class BenchOptions:
    suite: Suite
    out: Path
    rule_names: list[str]
    workers: int = 1
    threads: int = 1
    progress: bool = True
    command: str = ""
    resume: bool = False
    overwrite: bool = False
    resume_hint: str = ""


def check_options(options: BenchOptions) -> None:
    if options.suite.seeds < 1:
        raise UserError(f"--seeds must be at least 1, got {options.suite.seeds}")
    if options.workers < 1:
        raise UserError(f"--workers must be at least 1, got {options.workers}")
    if options.threads < 1:
        raise UserError(f"--threads must be at least 1, got {options.threads}")
    for name in options.rule_names:
        rules.get(name)  # unknown names raise UserError listing the available ones
    if not options.rule_names:
        raise UserError("--rules selects no rule")
    if options.resume and options.overwrite:
        raise UserError("--resume and --overwrite contradict each other; pass one of them")


def claim_bench_dir(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse a folder that holds a bench's runs or report unless --resume or --overwrite says what to do."""
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
    from .data import load

    check_options(options)
    suite, out = options.suite, options.out
    chosen = entries(options.rule_names, suite.arch)
    validate_suite(suite, chosen)
    datasets = {name: load(name) for name in suite.datasets}  # missing data fails here, before any run
    claim_bench_dir(out, options.resume, options.overwrite)
    out.mkdir(parents=True, exist_ok=True)
    stage = dict(suite=suite, out=out, workers=options.workers, threads=options.threads, progress=options.progress)
    trained = []

    def train(runs: list[Run], desc: str) -> None:
        trained.append(run_stage(runs, desc=desc, **stage)[0])

    TRAININGS.stopping = 0
    try:
        with StopRequests(on_signal=TRAININGS.forward):
            learning_rates, tune_runs = tune(suite, chosen, out, lambda runs: train(runs, "tuning (validation split)"))
            final = final_runs(suite, chosen, learning_rates)
            train(final, "final runs (test split)")
            finished_runs = [run for run in final if read_result(run.folder(out)).get("status") == "ok"]
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


def with_seeds(suite: Suite, seeds: int | None) -> Suite:
    return suite if seeds is None else replace(suite, seeds=seeds)
