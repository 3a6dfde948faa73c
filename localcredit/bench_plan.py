"""What a benchmark suite runs: suites, entries (a rule on a network), runs, and their command lines.

The plan is data: ``bench`` executes it and ``bench_report`` presents what it produced; neither
needs the other to know what a run is.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Iterable, Sequence

from . import rules
from .architectures import NetSpec
from .data.sources import VALIDATION_PREFIX
from .errors import UserError
from .experiment import RunSpec
from .spec import to_argv
from .runfiles import RESULT, read_json

#: The rule every other is compared with (ratios, the extra reference runs on special networks).
REFERENCE = "bp"


@dataclass(frozen=True)
class Suite:
    """Everything that defines a suite's runs; the CLI may override ``seeds``."""

    name: str
    description: str
    datasets: tuple[str, ...]
    network: NetSpec  # what every rule trains (arch None: mlp); rules that need their own arch keep its hidden sizes
    epochs: int
    seeds: int
    batch_size: int = 128
    limit_train: int | None = None  # first N training samples (None: all)
    tune_epochs: int = 0  # 0: every rule runs at its default learning rate
    lr_step: float = 3.0  # tuning grid: the rule's default x lr_step**k, k = -lr_span..lr_span
    lr_span: int = 1
    lr_extensions: int = 2  # extra steps taken beyond an edge of the grid that scored best
    align_batch: int = 256

    @property
    def arch(self) -> str:
        return self.network.arch or "mlp"

    @property
    def hidden(self) -> tuple[int, ...]:
        return tuple(self.network.hidden or ())


SUITES: dict[str, Suite] = {
    "smoke": Suite("smoke", "installation check: 2,000 Fashion-MNIST images, one small epoch per rule",
                   datasets=("fashion-mnist",), network=NetSpec(hidden=[64, 64]), epochs=1, seeds=1, limit_train=2000),
    "quick": Suite("quick", "every rule on Fashion-MNIST, 30,000 training images and the full test set, 3 epochs, "
                            "2 seeds, default learning rates (2 min 12 s on 2 CPU cores here)",
                   datasets=("fashion-mnist",), network=NetSpec(hidden=[256, 256]), epochs=3, seeds=2,
                   limit_train=30_000),
    "full": Suite("full", "every rule on Fashion-MNIST (60k/10k) and MNIST, 784-1000-1000-10, 5 epochs, "
                          "learning rate tuned on a validation split, 3 seeds",
                  datasets=("fashion-mnist", "mnist"), network=NetSpec(hidden=[1000, 1000]), epochs=5, seeds=3,
                  tune_epochs=2),
}


def get_suite(name: str) -> Suite:
    if name not in SUITES:
        raise UserError(f"unknown suite {name!r}; choose from {', '.join(SUITES)}")
    return SUITES[name]


# ----- what runs -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Entry:
    """A rule on a kind of network: one row of the results table."""

    rule: str
    arch: str

    @property
    def label(self) -> str:
        return self.rule if self.arch == rules.get(self.rule).default_arch else f"{self.rule} [{self.arch}]"

    @property
    def slug(self) -> str:
        return f"{self.rule}-{self.arch}"


def entries(rule_names: Iterable[str], arch: str = "mlp") -> list[Entry]:
    """Each rule on ``arch`` (or on its own network where it cannot train that one), plus BP on every
    network some rule needs (for a fair baseline)."""
    chosen = [Entry(name, arch if rules.get(name).trains(arch) else rules.get(name).default_arch)
              for name in rule_names]
    archs = sorted({e.arch for e in chosen})
    references = [Entry(REFERENCE, arch) for arch in archs if Entry(REFERENCE, arch) not in chosen]
    return chosen + references


@dataclass(frozen=True)
class Run:
    stage: str  # "tune" (evaluated on the validation split) or "final" (evaluated on the test split)
    entry: Entry
    data: str  # the data set the final runs use; tuning runs train on val:<data>
    seed: int
    lr: float

    @property
    def train_data(self) -> str:
        return VALIDATION_PREFIX + self.data if self.stage == "tune" else self.data

    def folder(self, out: Path) -> Path:
        # The learning rate is part of the name, so a changed choice can never reuse another run.
        return out / "runs" / self.stage / self.data / self.entry.slug / f"lr{self.lr:.3g}-seed{self.seed}"


def entry_network(entry: Entry, suite: Suite) -> NetSpec:
    """The suite's network, or, for a rule that needs its own architecture, that one with the suite's hidden sizes."""
    if entry.arch == suite.arch:
        return replace(suite.network, arch=entry.arch)
    return NetSpec(arch=entry.arch, hidden=suite.network.hidden)


def spec_of(run: Run, suite: Suite) -> RunSpec:
    """The run as a RunSpec: what its ``localcredit train`` command line is written from."""
    return RunSpec(rule=run.entry.rule, data=run.train_data, **asdict(entry_network(run.entry, suite)),
                   epochs=suite.tune_epochs if run.stage == "tune" else suite.epochs, batch_size=suite.batch_size,
                   limit_train=suite.limit_train, lr=run.lr, seed=run.seed)


def train_arguments(run: Run, suite: Suite, out: Path, threads: int) -> list[str]:
    """The ``localcredit train`` command line of one run."""
    return ["train", *to_argv(spec_of(run, suite)), "--threads", str(threads), "--out", str(run.folder(out)),
            "--quiet"]


def final_runs(suite: Suite, chosen: Sequence[Entry], learning_rates: dict[tuple[Entry, str], float]) -> list[Run]:
    return [Run("final", entry, data, seed, learning_rates[entry, data])
            for data in suite.datasets for entry in chosen for seed in range(suite.seeds)]


def default_lr(entry: Entry) -> float:
    return rules.get(entry.rule).default_lr("adam", entry.arch)


def initial_grid(entry: Entry, suite: Suite) -> list[float]:
    return [default_lr(entry) * suite.lr_step ** k for k in range(-suite.lr_span, suite.lr_span + 1)]


def validate_suite(suite: Suite, chosen: Sequence[Entry], input_shape: tuple[int, ...] = (1, 28, 28),
                   num_classes: int = 10) -> None:
    """Build every entry's network and rule once (no data needed): a bad suite fails before any run."""
    for entry in chosen:
        rule_cls = rules.get(entry.rule)
        net = rule_cls.build_network(entry_network(entry, suite), input_shape, num_classes)
        rule_cls(net)


def read_result(folder: Path) -> dict | None:
    """A run's result.json (None before it has one); a damaged one is a one-line UserError naming it."""
    path = folder / RESULT
    return read_json(path) if path.exists() else None


def is_finished(result: dict | None) -> bool:
    """A run is done when it completed its epochs or diverged (re-running would diverge again)."""
    if result is None:
        return False
    return result.get("status") == "diverged" or (
        result.get("status") == "ok" and result.get("epochs_completed") == result.get("epochs"))
