"""The modules suite: test error and training memory against the number of modules K (issue 29).

``localcredit bench --suite modules [--quick]`` trains the CIFAR ResNet (resnet-20 by default) on
Fashion-MNIST and MNIST with the conv suite's recipe (6 epochs, 2-pixel jitter, + flip on Fashion-MNIST,
learning rate x0.25 after epochs 3 and 5, Adam, the learning rate of every point tuned on a validation
split), cut into K = 1, 2, 4, 8 modules (``--modules K``) for local-learned, predsim, dgl and infopro,
beside BP end to end (InfoPro's K = 1). Every run is its own ``localcredit train`` process through the
bench's process pool (``runner.run_pool``: ``--workers`` at a time, stop signals passed on, resumable:
finished runs are skipped, interrupted ones resumed). Each point's training memory is measured once
after the runs, alone, by the probe (``bench/probe.py``, the meter of ``bench/memory.py``: the peak of
the tensors a training step makes, weights, gradients and optimiser state left out): falling memory
with K is what the modules are for. It writes results.csv, RESULTS.md and modules.png, with InfoPro's
published CIFAR-10 numbers beside ours (``published.INFOPRO_CIFAR10``).

``--quick`` is a smoke run of the same machinery, minutes on two cores: resnet-8 on 4,000
Fashion-MNIST images for one epoch (no augmentation), K = 1, 2, 4, default learning rates, one seed.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .. import rules
from ..data.base import VALIDATION_PREFIX
from ..errors import UserError
from ..experiment import RunSpec, validate
from ..nets.architectures import NetSpec
from ..rules.base import OptimConfig
from ..spec import from_mapping, to_argv
from ..training.runfiles import Interrupted, StopRequests, hold_run_folder, read_json
from .plan import JITTER, grid_value, is_finished, read_result
from .published import INFOPRO_CIFAR10, Published
from .runner import TRAININGS, PoolOptions, claim_bench_dir, execute, run_pool

#: The end-to-end reference: InfoPro's K = 1.
REFERENCE = "bp"


@dataclass(frozen=True)
class Point:
    """One point of a curve: a rule on a network cut into ``modules`` modules (None: the reference, end to end)."""

    rule: str
    modules: int | None

    @property
    def k(self) -> int:
        return self.modules or 1

    @property
    def slug(self) -> str:
        return self.rule if self.modules is None else f"{self.rule}-k{self.modules}"

    @property
    def label(self) -> str:
        return f"{self.rule} (end to end)" if self.modules is None else f"{self.rule}, K = {self.modules}"


@dataclass(frozen=True)
class ModulesSuite:
    """Everything that defines the suite's runs; the CLI may override the seeds and the rules."""

    name: str
    description: str
    datasets: tuple[str, ...] = ("fashion-mnist", "mnist")
    depths: tuple[int, ...] = (20,)  # resnet-(6k+2)
    width: float = 1.0
    rules: tuple[str, ...] = ("local-learned", "predsim", "dgl", "infopro")
    ks: tuple[int, ...] = (1, 2, 4, 8)
    epochs: int = 6
    seeds: int = 2
    batch_size: int = 128
    limit_train: int | None = None
    #: run options every run gets (the conv suite's: Adam, x0.25 after epochs 3 and 5), and per data set
    recipe: Mapping[str, Any] = field(default_factory=lambda: {"optimizer": "adam", "lr_schedule": "step",
                                                               "milestones": [3, 5], "lr_decay": 0.25})
    recipe_by_data: Mapping[str, Mapping[str, Any]] = field(default_factory=lambda: dict(JITTER))
    tune_epochs: int = 1  # 0: every point at its rule's default learning rate
    tune_limit_train: int | None = 20_000
    lr_step: float = 3.0  # grid: the default x lr_step**k, k = -1, 0, 1, widened up to lr_extensions times
    lr_extensions: int = 1
    probe_steps: int = 4  # steps of the memory probe, the first 2 warm-up
    published: Mapping[tuple[str, int], Published] = field(default_factory=lambda: dict(INFOPRO_CIFAR10))

    def points(self, rule_names: Sequence[str] | None = None) -> list[Point]:
        """The reference, then every rule (``rule_names``: a subset of the suite's) at every K."""
        chosen = list(self.rules) if rule_names is None else list(rule_names)
        outside = [name for name in chosen if name not in self.rules]
        if outside:
            rules.get(outside[0])  # an unknown name is a UserError listing the rules
            raise UserError(f"suite {self.name} has no row {outside[0]!r}; its rows are {', '.join(self.rules)} "
                            f"(and {REFERENCE}, always run)")
        return [Point(REFERENCE, None), *(Point(rule, k) for rule in chosen for k in self.ks)]


MODULES = ModulesSuite(
    "modules", "resnet-20 cut into K = 1, 2, 4, 8 modules for local-learned, predsim, dgl and infopro, beside BP end "
               "to end, on Fashion-MNIST and MNIST (60k/10k), the conv suite's recipe (6 epochs, 2-pixel jitter + flip "
               "on Fashion-MNIST, x0.25 after epochs 3 and 5, Adam, learning rate tuned per point on a validation "
               "split), 2 seeds; each point's training-step memory")

MODULES_QUICK = ModulesSuite(
    "modules-quick", "smoke run: resnet-8 cut into K = 1, 2, 4 modules for the same rules beside BP, 4,000 "
                     "Fashion-MNIST images, 1 epoch without augmentation or schedule, default learning rates, 1 seed",
    datasets=("fashion-mnist",), depths=(8,), ks=(1, 2, 4), epochs=1, seeds=1, limit_train=4000,
    recipe={"optimizer": "adam"}, recipe_by_data={}, tune_epochs=0, probe_steps=3)


def get_modules_suite(quick: bool) -> ModulesSuite:
    return MODULES_QUICK if quick else MODULES


def with_seeds(suite: ModulesSuite, seeds: int | None) -> ModulesSuite:
    return suite if seeds is None else replace(suite, seeds=seeds)


# ----- what runs -------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModulesRun:
    stage: str  # "tune" (evaluated on the validation split) or "final" (on the test split)
    point: Point
    depth: int
    data: str
    seed: int
    lr: float

    @property
    def train_data(self) -> str:
        return VALIDATION_PREFIX + self.data if self.stage == "tune" else self.data

    def folder(self, out: Path) -> Path:
        # The learning rate is part of the name, so a changed choice can never reuse another run.
        return (out / "runs" / self.stage / self.data / f"resnet{self.depth}" / self.point.slug /
                f"lr{self.lr:.3g}-seed{self.seed}")


def network(point: Point, depth: int, suite: ModulesSuite) -> NetSpec:
    return NetSpec(arch="resnet", depth=depth, width=suite.width, modules=None if point.modules is None else [point.k])


def spec_of(run: ModulesRun, suite: ModulesSuite) -> RunSpec:
    """The run as a RunSpec: what its ``localcredit train`` command line is written from."""
    recipe = from_mapping(RunSpec, {**suite.recipe, **suite.recipe_by_data.get(run.data, {})}, f"suite {suite.name}")
    tuning = run.stage == "tune"
    net = network(run.point, run.depth, suite)
    return RunSpec(rule=run.point.rule, data=run.train_data, arch=net.arch, depth=net.depth, width=net.width,
                   modules=net.modules, **recipe, epochs=suite.tune_epochs if tuning else suite.epochs,
                   batch_size=suite.batch_size,
                   limit_train=(suite.tune_limit_train or suite.limit_train) if tuning else suite.limit_train,
                   lr=run.lr, seed=run.seed)


def train_arguments(run: ModulesRun, suite: ModulesSuite, out: Path, threads: int,
                    passed_on: Sequence[str] = ()) -> list[str]:
    """The ``localcredit train`` command line of one run (``passed_on``: the bench's --device and --log)."""
    return ["train", *to_argv(spec_of(run, suite)), "--threads", str(threads), *passed_on, "--out",
            str(run.folder(out)), "--quiet"]


def default_lr(point: Point, suite: ModulesSuite) -> float:
    return rules.get(point.rule).default_lr(suite.recipe.get("optimizer", "adam"), "resnet")


def validate_plan(suite: ModulesSuite, points: Sequence[Point]) -> None:
    """Build every point's network and rule once (no data): a bad plan fails before any run starts."""
    for depth in suite.depths:
        for point in points:
            spec = spec_of(ModulesRun("final", point, depth, suite.datasets[0], 0, default_lr(point, suite)), suite)
            rule_cls = rules.get(point.rule)
            rule_cls(rule_cls.build_network(spec.net_spec(), (1, 28, 28), 10), validate(spec), spec.part(OptimConfig))


# ----- learning rates ------------------------------------------------------------------------------
Key = tuple[Point, int, str]  # (point, depth, data set)


def validation_accuracy(run: ModulesRun, out: Path) -> float:
    result = read_result(run.folder(out)) or {}
    return result["test_accuracy"] if result.get("status") == "ok" else -math.inf


def tune(suite: ModulesSuite, points: Sequence[Point], out: Path,
         train: Callable[[list[ModulesRun]], None]) -> tuple[dict[Key, float], list[ModulesRun]]:
    """Each (point, depth, data set)'s learning rate: the best validation accuracy of the grid around its rule's
    default (an edge that wins widens the grid, ``lr_extensions`` times); ties go to the one nearest the default."""
    keys = [(point, depth, data) for data in suite.datasets for depth in suite.depths for point in points]
    if not suite.tune_epochs:
        return {key: default_lr(key[0], suite) for key in keys}, []
    grids = {key: [grid_value(default_lr(key[0], suite) * suite.lr_step ** k) for k in (-1, 0, 1)] for key in keys}

    def runs_of(key: Key) -> list[ModulesRun]:
        return [ModulesRun("tune", key[0], key[1], key[2], 0, lr) for lr in grids[key]]

    def best(key: Key) -> float:
        scored = [(validation_accuracy(run, out), -abs(math.log(run.lr / default_lr(key[0], suite))), run.lr)
                  for run in runs_of(key)]
        return max(scored)[2]

    submitted: set[ModulesRun] = set()
    for extension in range(suite.lr_extensions + 1):
        new = [run for key in keys for run in runs_of(key) if run not in submitted]
        train(new)
        submitted.update(new)
        if extension == suite.lr_extensions:
            break
        widened = False
        for key in keys:
            chosen, lrs = best(key), grids[key]
            if chosen in (max(lrs), min(lrs)):
                lrs.append(grid_value(chosen * suite.lr_step if chosen == max(lrs) else chosen / suite.lr_step))
                widened = True
        if not widened:
            break
    return {key: best(key) for key in keys}, [run for key in keys for run in runs_of(key)]


def final_runs(suite: ModulesSuite, points: Sequence[Point], lrs: dict[Key, float]) -> list[ModulesRun]:
    return [ModulesRun("final", point, depth, data, seed, lrs[point, depth, data])
            for data in suite.datasets for depth in suite.depths for point in points for seed in range(suite.seeds)]


# ----- memory ------------------------------------------------------------------------------------
def probe_file(point: Point, depth: int, out: Path) -> Path:
    return out / "probes" / f"resnet{depth}-{point.slug}.json"


def probe(point: Point, depth: int, suite: ModulesSuite, out: Path) -> dict:
    """The training step's memory (and time) of a point, measured alone in a fresh process, one thread."""
    path = probe_file(point, depth, out)
    if path.exists():
        return read_json(path, "probe file")
    spec = network(point, depth, suite)
    command = [sys.executable, "-m", "localcredit.bench.probe", "--rule", point.rule, "--data", suite.datasets[0],
               *to_argv(spec), "--batch-size", str(suite.batch_size), "--steps", str(suite.probe_steps),
               "--timed-steps", "1", "--threads", "1"]
    done = TRAININGS.run(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    TRAININGS.check()  # a stop ended (or prevented) the probe: nothing of it is written
    assert done is not None  # run() gives None only while stopping, and check() has raised then
    if done.returncode != 0:
        raise RuntimeError(f"probing {point.label} on resnet-{depth} failed: {done.stderr.strip()[-300:]}")
    payload = {**json.loads(done.stdout.strip().splitlines()[-1]), "data": suite.datasets[0], "depth": depth,
               "modules": point.modules}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload) + "\n")
    return payload


# ----- the whole suite -------------------------------------------------------------------------
@dataclass
class ModulesBenchOptions(PoolOptions):  # --device goes to every training; the memory probes run on the CPU
    suite: ModulesSuite
    out: Path
    rule_names: list[str] | None  # None: the suite's rows


def check_options(options: ModulesBenchOptions) -> None:
    for name, value in (("--seeds", options.suite.seeds), ("--workers", options.workers),
                        ("--threads", options.threads)):
        if value < 1:
            raise UserError(f"{name} must be at least 1, got {value}")
    if options.rule_names is not None and not options.rule_names:
        raise UserError("--rules selects no rule")
    if options.resume and options.overwrite:
        raise UserError("--resume and --overwrite contradict each other; pass one of them")


def run_modules_bench(options: ModulesBenchOptions) -> dict:
    """Plan, run (skipping finished runs, resuming interrupted ones), probe and report the suite; a summary."""
    from ..data import load

    check_options(options)
    suite, out = options.suite, options.out
    points = suite.points(options.rule_names)
    validate_plan(suite, points)
    for data in suite.datasets:
        load(data)  # missing data fails here, before any run
    claim_bench_dir(out, options.resume, options.overwrite)
    with hold_run_folder(out):  # no other bench works in `out` until this one ends
        return _run(options, points)


def _run(options: ModulesBenchOptions, points: list[Point]) -> dict:
    from .modules_report import write_report

    suite, out = options.suite, options.out
    counts = {"trained": 0, "skipped": 0}

    def start(run: ModulesRun) -> int | None:
        code = execute(train_arguments(run, suite, out, options.threads, options.passed_on()),
                       run.folder(out), options.threads)
        if run.stage == "tune" and is_finished(read_result(run.folder(out))):
            (run.folder(out) / "checkpoint.pt").unlink(missing_ok=True)  # only its validation accuracy is used
        return code

    def train(runs: list[ModulesRun], desc: str) -> None:
        todo = [run for run in runs if not is_finished(read_result(run.folder(out)))]
        counts["trained"] += len(todo)
        counts["skipped"] += len(runs) - len(todo)
        failed = run_pool(todo, start, options.workers, options.progress, desc,
                          label=lambda run: f"{run.point.label} resnet-{run.depth} {run.data}",
                          ok_codes=(0, 1))  # 1 = diverged, recorded in its result.json
        TRAININGS.check()
        if failed:
            raise RuntimeError(f"{len(failed)} run(s) failed; see log.txt in {failed[0].folder(out)}")

    TRAININGS.stopping = 0
    try:
        with StopRequests(on_signal=TRAININGS.forward):
            lrs, tune_runs = tune(suite, points, out, lambda runs: train(runs, "tuning (validation split)"))
            final = final_runs(suite, points, lrs)
            train(final, "final runs (test split)")
            # One at a time, after the runs: nothing else of ours shares the CPU with a probe.
            probes = {(point, depth): probe(point, depth, suite, out) for depth in suite.depths for point in points}
            report = write_report(options, points, tune_runs, final, probes)
    except Interrupted as exc:
        raise Interrupted(exc.signum, "every running training wrote its checkpoint", options.resume_hint) from None
    return {**counts, **report}

