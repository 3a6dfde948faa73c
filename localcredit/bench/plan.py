"""What a benchmark suite runs: suites, entries (a rule on a network), runs, and their command lines.

The plan is data: ``bench`` executes it and ``bench_report`` presents what it produced; neither
needs the other to know what a run is.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from .. import rules
from ..data.base import VALIDATION_PREFIX
from ..errors import UserError
from ..experiment import RunSpec, validate
from ..nets.architectures import VGG8B, NetSpec
from ..rules.base import OptimConfig
from ..spec import from_mapping, to_argv
from ..training.runfiles import RESULT, read_json
from .published import BIOTORCH_LENET, BIOTORCH_SIGN, LFNN_MNIST, LOCAL_LOSS_MLP, LOCAL_LOSS_VGG8B, Published

#: The rule every other is compared with (ratios, the extra reference runs on special networks).
REFERENCE = "bp"


#: What a suite's own fields say; its ``recipe`` may set any other option of a run.
SUITE_FIELDS = ("rule", "data", "seed", "epochs", "batch_size", "limit_train", "lr", "options")


@dataclass(frozen=True)
class Suite:
    """Everything that defines a suite's runs; the CLI may override ``seeds``.

    A suite either trains its rules on one network and recipe, or is a list of ``cases`` (the
    ``paper`` suite), each a suite of its own with its own network, recipe, rows and published
    numbers, run into ``OUT/<case name>``.
    """

    name: str
    description: str
    datasets: tuple[str, ...] = ()
    network: NetSpec = field(default_factory=NetSpec)  # what every rule trains (arch None: mlp)
    epochs: int = 1
    seeds: int = 1
    batch_size: int = 128
    limit_train: int | None = None  # first N training samples (None: all)
    tune_epochs: int = 0  # 0: every rule runs at its default learning rate (or the recipe's lr)
    tune_limit_train: int | None = None  # tuning runs train on the first N images of the validation split's rest
    lr_step: float = 3.0  # tuning grid: the rule's default x lr_step**k, k = -lr_span..lr_span
    lr_span: int = 1
    lr_extensions: int = 2  # extra steps taken beyond an edge of the grid that scored best
    align_batch: int = 256
    #: the rows: rule names or VARIANTS names (None: every registered rule)
    rules: tuple[str, ...] | None = None
    #: options of RunSpec (its TrainSpec and OptimConfig fields) every run gets, e.g. lr_schedule, augment;
    #: "lr" fixes the learning rate (a published recipe) instead of each rule's default
    recipe: Mapping[str, Any] = field(default_factory=dict)
    #: per data set, options over ``recipe`` (flip on Fashion-MNIST only)
    recipe_by_data: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    #: per row (rule or variant name), options over the network and recipe, "options" being --set ones
    row_overrides: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    #: for rules that cannot train ``network``: the architectures to try first, and their networks
    fallback_archs: tuple[str, ...] = ()
    networks: Mapping[str, NetSpec] = field(default_factory=dict)
    #: published test errors: (row name, data set) -> Published
    published: Mapping[tuple[str, str], Published] = field(default_factory=dict)
    #: where the recipe comes from, and what in it was not published (shown in RESULTS.md)
    source: str = ""
    cases: tuple[Suite, ...] = ()

    @property
    def arch(self) -> str:
        return self.network.arch or "mlp"

    @property
    def hidden(self) -> tuple[int, ...]:
        return tuple(self.network.hidden or ())

    def case(self, name: str) -> Suite:
        for case in self.cases:
            if case.name == name:
                return case
        raise UserError(f"unknown case {name!r} of suite {self.name}; choose from "
                        f"{', '.join(c.name for c in self.cases) or 'none (this suite has no cases)'}")


#: Rows that are a rule with some of its options set, named as their paper names them.
VARIANTS: dict[str, tuple[str, tuple[str, ...]]] = {
    # local-loss's 'pred': a learned linear classifier per block with cross-entropy (METHODS.md).
    "pred": ("local-learned", ("loss=ce",)),
    # local-loss's 'sim': the similarity-matching term of predsim alone.
    "sim": ("predsim", ("loss=sim",)),
}


def recipe_of(suite: Suite, data: str, row: str = "") -> dict[str, Any]:
    """The run options a suite's recipe sets for ``data`` and the row ``row`` (typed and range-checked)."""
    merged = {**suite.recipe, **suite.recipe_by_data.get(data, {}), **suite.row_overrides.get(row, {})}
    clash = sorted(set(merged) & set(SUITE_FIELDS) - {"lr", "options"})
    if clash:
        raise UserError(f"suite {suite.name}: the recipe must not set {', '.join(clash)} (suite fields say it)")
    return from_mapping(RunSpec, merged, f"suite {suite.name}")


#: The MLP suites' framing numbers: BioTorch's LeNet and the LFNN MLP (other networks and lengths).
FRAMING = {**BIOTORCH_LENET, **BIOTORCH_SIGN, **LFNN_MNIST}

#: The conv suite's network (docs/bench.md sizes it: FLOPs per sample, step times, the 90-minute budget).
CONV_CHANNELS = "16,M,32,M,64,M"
CONV_HIDDEN = [128]
#: local-loss's augmentation: 2-pixel jitter, plus a horizontal flip where it keeps the meaning (clothes).
JITTER = {"mnist": {"augment": "crop:2"}, "fashion-mnist": {"augment": "crop:2,flip"}}

#: Framing numbers for the conv suite, keyed by our row names: local-loss's vgg8b for bp, pred (our
#: local-learned) and predsim; BioTorch's LeNet for fa, dfa and the sign-concordant rules.
CONV_PUBLISHED = {
    **{({"pred": "local-learned"}.get(row, row), data): number for (row, data), number in LOCAL_LOSS_VGG8B.items()
       if row != "sim"},
    **{key: number for key, number in BIOTORCH_LENET.items() if key[0] != REFERENCE},
    **BIOTORCH_SIGN,
}

CONV = Suite(
    "conv", f"every rule on a VGG with batch norm (--arch vgg --channels {CONV_CHANNELS} --hidden 128; the GAIT family "
            "on invertible-conv, BP on that net beside it), Fashion-MNIST and full MNIST (60k/10k), 6 epochs, "
            "2-pixel jitter (+ flip on Fashion-MNIST), step schedule x0.25 after epochs 3 and 5, learning rate tuned on a "
            "validation split, 2 seeds",
    datasets=("fashion-mnist", "mnist"), network=NetSpec(arch="vgg", channels=CONV_CHANNELS, hidden=CONV_HIDDEN),
    epochs=6, seeds=2, tune_epochs=1, tune_limit_train=20_000, lr_extensions=1,
    # local-loss's schedule (x0.25 at 50/75/89/94 % of training) on 6 epochs: after epochs 3 and 5 (its
    # last two fall inside epoch 6).
    recipe={"optimizer": "adam", "lr_schedule": "step", "milestones": [3, 5], "lr_decay": 0.25},
    recipe_by_data=JITTER, fallback_archs=("invertible-conv",),
    networks={"invertible-conv": NetSpec(arch="invertible-conv")},
    published=CONV_PUBLISHED,
    source="the published numbers are local-loss's vgg8b (100-200 epochs, 7.3M parameters) and BioTorch's LeNet: "
           "other networks and training lengths, shown to frame ours, not as the same recipe")


# ----- the paper suite: the published recipes, exactly as written -----------------------------------
LOCAL_LOSS_ROWS = ("bp", "pred", "sim", "predsim")
#: local-loss runs 'sim' and 'predsim' with --nonlin leakyrelu (bp and pred keep the default ReLU), and
#: 'pred' and 'predsim' on vgg8b with --dim-in-decoder 1024 (run_experiments.sh). Our leaky ReLU has
#: slope 0.1, theirs 0.01.
LEAKY = {"activation": "leaky_relu"}
LOCAL_LOSS_RECIPE = {"optimizer": "adam", "lr": 5e-4, "lr_schedule": "step", "lr_decay": 0.25}
MILESTONES_100 = {"milestones": [50, 75, 89, 94]}
MILESTONES_200 = {"milestones": [100, 150, 175, 188]}
LOCAL_LOSS_SOURCE = ("anokland/local-loss run_experiments.sh and train.py defaults (batch 128, Adam, no weight "
                     "decay, batch norm, lr decay x0.25, leaky ReLU slope 0.01 where ours is 0.1)")


def local_loss_case(network: str, data: str, net: NetSpec, epochs: int, milestones: dict, published: dict,
                    decoder: bool) -> Suite:
    """One of local-loss's run_experiments.sh blocks: bp / pred / sim / predsim on one network and data set."""
    decoder_rows: dict[str, dict[str, Any]] = (
        {"pred": {}, "predsim": {"options": ["dim_in_decoder=1024"]}} if decoder else {})
    rows: dict[str, dict[str, Any]] = {"sim": LEAKY, "predsim": {**LEAKY, **decoder_rows.get("predsim", {})}}
    return Suite(f"local-loss-{network}-{data}", f"local-loss's {network} recipe on {data}", datasets=(data,),
                 network=net, epochs=epochs, seeds=1, rules=LOCAL_LOSS_ROWS,
                 recipe={**LOCAL_LOSS_RECIPE, **milestones, **JITTER[data]}, row_overrides=rows,
                 published=published, source=LOCAL_LOSS_SOURCE)


def local_loss_mlp(dropout: float) -> NetSpec:
    return NetSpec(arch="mlp", hidden=[1024, 1024, 1024], norm="batch", dropout=dropout)


def local_loss_vgg8b(dropout: float) -> NetSpec:
    return NetSpec(arch="vgg", channels=VGG8B, hidden=[1024], norm="batch", dropout=dropout)


PAPER_CASES = (
    # MNIST: --dropout 0.1 --lr 5e-4 --num-layers 3 --epochs 100 --lr-decay-milestones 50 75 89 94
    local_loss_case("mlp", "mnist", local_loss_mlp(0.1), 100, MILESTONES_100, LOCAL_LOSS_MLP, decoder=False),
    # Fashion-MNIST: --dropout 0.025 --epochs 200 --lr-decay-milestones 100 150 175 188
    local_loss_case("mlp", "fashion-mnist", local_loss_mlp(0.025), 200, MILESTONES_200, LOCAL_LOSS_MLP,
                    decoder=False),
    # MNIST: --model vgg8b --dropout 0.2 --epochs 100 --lr-decay-milestones 50 75 89 94 (--dim-in-decoder 1024)
    local_loss_case("vgg8b", "mnist", local_loss_vgg8b(0.2), 100, MILESTONES_100, LOCAL_LOSS_VGG8B, decoder=True),
    # Fashion-MNIST: --model vgg8b --dropout 0.1 --epochs 200 --lr-decay-milestones 100 150 175 188
    local_loss_case("vgg8b", "fashion-mnist", local_loss_vgg8b(0.1), 200, MILESTONES_200, LOCAL_LOSS_VGG8B,
                    decoder=True),
    Suite("biotorch-lenet", "BioTorch's LeNet benchmark: bp / fa / dfa on MNIST and Fashion-MNIST",
          datasets=("mnist", "fashion-mnist"), network=NetSpec(arch="lenet"), epochs=250, seeds=1,
          rules=("bp", "fa", "dfa"),
          # BioTorch publishes no MNIST recipe; this is its CIFAR-10 LeNet Adam configuration
          # (benchmark_configs/cifar10/le_net/adam/*.yaml), the nearest one it does publish.
          recipe={"optimizer": "adam", "lr": 1e-3, "weight_decay": 1e-4, "lr_schedule": "step",
                  "milestones": [100, 150, 200], "lr_decay": 0.1},
          published=BIOTORCH_LENET,
          source="BioTorch publishes the MNIST/Fashion-MNIST errors but not their recipe: epochs, optimiser and "
                 "schedule here are its CIFAR-10 LeNet Adam config (Adam 1e-3, weight decay 1e-4, batch 128, 250 "
                 "epochs, x0.1 at 100/150/200), no augmentation. Our lenet has 'same' padding and a global max-pool "
                 "(docs/networks.md); BioTorch reports the best-validation model on that validation set"),
    Suite("lfnn-mlp-mnist", "the LFNN MNIST MLP: lfnn-l, 784-256-128, 32 workers, delta 0.7",
          datasets=("mnist",), network=NetSpec(arch="mlp", hidden=[256, 128]), epochs=50, seeds=1,
          rules=("lfnn-l",), recipe={"optimizer": "adam", "lr": 5e-4},
          row_overrides={"lfnn-l": {"options": ["workers=32", "delta=0.7"]}},
          published=LFNN_MNIST, source="the LFNN authors' released MNIST logs (METHODS.md): no augmentation or "
                                       "schedule stated, so none"),
)

PAPER = Suite("paper", "the published recipes, exactly as written, where a published number exists; each case runs "
                       "into OUT/<case>", cases=PAPER_CASES)

SUITES: dict[str, Suite] = {
    "smoke": Suite("smoke", "installation check: 2,000 Fashion-MNIST images, one small epoch per rule",
                   datasets=("fashion-mnist",), network=NetSpec(hidden=[64, 64]), epochs=1, seeds=1, limit_train=2000,
                   published=FRAMING),
    "quick": Suite("quick", "every rule on Fashion-MNIST, 30,000 training images and the full test set, 3 epochs, "
                            "2 seeds, default learning rates (2 min 12 s on 2 CPU cores here)",
                   datasets=("fashion-mnist",), network=NetSpec(hidden=[256, 256]), epochs=3, seeds=2,
                   limit_train=30_000, published=FRAMING),
    "full": Suite("full", "every rule on Fashion-MNIST (60k/10k) and MNIST, 784-1000-1000-10, 5 epochs, "
                          "learning rate tuned on a validation split, 3 seeds",
                  datasets=("fashion-mnist", "mnist"), network=NetSpec(hidden=[1000, 1000]), epochs=5, seeds=3,
                  tune_epochs=2, published=FRAMING),
    "conv": CONV,
    "paper": PAPER,
}


def get_suite(name: str) -> Suite:
    if name not in SUITES:
        raise UserError(f"unknown suite {name!r}; choose from {', '.join(SUITES)}, continual, speed, modules, claims")
    return SUITES[name]


# ----- what runs -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Entry:
    """A rule (or a named variant of it) on a kind of network: one row of the results table."""

    rule: str
    arch: str
    variant: str = ""  # a VARIANTS name ("sim"), when the row is the rule with some options set
    options: tuple[str, ...] = ()  # the variant's --set options

    @property
    def name(self) -> str:
        return self.variant or self.rule

    @property
    def label(self) -> str:
        return self.name if self.arch == rules.get(self.rule).default_arch else f"{self.name} [{self.arch}]"

    @property
    def slug(self) -> str:
        return f"{self.name}-{self.arch}"


def resolve_row(name: str) -> tuple[str, tuple[str, ...]]:
    """A row name as (rule, --set options); an unknown name is a UserError listing the rules."""
    rule, options = VARIANTS.get(name, (name, ()))
    rules.get(rule)  # unknown names raise UserError listing the available ones
    return rule, options


def make_entry(name: str, arch: str, fallback_archs: Sequence[str] = ()) -> Entry:
    """Row ``name`` on ``arch``, or, where its rule cannot train that, on the first of ``fallback_archs``
    it trains (else its own default network)."""
    rule, options = resolve_row(name)
    cls = rules.get(rule)
    if not cls.trains(arch):
        arch = next((a for a in fallback_archs if cls.trains(a)), cls.default_arch)
    return Entry(rule, arch, name if name in VARIANTS else "", options)


def entries(rule_names: Iterable[str], arch: str = "mlp", fallback_archs: Sequence[str] = ()) -> list[Entry]:
    """Each row on ``arch`` (or on the network its rule needs), plus BP on every network some rule
    needs (for a fair baseline)."""
    chosen = [make_entry(name, arch, fallback_archs) for name in rule_names]
    archs = sorted({e.arch for e in chosen}, key=lambda a: (a != arch, a))
    references = [Entry(REFERENCE, a) for a in archs if Entry(REFERENCE, a) not in chosen]
    return chosen + references


def suite_entries(suite: Suite, names: Sequence[str] | None = None) -> list[Entry]:
    """The rows a suite runs: ``names`` (default: the suite's rows, or every registered rule) on its network."""
    rows = list(names) if names is not None else list(suite.rules or rules.available())
    if suite.rules is not None and names is not None:
        outside = [n for n in rows if n not in suite.rules]
        if outside:
            raise UserError(f"suite {suite.name} has no row {outside[0]!r}; its rows are {', '.join(suite.rules)}")
    return entries(rows, suite.arch, suite.fallback_archs)


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
    """The suite's network; for a rule that needs its own architecture, the suite's network of that
    architecture, else that architecture with the suite's hidden sizes."""
    if entry.arch == suite.arch:
        return replace(suite.network, arch=entry.arch)
    if entry.arch in suite.networks:
        return replace(suite.networks[entry.arch], arch=entry.arch)
    return NetSpec(arch=entry.arch, hidden=suite.network.hidden)


def spec_of(run: Run, suite: Suite) -> RunSpec:
    """The run as a RunSpec: what its ``localcredit train`` command line is written from."""
    network = asdict(entry_network(run.entry, suite))
    recipe = recipe_of(suite, run.data, run.entry.name)
    if run.entry.arch != suite.arch:  # a network of its own: the recipe's network options are not its
        recipe = {k: v for k, v in recipe.items() if k not in network}
    options = [*run.entry.options, *recipe.pop("options", [])]
    recipe.pop("lr", None)  # the run's own (the recipe's when it fixes one: see default_lr)
    tuning = run.stage == "tune"
    return RunSpec(rule=run.entry.rule, data=run.train_data, **{**network, **recipe}, options=options,
                   epochs=suite.tune_epochs if tuning else suite.epochs, batch_size=suite.batch_size,
                   limit_train=(suite.tune_limit_train or suite.limit_train) if tuning else suite.limit_train,
                   lr=run.lr, seed=run.seed)


def train_arguments(run: Run, suite: Suite, out: Path, threads: int, passed_on: Sequence[str] = ()) -> list[str]:
    """The ``localcredit train`` command line of one run (``passed_on``: the bench's --device and --log, as given)."""
    return ["train", *to_argv(spec_of(run, suite)), "--threads", str(threads), *passed_on, "--out",
            str(run.folder(out)), "--quiet"]


def final_runs(suite: Suite, chosen: Sequence[Entry], learning_rates: dict[tuple[Entry, str], float]) -> list[Run]:
    return [Run("final", entry, data, seed, learning_rates[entry, data])
            for data in suite.datasets for entry in chosen for seed in range(suite.seeds)]


def default_lr(entry: Entry, suite: Suite | None = None) -> float:
    """The recipe's learning rate when it fixes one, else the rule's default for its optimiser and network."""
    recipe = suite.recipe if suite is not None else {}
    if "lr" in recipe:
        return float(recipe["lr"])
    return rules.get(entry.rule).default_lr(recipe.get("optimizer", "adam"), entry.arch)


def grid_value(lr: float) -> float:
    """A grid's learning rate to 6 significant digits: 3e-3 x 3 is 0.009, not 0.009000000000000001, in run
    folders and tables alike."""
    return float(f"{lr:.6g}")


def initial_grid(entry: Entry, suite: Suite) -> list[float]:
    return [grid_value(default_lr(entry, suite) * suite.lr_step ** k) for k in range(-suite.lr_span, suite.lr_span + 1)]


def validate_suite(suite: Suite, chosen: Sequence[Entry], input_shape: tuple[int, ...] = (1, 28, 28),
                   num_classes: int = 10) -> None:
    """Build every entry's network and rule once (no data needed): a bad suite fails before any run."""
    for entry in chosen:
        for data in suite.datasets or ("",):
            spec = spec_of(Run("final", entry, data, 0, default_lr(entry, suite)), suite)
            rule_cls = rules.get(entry.rule)
            net = rule_cls.build_network(spec.net_spec(), input_shape, num_classes)
            rule_cls(net, validate(spec), spec.part(OptimConfig))


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
