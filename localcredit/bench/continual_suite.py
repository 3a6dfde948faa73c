"""The continual-learning suite: every rule x every strategy x the three split-MNIST scenarios (issue 27).

``localcredit bench --suite continual [--quick]`` plans van de Ven & Tolias's split-MNIST protocol
(784-400-400 MLP, Adam 1e-3, batch 128, 5 tasks of 2000 steps; replay and A-GEM keep 100 samples per
class) for every registered rule under every strategy, runs each as its own ``localcredit continual``
process through the bench's process pool (``runner.run_pool``: ``--workers`` at a time, stop signals
passed on, resumable), and writes results.csv, RESULTS.md and plots (``continual_report``).

Fairness, by construction:

* every rule trains the same network (a rule that needs its own kind of network trains those hidden
  sizes in it, and BP runs on that network too, as in the other suites) at its default Adam learning
  rate, 1e-3, the protocol's, for every rule but the invertible family (1e-4, their documented default);
* each strategy's strength (EWC's and online EWC's lambda, SI's c, LwF's temperature) is chosen per
  rule and scenario from the same small log-spaced grid, on a validation split carved from the training
  data (``--data val:mnist``), seed 0, with fewer steps per task; the test split is only ever seen by
  the final runs;
* a strategy that does not apply to a scenario (LwF in task-incremental learning) is left out of that
  scenario, with a note in the report.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from .. import rules
from ..continual import strategies
from ..continual.experiment import ContinualSpec, validate_continual
from ..continual.scenarios import SCENARIOS
from ..data.base import VALIDATION_PREFIX
from ..errors import UserError
from ..experiment import validate
from ..rules.base import OptimConfig
from ..spec import flag_of, option_fields, to_argv
from ..training.runfiles import CHECKPOINT, RESULT, Interrupted, StopRequests, hold_run_folder, read_json
from .plan import Entry, entries
from .published import SPLIT_MNIST_BP, PublishedAccuracy
from .runner import TRAININGS, PoolOptions, claim_bench_dir, execute, run_pool

#: van de Ven, Tuytelaars & Tolias (2022): task-, domain- and class-incremental split MNIST.
SPLIT_SCENARIOS = ("split-task", "split-domain", "split-class")
#: The table's column order: the bounds first, then regularisation, distillation, memory.
STRATEGY_ORDER = ("naive", "joint", "ewc", "online-ewc", "si", "lwf", "replay", "agem")
#: The rows that get more seeds: BP, and the local rules the issue's table singles out.
SINGLED_OUT = ("bp", "nan", "local-random", "lfnn-l")
#: 1000 samples in all, 100 per class (van de Ven et al. 2022's split-MNIST budget).
MEMORY = {"replay": ("size=1000",), "agem": ("size=1000",)}
#: What a run that diverged leaves in its folder (``continual`` writes no result.json then).
DIVERGED = "diverged.txt"


def number(value: float) -> str:
    """A grid value as options and folder names write it: 0.5, 50, 500, 5e3, 1e10."""
    if 1e-3 <= abs(value) < 1e3:
        return f"{value:g}"
    mantissa, exponent = f"{value:e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


@dataclass(frozen=True)
class Tuning:
    """The strength a strategy's tuning varies, its grid per scenario, and options set beside it."""

    key: str  # the --strategy-set option
    grid: Mapping[str, tuple[float, ...]]  # scenario -> values, log-spaced
    fixed: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # scenario -> other options, not tuned
    source: str = ""  # the authors' choices the grid is centred on

    def options(self, scenario: str, value: float) -> tuple[str, ...]:
        return (*self.fixed.get(scenario, ()), f"{self.key}={number(value)}")


#: The grids: three log-spaced values per scenario spanning the authors' two choices (their code's
#: param_values.py, 2019 and 2022); our Fisher is computed as theirs (per sample, predicted labels), so
#: the same scale applies. The class-incremental EWC grid reaches above both: the authors note that
#: lambda "needs to be set several orders of magnitude larger" there (continual-learning issue #10).
TUNING = {
    "ewc": Tuning("strength", {"split-task": (1e5, 1e6, 1e7), "split-domain": (1e6, 1e8, 1e10),
                               "split-class": (1e8, 1e9, 1e10)},
                  source="lambda 1e5 / 1e10 / 1e9 (2022), 1e7 / 1e6 / 1e8 (2019), task / domain / class"),
    "online-ewc": Tuning("strength", {"split-task": (1e7, 1e8, 1e9), "split-domain": (1e7, 1e8, 1e9),
                                      "split-class": (1e8, 1e9, 1e10)},
                         fixed={"split-task": ("gamma=0.8",), "split-domain": ("gamma=0.7",),
                                "split-class": ("gamma=0.8",)},
                         source="lambda 1e8 / 1e8 / 1e9, gamma 0.8 / 0.7 / 0.8 (2019; gamma kept, not tuned)"),
    "si": Tuning("c", {"split-task": (1.0, 10.0, 100.0), "split-domain": (500.0, 5e3, 5e4),
                       "split-class": (0.5, 50.0, 5e3)},
                 source="c 10 / 5e4 / 5e3 (2022), 50 / 500 / 0.5 (2019)"),
    # The distillation weight keeps the authors' t / (t + 1); the temperature is their one named option.
    "lwf": Tuning("temperature", {"split-domain": (1.0, 2.0, 4.0), "split-class": (1.0, 2.0, 4.0)},
                  source="T = 2 (2019 and 2022); the distillation weight stays t / (t + 1), theirs"),
}


@dataclass(frozen=True)
class ContinualSuite:
    """Everything that defines the continual suite's runs; the CLI may override the seeds and the rows."""

    name: str
    description: str
    data: str = "mnist"
    hidden: tuple[int, ...] = (400, 400)
    optimizer: str = "adam"
    batch_size: int = 128
    tasks: int = 5
    steps_per_task: int = 1000
    limit_train: int | None = None  # first N training samples (None: all)
    scenarios: tuple[str, ...] = SPLIT_SCENARIOS
    strategies: tuple[str, ...] | None = None  # None: every registered strategy
    rules: tuple[str, ...] | None = None  # None: every registered rule
    seeds: int = 1
    singled_out: tuple[str, ...] = SINGLED_OUT
    singled_out_seeds: int = 3
    strategy_options: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: dict(MEMORY))
    tuning: Mapping[str, Tuning] = field(default_factory=dict)  # strategy -> its tuning (none: its defaults)
    tune_steps_per_task: int = 250
    #: the stability-gap plot: BP against the first of these local rules that ran
    local_rules: tuple[str, ...] = ("local-random", "lfnn-l", "nan")
    published: Mapping[tuple[str, str], tuple[PublishedAccuracy, ...]] = field(default_factory=dict)
    #: where the suite departs from the protocol of the published figures, said beside them
    departure: str = ""

    def strategy_names(self) -> list[str]:
        names = self.strategies or tuple(strategies.available())
        return sorted(names, key=lambda n: (STRATEGY_ORDER.index(n) if n in STRATEGY_ORDER else len(STRATEGY_ORDER), n))

    def seeds_of(self, entry: Entry) -> int:
        on_own_network = entry.arch == rules.get(entry.rule).default_arch
        return self.singled_out_seeds if entry.name in self.singled_out and on_own_network else self.seeds


#: The grid's budget: 300 steps per task (the protocol's 2000 would make the grid ~60 CPU hours, 1000 ~20): measured
#: on this machine (one thread, 1500 steps, naive): bp 18 s, predsim 22 s, gaitprop 28 s, dgl 32 s a run, so with
#: EWC's Fisher, A-GEM's reference updates and the 660 tuning runs the grid took ~4.5 h on 2 cores (docs/bench.md).
GRID_STEPS = 300
CONTINUAL = ContinualSuite(
    "continual", "every rule x every strategy on split MNIST, task-, domain- and class-incremental (van de Ven & "
                 "Tolias 2019 protocol's network and optimiser: 784-400-400 MLP, Adam, batch 128, 5 tasks, replay "
                 f"and A-GEM keep 100 samples per class; {GRID_STEPS} steps per task, not the protocol's 2000, so that "
                 "the grid fits about 4 hours of this machine); strategy strengths tuned per rule and scenario on a "
                 "validation split (100 steps per task); 3 seeds for bp, nan, local-random and lfnn-l, 1 for the "
                 "other rules",
    steps_per_task=GRID_STEPS, tune_steps_per_task=100, tuning=TUNING, published=SPLIT_MNIST_BP,
    departure=f"the published figures train 2000 steps per task, this grid {GRID_STEPS} (so that every rule x every "
              "strategy x 3 scenarios fits about 4 hours of this machine); BP under every strategy at the published "
              "2000 steps is in results/continual/protocol")

CONTINUAL_QUICK = ContinualSuite(
    "continual-quick", "bp, local-random and lfnn-l x naive, ewc and replay on split MNIST, task- and "
                       "class-incremental, 300 steps per task, 1 seed, strategy defaults (no tuning)",
    scenarios=("split-task", "split-class"), strategies=("naive", "ewc", "replay"),
    rules=("bp", "local-random", "lfnn-l"), steps_per_task=300, singled_out_seeds=1, published=SPLIT_MNIST_BP,
    departure="the published figures train 2000 steps per task, this quick run 300, with untuned strategies")


def get_continual_suite(quick: bool) -> ContinualSuite:
    return CONTINUAL_QUICK if quick else CONTINUAL


def with_seeds(suite: ContinualSuite, seeds: int | None) -> ContinualSuite:
    """``--seeds N``: every row N seeds (the singled-out rows too)."""
    return suite if seeds is None else replace(suite, seeds=seeds, singled_out_seeds=seeds)


# ----- what runs -------------------------------------------------------------------------------
def applies(strategy: str, scenario: str) -> bool:
    return SCENARIOS[scenario] in strategies.get(strategy).kinds


def left_out(suite: ContinualSuite) -> list[tuple[str, str]]:
    """(strategy, scenario) pairs the suite does not run: the strategy refuses that kind of scenario."""
    return [(s, sc) for sc in suite.scenarios for s in suite.strategy_names() if not applies(s, sc)]


def suite_rows(suite: ContinualSuite, names: Sequence[str] | None = None) -> list[Entry]:
    """The rows: ``names`` (default: the suite's, or every registered rule) on the MLP, or on the network their
    rule needs with BP beside it there; an unknown name is a UserError listing the rules."""
    return entries(list(names) if names is not None else list(suite.rules or rules.available()), "mlp")


def row_slug(entry: Entry) -> str:
    """A row in folder names: the rule, plus the network when it is not the rule's own (bp-invertible)."""
    return entry.name if entry.arch == rules.get(entry.rule).default_arch else f"{entry.name}-{entry.arch}"


@dataclass(frozen=True)
class SuiteRun:
    """One ``localcredit continual`` run of the suite."""

    stage: str  # "tune" (evaluated on the validation split) or "final" (on the test split)
    entry: Entry
    scenario: str
    strategy: str
    seed: int
    options: tuple[str, ...] = ()  # --strategy-set options
    tuned: str = ""  # the tuned option's setting ("strength=1e8"), in options too

    def folder(self, out: Path) -> Path:
        if self.stage == "final":
            return out / "runs" / self.scenario / self.strategy / f"{row_slug(self.entry)}-seed{self.seed}"
        value = self.tuned.replace("=", "")
        return out / "runs" / "tune" / self.scenario / self.strategy / f"{row_slug(self.entry)}-{value}-seed{self.seed}"


def lr_of(entry: Entry, suite: ContinualSuite) -> float:
    """The rule's default learning rate for the suite's optimiser on its network (the protocol's 1e-3 for most)."""
    return rules.get(entry.rule).default_lr(suite.optimizer, entry.arch)


def spec_of(run: SuiteRun, suite: ContinualSuite) -> ContinualSpec:
    """The run as a ContinualSpec: what its command line is written from. Tuning runs train on the validation
    split, with fewer steps per task and no accuracy curve (only their final accuracy is used)."""
    tuning: dict[str, Any] = {"data": VALIDATION_PREFIX + suite.data, "steps_per_task": suite.tune_steps_per_task,
              "curve_every": 0} if run.stage == "tune" else {"data": suite.data, "steps_per_task": suite.steps_per_task}
    return ContinualSpec(
        rule=run.entry.rule, options=list(run.entry.options), arch=run.entry.arch, hidden=list(suite.hidden),
        optimizer=suite.optimizer, lr=lr_of(run.entry, suite), batch_size=suite.batch_size, seed=run.seed,
        limit_train=suite.limit_train, scenario=run.scenario, tasks=suite.tasks, strategy=run.strategy,
        strategy_options=list(run.options), **tuning)


#: A run's command line starts with these options, written even at their defaults: it states the whole protocol.
LEADING_FIELDS = ("rule", "data", "scenario", "strategy", "strategy_options", "tasks", "steps_per_task", "arch",
                  "hidden", "optimizer", "lr", "batch_size", "seed")


def continual_arguments(run: SuiteRun, suite: ContinualSuite, out: Path, threads: int,
                        passed_on: Sequence[str] = ()) -> list[str]:
    """The ``localcredit continual`` command line of one run (``passed_on``: the bench's --log, as given)."""
    spec = spec_of(run, suite)
    flags = {f.name: flag_of(f) for f in option_fields(ContinualSpec)}
    given = to_argv(spec)  # flag, value pairs (a repeated option: one pair per value)
    pairs = list(zip(given[::2], given[1::2]))
    for name in LEADING_FIELDS:
        if name != "strategy_options" and all(flag != flags[name] for flag, _ in pairs):
            pairs.append((flags[name], str(getattr(spec, name))))
    order = [flags[name] for name in LEADING_FIELDS]
    pairs.sort(key=lambda pair: order.index(pair[0]) if pair[0] in order else len(order))  # stable: the rest keep theirs
    return ["continual", *(word for pair in pairs for word in pair), "--threads", str(threads), *passed_on,
            "--out", str(run.folder(out)), "--quiet"]


def base_options(suite: ContinualSuite, strategy: str) -> tuple[str, ...]:
    return tuple(suite.strategy_options.get(strategy, ()))


def planned(suite: ContinualSuite) -> list[tuple[str, str]]:
    """(scenario, strategy) pairs the suite runs, in table order."""
    return [(sc, s) for sc in suite.scenarios for s in suite.strategy_names() if applies(s, sc)]


def tuning_runs(suite: ContinualSuite, chosen: Sequence[Entry]) -> list[SuiteRun]:
    runs = []
    for scenario, strategy in planned(suite):
        tuning = suite.tuning.get(strategy)
        if tuning is None or scenario not in tuning.grid:
            continue
        for entry in chosen:
            for value in tuning.grid[scenario]:
                options = (*base_options(suite, strategy), *tuning.options(scenario, value))
                runs.append(SuiteRun("tune", entry, scenario, strategy, 0, options, options[-1]))
    return runs


Choice = dict[tuple[Entry, str, str], float]  # (row, scenario, strategy) -> the chosen value


def validation_accuracy(run: SuiteRun, out: Path) -> float:
    """A tuning run's final average accuracy on the validation split (-inf when it diverged, failed or is missing)."""
    result = read_result(run.folder(out))
    return result["average_accuracy"] if result.get("status") == "finished" else -math.inf


def choose(suite: ContinualSuite, tune: Sequence[SuiteRun], out: Path) -> Choice:
    """Per row, scenario and strategy, the grid value with the best validation accuracy (ties: the one
    nearest the grid's middle, in log scale)."""
    scored: dict[tuple[Entry, str, str], list[tuple[float, float, float]]] = {}
    for run in tune:
        grid = suite.tuning[run.strategy].grid[run.scenario]
        value = float(run.tuned.split("=", 1)[1])
        middle = math.log(grid[len(grid) // 2])
        scored.setdefault((run.entry, run.scenario, run.strategy), []).append(
            (validation_accuracy(run, out), -abs(math.log(value) - middle), value))
    return {key: max(scores)[2] for key, scores in scored.items()}


def final_runs(suite: ContinualSuite, chosen: Sequence[Entry], choice: Choice) -> list[SuiteRun]:
    runs = []
    for scenario, strategy in planned(suite):
        for entry in chosen:
            options, tuned = base_options(suite, strategy), ""
            if (entry, scenario, strategy) in choice:
                extra = suite.tuning[strategy].options(scenario, choice[entry, scenario, strategy])
                options, tuned = (*options, *extra), extra[-1]
            runs += [SuiteRun("final", entry, scenario, strategy, seed, options, tuned)
                     for seed in range(suite.seeds_of(entry))]
    return runs


def validate_plan(suite: ContinualSuite, chosen: Sequence[Entry]) -> None:
    """Check every run's options and build every row's network and rule once (no data): a bad plan fails
    before any run starts."""
    for entry in chosen:
        rule_cls = rules.get(entry.rule)
        for scenario, strategy in planned(suite):
            options = (*base_options(suite, strategy), *(
                suite.tuning[strategy].options(scenario, suite.tuning[strategy].grid[scenario][0])
                if strategy in suite.tuning and scenario in suite.tuning[strategy].grid else ()))
            validate_continual(spec_of(SuiteRun("final", entry, scenario, strategy, 0, options), suite))
        spec = spec_of(SuiteRun("final", entry, suite.scenarios[0], "naive", 0), suite)
        rule_cls(rule_cls.build_network(spec.net_spec(), (1, 28, 28), 10), validate(spec), spec.part(OptimConfig))


# ----- run folders -----------------------------------------------------------------------------
def read_result(folder: Path) -> dict:
    """A run's result.json; {"status": "diverged"} where it diverged; {} before it has either."""
    if (folder / RESULT).exists():
        return read_json(folder / RESULT)
    if (folder / DIVERGED).exists():
        return {"status": "diverged", "message": (folder / DIVERGED).read_text().strip()}
    return {}


def is_finished(folder: Path) -> bool:
    """Finished, or diverged (running it again would diverge again)."""
    return read_result(folder).get("status") in ("finished", "diverged")


def check_not_stale(runs: Sequence[SuiteRun], suite: ContinualSuite, out: Path) -> None:
    """Refuse a finished final run made with other strategy options than planned (a tuning choice that changed):
    its folder name does not say the value, so it would be taken for the planned one."""
    for run in runs:
        result = read_result(run.folder(out))
        if result.get("status") != "finished":
            continue
        planned_config = asdict(strategies.strategy_config(run.strategy, list(run.options)))
        if result.get("strategy_config") != json.loads(json.dumps(planned_config)):
            raise UserError(f"{run.folder(out)} holds a run with strategy options {result.get('strategy_config')}, "
                            f"not the planned {planned_config}; delete that folder to run it again")


def diverged(folder: Path) -> str | None:
    """The divergence message a run's log ends with (None: it did not diverge)."""
    log = folder / "log.txt"
    lines = log.read_text(errors="replace").strip().splitlines() if log.exists() else []
    last = lines[-1] if lines else ""
    return last if last.startswith("localcredit: training diverged") else None


def start(run: SuiteRun, suite: ContinualSuite, out: Path, threads: int, passed_on: Sequence[str] = ()) -> int | None:
    """Run (or resume) one run in its own process; a divergence is recorded in its folder and counts as done."""
    folder = run.folder(out)
    code = execute(continual_arguments(run, suite, out, threads, passed_on), folder, threads)
    if run.stage == "tune" and is_finished(folder):
        # Only a tuning run's validation accuracy is used; the grid's ~500 checkpoints would take gigabytes.
        (folder / CHECKPOINT).unlink(missing_ok=True)
    if code == 1 and (message := diverged(folder)):
        (folder / DIVERGED).write_text(message + "\n")
        return 0
    return code


# ----- the whole suite -------------------------------------------------------------------------
@dataclass
class ContinualBenchOptions(PoolOptions):
    suite: ContinualSuite
    out: Path
    rule_names: list[str] | None  # None: the suite's rows


def check_options(options: ContinualBenchOptions) -> None:
    for name, value in (("--seeds", options.suite.seeds), ("--seeds", options.suite.singled_out_seeds),
                        ("--workers", options.workers), ("--threads", options.threads)):
        if value < 1:
            raise UserError(f"{name} must be at least 1, got {value}")
    if options.rule_names is not None and not options.rule_names:
        raise UserError("--rules selects no rule")
    if options.resume and options.overwrite:
        raise UserError("--resume and --overwrite contradict each other; pass one of them")


def run_continual_bench(options: ContinualBenchOptions) -> dict:
    """Plan, run (skipping finished runs, resuming interrupted ones), and report the suite; return a summary."""
    from ..data import load

    check_options(options)
    suite, out = options.suite, options.out
    chosen = suite_rows(suite, options.rule_names)
    validate_plan(suite, chosen)
    load(suite.data)  # missing data fails here, before any run
    claim_bench_dir(out, options.resume, options.overwrite)
    with hold_run_folder(out):  # no other bench works in `out` until this one ends
        return _run(options, chosen)


def _run(options: ContinualBenchOptions, chosen: list[Entry]) -> dict:
    from .continual_report import write_report

    suite, out = options.suite, options.out
    counts = {"trained": 0, "skipped": 0}
    failed: list[SuiteRun] = []

    def train(runs: list[SuiteRun], desc: str) -> None:
        todo = [run for run in runs if not is_finished(run.folder(out))]
        counts["trained"] += len(todo)
        counts["skipped"] += len(runs) - len(todo)
        failed.extend(run_pool(todo, lambda run: start(run, suite, out, options.threads, options.passed_on()),
                               options.workers,
                               options.progress, desc, label=lambda run: f"{run.entry.label} {run.strategy} "
                                                                         f"{run.scenario}"))
        TRAININGS.check()

    TRAININGS.stopping = 0
    try:
        with StopRequests(on_signal=TRAININGS.forward):
            tune = tuning_runs(suite, chosen)
            train(tune, "tuning (validation split)")
            final = final_runs(suite, chosen, choose(suite, tune, out))
            check_not_stale(final, suite, out)
            train(final, "continual runs (test split)")
            report = write_report(options, chosen, tune, final)
    except Interrupted as exc:
        raise Interrupted(exc.signum, "every running training wrote its checkpoint", options.resume_hint) from None
    if failed:
        raise RuntimeError(f"{len(failed)} run(s) failed (the report marks them); see log.txt in "
                           f"{failed[0].folder(out)}")
    return {**counts, **report}
