"""The published test errors the benchmark sets our numbers beside, with where each comes from.

Data only. Every number is copied from /work/shared/METHODS.md ("Reference numbers from the field's
anchors"), which copied it from the source named in ``source`` (except where a comment names another);
a case without a reachable number has none here, and the report shows '-'. ``bp_free`` says whether the *published* training kept
the error from crossing blocks end to end (None: the source does not say).
"""

from __future__ import annotations

from dataclasses import dataclass

LOCAL_LOSS = "Nøkland & Eidnes 2019, README of anokland/local-loss"
BIOTORCH = "BioTorch Benchmarks.md (LeNet)"
LFNN_LOGS = "LFNN authors' released logs (arXiv 2310.07885)"

#: Said next to every LFNN number: the authors' other released code is not BP-free (METHODS.md).
LFNN_NOTE = ("the LFNN authors' released CIFAR-10 code (TensorFlow) applies every loss's gradient through the "
             "whole backbone, and their ImageNet 'BP-free' ResNets call backward on a sum of losses with no "
             "detach between stages: those numbers (CIFAR-10 20.95 % error; ResNet-101 78.87 % top-1) are not "
             "BP-free. The MNIST log does not say which variant it ran. Our lfnn-l detaches every block's input")


@dataclass(frozen=True)
class Published:
    """One published test error (%), its source, and whether that training was free of end-to-end BP."""

    error: float
    source: str
    bp_free: bool | None
    note: str = ""

    @property
    def bp_free_text(self) -> str:
        return {True: "yes", False: "no (end-to-end BP)", None: "not stated"}[self.bp_free]


def _local_loss(network: str, mnist: tuple[float, ...], fashion: tuple[float, ...]) -> dict:
    """local-loss's columns BP / pred / sim / predsim for one network on MNIST and Fashion-MNIST."""
    table = {}
    for data, errors in (("mnist", mnist), ("fashion-mnist", fashion)):
        for row, error in zip(("bp", "pred", "sim", "predsim"), errors):
            table[row, data] = Published(error, f"{LOCAL_LOSS}, {network}", bp_free=row != "bp")
    return table


#: local-loss (METHODS.md): MNIST with 2-pixel jitter; Fashion-MNIST with jitter and flip.
LOCAL_LOSS_MLP = _local_loss("mlp 3x1024", mnist=(0.75, 0.68, 0.80, 0.62), fashion=(8.37, 8.60, 9.70, 8.54))
LOCAL_LOSS_VGG8B = _local_loss("vgg8b", mnist=(0.26, 0.40, 0.65, 0.31), fashion=(4.53, 5.66, 5.12, 4.65))

#: BioTorch's LeNet benchmark (METHODS.md): the model with the best validation accuracy, evaluated on
#: that same 10k validation set.
BIOTORCH_LENET = {
    (row, data): Published(error, BIOTORCH, bp_free=row != "bp",
                           note="BioTorch reports its best-validation model, evaluated on that same validation set")
    for data, errors in (("mnist", (0.91, 1.7, 1.61)), ("fashion-mnist", (9.2, 13.06, 12.81)))
    for row, error in zip(("bp", "fa", "dfa"), errors)
}

#: BioTorch's sign-concordant rows (LeNet, Fashion-MNIST), from the README table of github.com/jsalbert/biotorch as
#: issue 30 quotes it (not in METHODS.md, whose BioTorch numbers come from its Benchmarks.md; that README's BP,
#: FA and DFA of the same table: 8.88, 12.77, 12.76).
BIOTORCH_README = "BioTorch README (LeNet), as quoted in issue 30"
BIOTORCH_SIGN = {
    (row, "fashion-mnist"): Published(error, BIOTORCH_README, bp_free=True,
                                      note="BioTorch reports its best-validation model, evaluated on that same "
                                           "validation set")
    for row, error in (("usf", 9.22), ("brsf", 9.31), ("frsf", 9.27))
}

#: The LFNN MNIST MLP (784-256-128, 32 workers, delta 0.7, Adam 5e-4, batch 128, 50 epochs).
LFNN_MNIST = {("lfnn-l", "mnist"): Published(1.20, f"{LFNN_LOGS}, MLP 784-256-128, 50 epochs", bp_free=None,
                                             note=LFNN_NOTE)}


# ----- continual learning: split MNIST (``localcredit bench --suite continual``) -------------------------
# Copied from the research note on published continual-learning numbers (issue 27). Every number here was
# read only in a third-party text that quotes the paper, never in the paper itself: each source says so.
VDV_2019 = "van de Ven & Tolias 2019, arXiv 1904.07734, split MNIST Table 4, mean of 20 seeds"
VDV_2022 = "van de Ven, Tuytelaars & Tolias 2022, Nat. Mach. Intell. 4:1185, split MNIST Table 2"
VDV_2019_QUOTED = f"{VDV_2019}, as quoted by third-party notes of the paper"
VDV_2019_ROUNDED = f"{VDV_2019}, to one decimal as quoted by third-party study notes"
VDV_2022_QUOTED = f"{VDV_2022}, as quoted by a third-party lab log"

#: How their protocol differs from the suite's, shown under the tables.
CONTINUAL_NOTE = (
    "Their network and recipe are the full suite's (784-400-400 MLP, ReLU, Adam 1e-3, batch 128, 2000 iterations per "
    "task, 5 tasks), with these differences: they assign the digits to the tasks at random per seed (ours: 0-1, "
    "2-3, 4-5, 6-7, 8-9 for every seed); they report the mean ± s.e.m. over 20 seeds (ours: mean ± std); the 2022 "
    "ER and A-GEM store 100 samples per class, as ours do (1000 in all); the 2019 paper has no ER or A-GEM rows; "
    "their joint baseline ('Offline' in 2019) trains on every task so far, like ours. None of these numbers was "
    "checked against the paper itself")


@dataclass(frozen=True)
class PublishedAccuracy:
    """One published average test accuracy (%) over all tasks after the last one, and its source."""

    accuracy: float
    source: str
    digits: int = 2  # decimals the source gives

    @property
    def text(self) -> str:
        return f"{self.accuracy:.{self.digits}f}"


def _split_mnist_2019() -> dict[tuple[str, str], PublishedAccuracy]:
    """Table 4 of 2019 by our strategy names: Task-IL / Domain-IL / Class-IL, and how precisely each was quoted."""
    exact = {"naive": (87.19, 59.21, 19.90), "joint": (99.66, 98.42, 97.94)}  # None, Offline
    rounded = {"ewc": (98.6, 64.0, 20.01), "online-ewc": (99.1, 64.3, 19.96), "si": (99.1, 65.4, 19.99),
               "lwf": (99.6, 71.5, 23.85)}  # Task-IL and Domain-IL to one decimal; Class-IL to two
    table = {}
    for strategy, accuracies in {**exact, **rounded}.items():
        for scenario, accuracy in zip(("split-task", "split-domain", "split-class"), accuracies):
            one_decimal = strategy in rounded and scenario != "split-class"
            table[strategy, scenario] = PublishedAccuracy(accuracy, VDV_2019_ROUNDED if one_decimal else VDV_2019_QUOTED,
                                                          digits=1 if one_decimal else 2)
    return table


#: Class-IL only: the Task-IL and Domain-IL columns of the 2022 Table 2 were not found.
_SPLIT_MNIST_2022 = {(strategy, "split-class"): PublishedAccuracy(accuracy, VDV_2022_QUOTED)
                     for strategy, accuracy in (("joint", 98.17), ("ewc", 20.64), ("si", 21.20), ("lwf", 21.89),
                                                ("agem", 65.10), ("replay", 88.79))}

#: BP on van de Ven's split-MNIST MLP: (strategy, scenario) -> the published accuracies, oldest first.
SPLIT_MNIST_BP: dict[tuple[str, str], tuple[PublishedAccuracy, ...]] = {
    key: tuple(table[key] for table in (_split_mnist_2019(), _SPLIT_MNIST_2022) if key in table)
    for key in {**_split_mnist_2019(), **_SPLIT_MNIST_2022}
}


# ----- modules: InfoPro's CIFAR-10 table (``localcredit bench --suite modules``) -------------------------
INFOPRO = ("Wang, Ni, Song, Yang & Huang 2021, 'Revisiting locally supervised learning', ICLR, CIFAR-10 ResNet-110 "
           "test errors (as METHODS.md copies InfoPro's table)")
#: Said under the table: their training and their K differ from ours.
INFOPRO_NOTE = ("CIFAR-10, ResNet-110 (a stem and 54 residual units), 160 epochs of SGD (Nesterov momentum 0.9, weight "
                "decay 1e-4, batch 1024, learning rate 0.8, 10 warm-up epochs then cosine), crop and flip (their "
                "code's train.py): another data set, network and recipe, shown for the shape of error against K. Their "
                "K modules end with the network's classifier: the last module learns end to end through it, so K = 1 "
                "is end-to-end training. Here infopro does the same; the other local rules' last module learns from "
                "its own loss and the head on its detached output. Their DGL rows are DGL as they re-implemented it")

#: (row, K) -> the published test error; row "bp" is end-to-end training (K = 1).
INFOPRO_CIFAR10: dict[tuple[str, int], Published] = {
    ("bp", 1): Published(6.50, INFOPRO, bp_free=False),
    ("infopro", 2): Published(6.41, INFOPRO, bp_free=None, note="gradient-isolated between modules, BP inside them"),
    **{("dgl", k): Published(error, INFOPRO, bp_free=None, note="gradient-isolated between modules, BP inside them")
       for k, error in ((2, 7.70), (4, 10.50), (8, 12.46), (16, 13.80))},
}


# ----- the seed papers' claims (``localcredit bench --suite claims``, issue 28) --------------------------
SEED_000 = "seed abstract 000: Moakhar et al. 2023, arXiv 2310.09952 (only the abstract is reachable)"
SEED_001 = "seed abstract 001: Yin et al. 2023, arXiv 2310.07885"
SEED_002 = "seed abstract 002: Mostafa, Ramesh & Cauwenberghs 2018 (the paper's tables were not reachable)"
SEED_003 = "seed abstract 003: Dalm, Ahmad, Ambrogioni & van Gerven, arXiv 2102.11598 (TMLR 2023)"


@dataclass(frozen=True)
class PublishedClaim:
    """What a seed paper says about one claim: its figure (words where it gives none) and where it says so."""

    figure: str
    source: str


SEED_CLAIMS = {
    "lfnn-matches-bp": PublishedClaim(
        "1.20 % test error (LFNN-l as the abstract names it; the log does not say lfnn-l or lfnn, nor final or "
        "best epoch; no BP figure for this net)",
        f"{LFNN_LOGS}, MLP 784-256-128, 32 workers, delta 0.7, Adam 5e-4, batch 128, 50 epochs (METHODS.md)"),
    "lfnn-beats-bp-free": PublishedClaim(
        "'significantly lower error rates than previous BP-free algorithms on MNIST' (no per-rule figure reachable)",
        SEED_001),
    "lfnn-cifar-imagenet": PublishedClaim(
        "CIFAR-10 conv 64/128/256: 20.95 % error; ImageNet ResNet-101: 78.87 % top-1 as quoted; both from code "
        "that is not BP-free (METHODS.md)", f"{SEED_001}; {LFNN_LOGS}"),
    "random-beats-fa": PublishedClaim(
        "fixed random classifiers 'outperform feedback alignment on MNIST, CIFAR10 and SVHN, approaching the "
        "performance of standard backpropagation' (figures not reachable)", SEED_002),
    "random-memory": PublishedClaim(
        "'drastically reduce memory traffic and data communication overheads' in custom hardware (no figure)",
        SEED_002),
    "random-cifar-svhn": PublishedClaim(
        "the same comparison on CIFAR-10 and SVHN (figures not reachable)", SEED_002),
    "gait-near-bp": PublishedClaim(
        "MNIST / Fashion-MNIST / KMNIST indistinguishable from BP; deep MLPs (input -> 1024, five square 1024 "
        "layers) stable and near BP with adaptive gamma (figures not reachable here)",
        f"{SEED_003}; Ahmad et al. NeurIPS 2020 (METHODS.md section 003)"),
    "gait-credit": PublishedClaim(
        "'effective multi-layer credit assignment in deeper networks' (no per-layer figure reachable)", SEED_003),
    "gait-imagenet": PublishedClaim(
        "CIFAR-10 deep MLPs and ImageNet with invertible conv nets (figures not reachable)", SEED_003),
    "nan-equals-bp": PublishedClaim(
        "'conditions under which the derived strategy is equivalent to error-backpropagation' (a theorem)", SEED_000),
    "nan-forgets-less": PublishedClaim(
        "'superior performance relative to error-backpropagation in a catastrophic forgetting benchmark' "
        "(no figure reachable)", SEED_000),
}
