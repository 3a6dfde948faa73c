"""The claims suite's plan, as data: its settings (a network and a recipe each), the seed papers' claims,
and the case that answers each (its rows, its measurements and its design, in words).

``claims_plan`` assembles them; ``claims_runs`` turns a plan into run folders and command lines, and
``claims_suite`` runs it (its docstring says how the settings keep the comparison fair).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .. import rules
from ..errors import UserError
from ..nets.architectures import NetSpec
from .plan import CONV, JITTER, REFERENCE, Entry, Suite, default_lr, entries

# ----- settings: a network and a recipe each -------------------------------------------------------
#: The LFNN authors' released MNIST setting (METHODS.md, section 001), field by field.
LFNN_AUTHORS: dict[str, Any] = {"arch": "mlp", "hidden": [256, 128], "workers": 32, "delta": 0.7, "optimizer": "adam",
                                "lr": 5e-4, "batch_size": 128, "epochs": 50}
LFNN_NET = NetSpec(arch="mlp", hidden=[256, 128])
AUTHORS_OPTIONS = (f"workers={LFNN_AUTHORS['workers']}", f"delta={LFNN_AUTHORS['delta']}")
#: The GAIT-prop scaling paper's deep MLP: input -> 1024, five square invertible 1024 layers, square output.
DEEP_INVERTIBLE = NetSpec(arch="invertible", hidden=[1024] * 6)
BOTH = ("mnist", "fashion-mnist")


def full_settings() -> dict[str, Suite]:
    """Every setting of the full run; docs/bench.md ("The claims suite") says how each was sized."""
    return {
        "lfnn-authors": Suite(
            "lfnn-authors", "the LFNN authors' released MNIST setting: 784-256-128 MLP, Adam 5e-4, batch 128, 50 epochs, "
                            "no augmentation or schedule (none stated); the recipe fixes the learning rate: no tuning",
            datasets=("mnist",), network=LFNN_NET, epochs=LFNN_AUTHORS["epochs"], seeds=3,
            batch_size=LFNN_AUTHORS["batch_size"], recipe={"optimizer": "adam", "lr": LFNN_AUTHORS["lr"]}),
        "mlp": Suite(
            "mlp", "784-256-128 MLP (the LFNN net; gaitprop/tp/itp: --arch invertible --hidden 256,256, the nearest "
                   "square net, BP beside them), Adam, batch 128, 10 epochs, whole training split, learning rate tuned",
            datasets=BOTH, network=LFNN_NET, epochs=10, seeds=3, tune_epochs=1, tune_limit_train=20_000,
            lr_extensions=1, recipe={"optimizer": "adam"}, fallback_archs=("invertible",),
            networks={"invertible": NetSpec(arch="invertible", hidden=[256, 256])}),
        "vgg": replace(
            CONV, name="vgg",
            description="the conv suite's VGG and recipe (--arch vgg --channels 16,M,32,M,64,M --hidden 128, BN; "
                        "gaitprop/tp/itp on invertible-conv with BP beside them; 2-pixel jitter, + flip on Fashion-MNIST, "
                        "step schedule x0.25 after epochs 3 and 5), 6 epochs on the first 20,000 training images, "
                        "learning rate tuned (1 epoch, 10,000 images)",
            limit_train=20_000, tune_limit_train=10_000, seeds=3, published={},
            recipe_by_data={**JITTER, "cifar10": {"augment": "crop:2,flip"}, "svhn": {"augment": "crop:2"}}),
        "deep-invertible": Suite(
            "deep-invertible", "the GAIT-prop scaling paper's deep MLP: --arch invertible --hidden 1024 x 6 (input -> 1024, "
                               "five square invertible 1024 layers, square output with auxiliary units, leaky ReLU 0.1, "
                               "orthogonal init), Adam, batch 128, 10 epochs on the first 20,000 training images (cut from "
                               "the paper's 200 epochs to fit), learning rate tuned (1 epoch, 10,000 images)",
            datasets=("fashion-mnist", "mnist"), network=DEEP_INVERTIBLE, epochs=10, limit_train=20_000, seeds=3,
            tune_epochs=1, tune_limit_train=10_000, lr_extensions=1, recipe={"optimizer": "adam"}),
        "nan-check": Suite(
            "nan-check", "784-256-128 MLP, Adam 1e-3 for both rows (equal by design: no tuning), batch 128, 5 epochs",
            datasets=BOTH, network=LFNN_NET, epochs=5, seeds=3, recipe={"optimizer": "adam", "lr": 1e-3}),
    }


#: --quick: training images per setting (the test split stays whole: a verdict row reads test error).
QUICK_LIMIT = {"lfnn-authors": 2000, "mlp": 2000, "vgg": 1000, "deep-invertible": 1000, "nan-check": 2000}
QUICK_EPOCHS = 2


def quick_settings() -> dict[str, Suite]:
    return {name: replace(s, epochs=QUICK_EPOCHS, seeds=1, limit_train=QUICK_LIMIT[name], tune_epochs=0,
                          description=f"{s.description} -- QUICK: {QUICK_EPOCHS} epochs on the first "
                                      f"{QUICK_LIMIT[name]:,} training images, 1 seed, no tuning")
            for name, s in full_settings().items()}


# ----- what a case runs ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Arm:
    """One row of a case: a rule (maybe with options) on a setting's network, on some data sets, some seeds."""

    label: str  # the row's name in the tables: "lfnn-l", "lfnn-l workers=8", "bp [invertible]"
    entry: Entry  # the rule, its network and its --set options; the run folders are named by entry.slug
    setting: str
    datasets: tuple[str, ...]
    seeds: int
    lr: float | None = None  # fixed (an ablation); None: tuned where the setting tunes, else the recipe's/default
    role: str = "main"  # "main": the claim's rows; "ablation": a sub-case
    note: str = ""  # what an ablation changes, in words


@dataclass(frozen=True)
class Measure:
    """A measurement (``claims_measure``) of an arm's network and recipe, or of one of its finished runs."""

    kind: str  # memory | align-curve | readout | align-run
    name: str  # OUT/measures/<case>/<name>.json
    arm: Arm
    data: str
    seed: int = 0
    extra: tuple[str, ...] = ()  # more options of claims_measure

    def file(self, out: Path, case: str) -> Path:
        return out / "measures" / case / f"{self.name}.json"


@dataclass(frozen=True)
class Case:
    name: str
    title: str
    claims: tuple[str, ...]  # the keys of CLAIMS it answers
    arms: tuple[Arm, ...] = ()
    measures: tuple[Measure, ...] = ()
    design: str = ""  # how the runs answer the claims, in words (RESULTS.md and docs/bench.md)


@dataclass(frozen=True)
class Claim:
    key: str
    paper: str
    text: str
    case: str


#: One row each in RESULTS.md, in this order; the published figure and its source: published.SEED_CLAIMS.
CLAIMS = (
    Claim("lfnn-matches-bp", "001 LFNN", "LFNN-l matches BP: 1.20 % test error, MNIST MLP 784-256-128, 50 epochs", "lfnn"),
    Claim("lfnn-beats-bp-free", "001 LFNN",
          "LFNN-l has significantly lower error than previous BP-free algorithms on MNIST", "bp-free"),
    Claim("lfnn-cifar-imagenet", "001 LFNN", "... and on CIFAR-10 (even surpassing BP baselines) and ImageNet",
          "external"),
    Claim("random-beats-fa", "002 fixed random classifiers",
          "fixed random auxiliary classifiers beat feedback alignment and approach BP (MNIST)", "fixed-random"),
    Claim("random-memory", "002 fixed random classifiers", "drastically less memory traffic than BP", "memory"),
    Claim("random-cifar-svhn", "002 fixed random classifiers", "... beat FA and approach BP on CIFAR-10 and SVHN",
          "external"),
    Claim("gait-near-bp", "003 GAIT-prop", "GAIT-prop scales to deep networks, near BP", "gait"),
    Claim("gait-credit", "003 GAIT-prop", "effective multi-layer credit assignment in deeper networks", "gait-align"),
    Claim("gait-imagenet", "003 GAIT-prop", "... on CIFAR-10 deep MLPs and on ImageNet", "external"),
    Claim("nan-equals-bp", "000 NAN", "under its conditions the agents' strategy equals BP", "nan"),
    Claim("nan-forgets-less", "000 NAN", "NAN forgets less than BP in a catastrophic-forgetting benchmark", "nan"),
)

#: Rules that are not BP-free, and why: every other registered rule is a row of the BP-free comparison.
NOT_BP_FREE = {"bp": "is BP", "lfnn": "adds a cross-entropy backpropagated end to end",
               "nan-bp": "equals BP (its theorem)"}
#: The fixed-random case's rows beside local-random: its other schedule, the learned variant, FA, BP.
LAYERWISE = Entry("local-random", "mlp", "local-random-layerwise", ("schedule=layerwise",))


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def bp_free_rules() -> list[str]:
    return [name for name in rules.available() if name not in NOT_BP_FREE]


def on(entry: Entry, arch: str) -> Entry:
    return replace(entry, arch=arch)


def rows_on(setting: Suite, names: Sequence[str], datasets: Sequence[str], seeds: int) -> list[Arm]:
    """The rules ``names`` on a setting's network (or the one their rule needs), BP on every network used."""
    return [Arm(e.label if not e.variant else e.variant, e, setting.name, tuple(datasets), seeds)
            for e in entries(names, setting.arch, setting.fallback_archs)]


def lfnn_case(s: Mapping[str, Suite], seeds: int, quick: bool) -> Case:
    authors = s["lfnn-authors"]

    def lfnn_l(label: str, note: str, options: Sequence[str] = AUTHORS_OPTIONS, lr: float | None = None,
               datasets: tuple[str, ...] = ("mnist",), rule: str = "lfnn-l") -> Arm:
        variant = label.replace(" ", "-").replace("=", "").replace(".", "p")
        return Arm(label, Entry(rule, "mlp", variant, tuple(options)), authors.name, datasets, 1, lr, "ablation", note)

    main = [Arm("lfnn-l", Entry("lfnn-l", "mlp", "", AUTHORS_OPTIONS), authors.name, ("mnist",), seeds),
            Arm("lfnn", Entry("lfnn", "mlp", "", AUTHORS_OPTIONS), authors.name, ("mnist",), seeds),
            Arm("bp", Entry("bp", "mlp"), authors.name, ("mnist",), seeds)]
    ablations = [
        lfnn_l("lfnn-l workers=8", "8 workers per block instead of 32", ("workers=8", "delta=0.7")),
        lfnn_l("lfnn-l workers=128", "128 workers per block", ("workers=128", "delta=0.7")),
        lfnn_l("lfnn-l delta=0.5", "half the workers lead", ("workers=32", "delta=0.5")),
        lfnn_l("lfnn-l delta=1", "every worker leads: no follower loss", ("workers=32", "delta=1.0")),
        lfnn_l("lfnn-l follower_weight=0", "the follower loss switched off (leaders only)",
               (*AUTHORS_OPTIONS, "follower_weight=0")),
        lfnn_l("lfnn-l worker_head=grouped", "each worker reads its own group of units (the literal reading)",
               (*AUTHORS_OPTIONS, "worker_head=grouped")),
        lfnn_l("lfnn-l lr=1e-3", "Adam 1e-3 instead of 5e-4", lr=1e-3),
        lfnn_l("lfnn-l lr=2.5e-4", "Adam 2.5e-4 instead of 5e-4", lr=2.5e-4),
        lfnn_l("lfnn-l fashion-mnist", "the authors' setting on Fashion-MNIST: the epoch-to-epoch fall",
               datasets=("fashion-mnist",)),
        Arm("bp fashion-mnist", Entry("bp", "mlp", "bp-fashion"), authors.name, ("fashion-mnist",), 1, None,
            "ablation", "BP beside it on Fashion-MNIST"),
    ]
    readouts = tuple(Measure("readout", f"readout-{arm.label}-seed{seed}", arm, "mnist", seed)
                     for arm in main[:2] for seed in range(arm.seeds))
    return Case("lfnn", "LFNN-l and LFNN in the authors' released MNIST setting, with ablations", ("lfnn-matches-bp",),
                (*main, *ablations), readouts,
                design=("lfnn-l, lfnn (the log does not say which ran) and bp in the authors' setting, field by "
                        "field (784-256-128, 32 workers, delta 0.7, Adam 5e-4, batch 128, 50 epochs, MNIST 60k/10k), "
                        f"{plural(seeds, 'seed')}, no tuning (the recipe fixes the learning rate); final-epoch and "
                        "best-epoch test error. Sub-cases, 1 seed each: worker count, delta, the follower loss, the "
                        "worker layout, the learning rate, Fashion-MNIST (with BP) for the epoch-to-epoch fall; and, "
                        "from each trained network, the test accuracy read from the mean of each block's workers "
                        "instead of the head. Input normalisation cannot be varied: every data set is standardised "
                        "with its training statistics (no option). Verdict: holds when lfnn-l's final error is within "
                        "tolerance of 1.20 %; holds partly when it is within tolerance of BP on the same net (or only "
                        "lfnn, the best epoch or an ablation reaches 1.20 %); does not hold otherwise."))


def bp_free_case(s: Mapping[str, Suite], seeds: int) -> Case:
    names = ["lfnn-l", *(n for n in bp_free_rules() if n != "lfnn-l")]
    arms = [*rows_on(s["mlp"], names, BOTH, seeds), *rows_on(s["vgg"], names, BOTH, seeds)]
    return Case("bp-free", "LFNN-l against every other BP-free rule of the library, same nets and recipe",
                ("lfnn-beats-bp-free",), tuple(arms),
                design="every BP-free rule of the library (every registered rule but "
                       f"{', '.join(f'{k} ({v})' for k, v in NOT_BP_FREE.items())}) and BP on the 784-256-128 MLP "
                       "(10 epochs, whole training split) and on the conv suite's VGG (6 epochs, 20,000 images), MNIST "
                       f"and Fashion-MNIST, {plural(seeds, 'seed')}, learning rate tuned per rule on the validation split. "
                       "Verdict (MNIST, the claim's data): holds when lfnn-l's error is below every other BP-free "
                       "rule's by more than the tolerance on both nets; holds partly when it is best or tied-best on "
                       "one; does not hold when some rule is better beyond the tolerance on both.")


def fixed_random_case(s: Mapping[str, Suite], seeds: int) -> Case:
    arms = []
    for setting in (s["mlp"], s["vgg"]):
        arch = setting.arch
        arms += [Arm("local-random" if arch == "mlp" else "local-random [vgg]", Entry("local-random", arch),
                     setting.name, BOTH, seeds),
                 Arm("local-random layerwise" + ("" if arch == "mlp" else " [vgg]"), on(LAYERWISE, arch),
                     setting.name, BOTH, seeds),
                 *(Arm(name if arch == "mlp" else f"{name} [vgg]", Entry(name, arch), setting.name, BOTH, seeds)
                   for name in ("local-learned", "fa", REFERENCE))]
    return Case("fixed-random", "fixed random classifiers (local-random) vs FA vs BP, both schedules, learned variant",
                ("random-beats-fa",), tuple(arms),
                design="local-random (simultaneous and layer-wise), local-learned, fa and bp on the MLP and the VGG of "
                       f"the BP-free case (the same runs), MNIST and Fashion-MNIST, {plural(seeds, 'seed')}, tuned. Verdict: "
                       "per network and data set, local-random beats FA when its error is lower by more than the "
                       "tolerance; holds when it beats FA on every MNIST cell and ends closer to BP than FA does; "
                       "holds partly when it beats or ties FA on some; does not hold when FA is better on every "
                       "MNIST cell. Fashion-MNIST shows whether harder data widens the gap to BP.")


MEMORY_ROWS = (Entry("bp", "mlp"), Entry("fa", "mlp"), Entry("local-random", "mlp"), LAYERWISE,
               Entry("local-learned", "mlp"))


def memory_case(s: Mapping[str, Suite]) -> Case:
    measures = []
    for setting in (s["mlp"], s["vgg"]):
        for entry in MEMORY_ROWS:
            entry = on(entry, setting.arch)
            arm = Arm(entry.variant or entry.rule, entry, setting.name, ("mnist",), 1, default_lr(entry, setting))
            measures.append(Measure("memory", f"memory-{setting.name}-{entry.slug}", arm, "mnist"))
    return Case("memory", "memory and memory traffic of a training step against BP", ("random-memory",), (),
                tuple(measures),
                design="bp, fa, local-random (both schedules) and local-learned on the MLP and the VGG, batch 128: "
                       "the step memory (the bench's meter: the most memory of tensors made by training steps alive "
                       "at one time), the bytes every aten operation of a step reads and writes (the optimiser's "
                       "update apart: the same Adam for every rule), the weight bytes read, and the activations "
                       "autograd keeps for backward passes; each as a ratio to BP. Verdict: holds when local-random's "
                       "step memory and its traffic are both at most half of BP's on both nets; holds partly when "
                       "one of them is; does not hold when neither is.")


def gait_case(s: Mapping[str, Suite], seeds: int) -> Case:
    deep = s["deep-invertible"]
    arms = [Arm(name if name != REFERENCE else "bp [deep invertible]", Entry(name, "invertible"), deep.name,
                deep.datasets, seeds) for name in ("gaitprop", REFERENCE, "fa", "tp", "itp")]
    arms[2] = replace(arms[2], label="fa [deep invertible]")
    arms += [Arm("gaitprop paper recipe", Entry("gaitprop", "invertible", "gaitprop-paper", ("ortho=100",)), deep.name,
                 ("fashion-mnist",), 1, 1.9e-5, "ablation", "the 2021 paper's CIFAR-10 MLP recipe: Adam 1.9e-5, "
                                                           "orthogonality weight 100"),
             *(Arm(f"{name} [invertible-conv]", Entry(name, "invertible-conv"), "vgg", BOTH, seeds, role="ablation",
                   note="the invertible conv net of the BP-free case")
               for name in ("gaitprop", REFERENCE))]
    return Case("gait", "GAIT-prop on the paper's deep invertible MLP against bp, fa, tp and itp on the same net",
                ("gait-near-bp",), tuple(arms),
                design="gaitprop, bp, fa, tp and itp on --arch invertible --hidden 1024 x 6 (the paper's CIFAR-10 MLP, "
                       "on Fashion-MNIST and MNIST as the stand-in), 10 epochs on 20,000 images (the paper trains 200 "
                       f"epochs: cut to fit), {plural(seeds, 'seed')}, tuned; the paper's own Adam 1.9e-5 / orthogonality "
                       "100 as a sub-case; gaitprop and bp on the invertible conv net from the BP-free case. Verdict: holds when "
                       "gaitprop's error is within max(tolerance, 0.5 points) of BP on the same net on both data sets; "
                       "holds partly when within 2 points on one; does not hold otherwise.")


def gait_align_case(s: Mapping[str, Suite], quick: bool) -> Case:
    deep = s["deep-invertible"]
    every = ("--every", "2", "--dense-every", "1", "--dense-until", "4") if quick else \
        ("--every", "157", "--dense-every", "25", "--dense-until", "200")
    measures = tuple(Measure("align-curve", f"align-{rule}-fashion-mnist", Arm(rule, Entry(rule, "invertible"),
                                                                                deep.name, ("fashion-mnist",), 1),
                             "fashion-mnist", 0, every) for rule in ("gaitprop", "itp"))
    return Case("gait-align", "GAIT-prop's per-layer alignment with BP at depth 7, over training", ("gait-credit",), (),
                measures,
                design="gaitprop (and itp, for contrast) trained as the GAIT case's runs (seed 0, Fashion-MNIST, its "
                       "tuned learning rate), with the cosine between each of the 7 layers' update and BP's gradient "
                       "on 256 fixed training images every 25 steps for the first 200, then once per epoch. Verdict: "
                       "holds when every layer stays at cosine >= 0.9 after the first epoch; holds partly when every "
                       "layer stays >= 0.5; does not hold otherwise.")


def nan_case(s: Mapping[str, Suite], seeds: int) -> Case:
    setting = s["nan-check"]
    arms = tuple(Arm(name, Entry(name, "mlp"), setting.name, setting.datasets, seeds) for name in ("nan-bp", REFERENCE))
    measures = tuple(Measure("align-run", f"align-nan-bp-{data}", arms[0], data) for data in setting.datasets)
    return Case("nan", "NAN: the BP-equivalence check and the forgetting verdict", ("nan-equals-bp", "nan-forgets-less"),
                arms, measures,
                design="nan-bp and bp on the same MLP, data order and learning rate (Adam 1e-3, 5 epochs, MNIST and "
                       f"Fashion-MNIST, {plural(seeds, 'seed')}), with nan-bp's per-layer cosine with BP at initialisation and "
                       "after training. Verdict: holds when every test accuracy equals BP's within 0.1 points and "
                       "every cosine is >= 0.999. The forgetting verdict is read from the continual suite's "
                       "results.csv (naive fine-tuning, nan vs bp) when one exists, else from results/continual/"
                       "protocol's naive runs, else from results/continual/table.csv: the row says which.")


#: Data a claim needs that this machine may lack: supplied by the user (`localcredit datasets` says where).
EXTERNAL_DATA = ("cifar10", "svhn")


def available_data() -> set[str]:
    from ..data import describe_all

    return {info.name for info in describe_all() if info.available}


def external_case(s: Mapping[str, Suite], seeds: int, present: set[str]) -> Case:
    """Runs only on the data that is present: CIFAR-10 (the VGG and the deep invertible MLP), SVHN (the VGG)."""
    arms: list[Arm] = []
    if "cifar10" in present:
        names = ["lfnn-l", "local-random", "local-learned", "fa", "dfa", "dgl", "predsim"]
        arms += [replace(a, datasets=("cifar10",)) for a in rows_on(s["vgg"], names, ("cifar10",), seeds)]
        arms += [Arm(f"{name} [deep invertible]", Entry(name, "invertible"), "deep-invertible", ("cifar10",), seeds)
                 for name in ("gaitprop", REFERENCE)]
    if "svhn" in present:  # streamed from disk: no validation split to tune on, so each rule's default lr
        arms += [Arm(f"{name} [vgg] svhn", Entry(name, "vgg"), "vgg", ("svhn",), seeds, default_lr(Entry(name, "vgg")))
                 for name in ("local-random", "fa", REFERENCE)]
    return Case("external", "the claims on CIFAR-10, SVHN and ImageNet: run on user-supplied data when present",
                ("lfnn-cifar-imagenet", "random-cifar-svhn", "gait-imagenet"), tuple(arms),
                design="CIFAR-10 and SVHN are not on this machine by default; put them where `localcredit datasets` "
                       "says and this case trains the VGG rows (lfnn-l and the BP-free rules, local-random vs fa vs bp) "
                       "and the deep invertible MLP (gaitprop vs bp) on them, in the same settings as above. ImageNet "
                       "is out of reach of this machine: its rows always say so.")


@dataclass(frozen=True)
class ClaimsPlan:
    quick: bool
    settings: Mapping[str, Suite]
    cases: tuple[Case, ...]
    present: frozenset[str] = field(default_factory=frozenset)  # the user-supplied data found

    def case(self, name: str) -> Case:
        for case in self.cases:
            if case.name == name:
                return case
        raise UserError(f"unknown case {name!r} of suite claims; choose from {', '.join(c.name for c in self.cases)}")


def claims_plan(quick: bool = False, seeds: int | None = None, present: set[str] | None = None) -> ClaimsPlan:
    """The whole suite; ``seeds`` overrides the main rows' seeds (ablations keep one)."""
    s = quick_settings() if quick else full_settings()
    n = 1 if quick else 3
    n = seeds if seeds is not None else n
    found = available_data() & set(EXTERNAL_DATA) if present is None else present
    cases = (lfnn_case(s, n, quick), bp_free_case(s, n), fixed_random_case(s, n), memory_case(s), gait_case(s, n),
             gait_align_case(s, quick), nan_case(s, n), external_case(s, n, found))
    return ClaimsPlan(quick, s, cases, frozenset(found))


def selected(plan: ClaimsPlan, names: Sequence[str] | None) -> list[Case]:
    return [plan.case(n) for n in names] if names else list(plan.cases)
