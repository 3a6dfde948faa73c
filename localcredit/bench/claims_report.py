"""The outputs of the claims suite: RESULTS.md (a verdict per claim, then each case's tables, plots and
commands), results.csv (one row per run), verdicts.csv and one PNG per case.

Everything is read back from the run folders and measurement files, so the report can be rebuilt at
any time, and cases run at different times (``--cases``) join one report; a case not run yet has its
rows marked so, with the command that runs it.

**Verdicts.** Errors are test errors in %, mean ± sample std over seeds. Two figures differ when their
means differ by more than the *tolerance*: twice the standard error of the difference (sqrt(s_a^2/n_a +
s_b^2/n_b)), and never less than 0.05 points; a published figure counts as exact. Each case's rule
from its figures to "holds", "holds partly", "does not hold" is written in its design (claims_suite).
"""

from __future__ import annotations

import csv
import datetime
import json
import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator, ScalarFormatter  # noqa: E402

from .claims_suite import (  # noqa: E402
    CLAIMS,
    LFNN_AUTHORS,
    NOT_BP_FREE,
    TIMING,
    Arm,
    Case,
    ClaimRun,
    ClaimsPlan,
    claims_plan,
    command_text,
    final_runs,
    grid_of,
    tune_run,
    tuning_keys,
)
from .plan import REFERENCE, read_result  # noqa: E402
from .published import SEED_CLAIMS  # noqa: E402
from .report import machine_description, write_csv  # noqa: E402

MIN_TOLERANCE = 0.05  # points of test error
HOLDS, PARTLY, NOT, UNTESTABLE, NOT_RUN = "holds", "holds partly", "does not hold", "cannot be tested here", "not run"
#: Where the continual suite's results.csv may be (bench/continual_report.py writes it), first found wins.
CONTINUAL_RESULTS = (Path("runs/bench/continual/results.csv"), Path("results/bench-continual/results.csv"),
                     Path("results/continual/results.csv"))
CONTINUAL_PROTOCOL = Path("results/continual/protocol")
CONTINUAL_TABLE = Path("results/continual/table.csv")


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


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(row) + " |" for row in rows)]


def data_title(data: str) -> str:
    return {"mnist": "MNIST", "fashion-mnist": "Fashion-MNIST", "cifar10": "CIFAR-10", "svhn": "SVHN"}.get(data, data)


def arm_rows(ctx: Context, arms: Sequence[Arm], best: bool = True) -> list[list[str]]:
    rows = []
    for arm in arms:
        for data in arm.datasets:
            st = ctx.stats(arm, data)
            rows.append([f"`{arm.label}`", data_title(data), str(arm.seeds), "-" if st.lr is None else f"{st.lr:.3g}",
                         cell(st), *([cell(st, best=True)] if best else []), arm.note or arm.role])
    return rows


ARM_HEADER = ["row", "data", "seeds", "lr", "final-epoch test error %", "best-epoch test error % (epoch)", "what it is"]


def plot_curves(report: CaseReport, path: Path, panels: Sequence[tuple[str, Sequence[tuple[str, Stats, str]]]],
                title: str) -> None:
    """One axes per panel (a network and data set), every row's mean test error per epoch on it; no file
    while no run has finished."""
    panels = [(name, [line for line in lines if line[1].curves]) for name, lines in panels]
    panels = [panel for panel in panels if panel[1]]
    if not panels:
        path.unlink(missing_ok=True)
        return
    columns = min(2, len(panels))
    rows = -(-len(panels) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(7.5 * columns, 5.2 * rows), squeeze=False)
    cmap = plt.get_cmap("tab20")
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, (name, lines) in zip(axes.flat, panels):
        for i, (label, st, style) in enumerate(lines):
            length = min(len(c) for c in st.curves)
            mean = [statistics.mean(c[e] for c in st.curves) for e in range(length)]
            colour = "black" if style.startswith("k") else cmap([*range(0, 20, 2), *range(1, 20, 2)][i % 20])
            ax.plot(range(1, length + 1), mean, style.lstrip("k"), color=colour, label=label,
                    marker="o" if length < 15 else None, markersize=3)
        ax.set_title(name)
        ax.set_xlabel("epoch")
        ax.set_ylabel("test error % (mean over seeds)")
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_minor_formatter(ScalarFormatter())
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize="x-small", ncols=2)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    report.plots.append(path.name)


def commands(ctx: Context, arms: Sequence[Arm]) -> list[str]:
    """Each row's command, seed 0 (the others differ in --seed and --out only)."""
    lines = []
    for arm in arms:
        for data in arm.datasets:
            st = ctx.stats(arm, data)
            if st.command:
                lines.append(f"- `{arm.label}` ({data_title(data)}, {seeds_text(arm.seeds)}): `{st.command}`")
    return lines


def ablation_sentence(values: dict[str, float], target: float) -> str:
    if not values:
        return ""
    label, value = min(values.items(), key=lambda kv: kv[1])
    return f"the lowest error of any row or sub-case was {label} at {value:.2f} % (target {target:.2f} %)"


# ----- case: LFNN -------------------------------------------------------------------------------------
def analyse_lfnn(ctx: Context, case: Case) -> CaseReport:
    report = CaseReport()
    main = {a.label: a for a in case.arms if a.role == "main"}
    st = {label: ctx.stats(arm, "mnist") for label, arm in main.items()}
    ablations = [a for a in case.arms if a.role == "ablation"]
    published = 1.20
    report.lines += table(ARM_HEADER, arm_rows(ctx, case.arms))
    falls = [[f"`{arm.label}`", *fall_cells(ctx.stats(arm, "fashion-mnist"))]
             for arm in ablations if "fashion-mnist" in arm.datasets]
    if falls:
        report.lines += ["", "Epoch-to-epoch changes of the test error on Fashion-MNIST (the authors' setting):", "",
                         *table(["row", "epochs whose error rose > 0.5 points", "largest rise (points)",
                                 "mean |change| over the second half (points)"], falls)]
    readouts = [m for m in case.measures if m.kind == "readout"]
    rows = []
    for m in readouts:
        got = ctx.measure(case, m.name)
        if got:
            rows.append([f"`{m.arm.label}` seed {m.seed}", f"{100 * (1 - got['head']):.2f}",
                         " / ".join(f"{100 * (1 - a):.2f}" for a in got["workers_mean_logits"]),
                         " / ".join(f"{100 * (1 - a):.2f}" for a in got["workers_mean_probabilities"])])
    if rows:
        report.lines += ["", "Where the prediction is read from (test error %, final weights): the head `train` reports, "
                             "or the mean of each hidden block's 32 workers (block 1 / block 2):", "",
                         *table(["run", "head", "workers' mean logits", "workers' mean probabilities"], rows)]
    panels = [("MNIST (authors' setting)", [(a.label, ctx.stats(a, "mnist"), "-" if a.role == "main" else "--")
                                            for a in case.arms if "mnist" in a.datasets]),
              ("Fashion-MNIST", [(a.label, ctx.stats(a, "fashion-mnist"), "-")
                                 for a in case.arms if "fashion-mnist" in a.datasets])]
    plot_curves(report, ctx.out / f"{case.name}.png", panels,
                "LFNN, the authors' MNIST setting (784-256-128, Adam 5e-4, 50 epochs)")
    report.lines += ["", "Commands:", "", *commands(ctx, case.arms)]

    l, g, b = st.get("lfnn-l", Stats()), st.get("lfnn", Stats()), st.get("bp", Stats())
    if not (l.done and b.done):
        report.verdicts["lfnn-matches-bp"] = not_run(ctx, case)
        return report
    reach = l.mean <= published + tolerance(l.final)
    near_bp = compare(l.final, b.final) <= 0
    candidates = {"lfnn-l (final)": l.mean, "lfnn-l (best epoch)": statistics.mean(l.best)}
    if g.final:
        candidates.update({"lfnn (final)": g.mean, "lfnn (best epoch)": statistics.mean(g.best)})
    for arm in ablations:
        if "mnist" in arm.datasets:
            a = ctx.stats(arm, "mnist")
            if a.final:
                candidates[f"{arm.label} (final)"] = a.mean
                candidates[f"{arm.label} (best epoch)"] = statistics.mean(a.best)
    for rule in ("lfnn-l", "lfnn"):  # the same trained networks read from a block's workers instead of the head
        reads = [ctx.measure(case, m.name) for m in readouts if m.arm.label == rule]
        found = [read for read in reads if read]
        for block in range(len(found[0]["workers_mean_probabilities"]) if found else 0):
            candidates[f"{rule} read from block {block + 1}'s workers"] = statistics.mean(
                100 * (1 - read["workers_mean_probabilities"][block]) for read in found)
    others_reach = any(v <= published + MIN_TOLERANCE for k, v in candidates.items() if k != "lfnn-l (final)")
    verdict = HOLDS if reach else PARTLY if near_bp or others_reach else NOT
    ours = (f"lfnn-l {fmt(l.final)} final, {fmt(l.best)} best epoch; lfnn {fmt(g.final)} final, {fmt(g.best)} best "
            f"epoch ({seeds_text(len(l.final))})")
    evidence = (f"lfnn-l ends {l.mean - published:+.2f} points from the published {published:.2f} % and "
                f"{l.mean - b.mean:+.2f} from BP on the same net and recipe ({fmt(b.final)} %); "
                f"{ablation_sentence(candidates, published)}.")
    report.verdicts["lfnn-matches-bp"] = Verdict(ours, f"{fmt(b.final)} final, {fmt(b.best)} best epoch", verdict,
                                                 evidence, l.command)
    return report


def fall_cells(st: Stats) -> list[str]:
    if not st.curves:
        return ["not run", "-", "-"]
    rises, largest, half = [], [], []
    for curve in st.curves:
        changes = [b - a for a, b in zip(curve, curve[1:])]
        rises.append(sum(c > 0.5 for c in changes))
        largest.append(max([0.0, *changes]))
        tail = changes[len(changes) // 2:]
        half.append(statistics.mean(abs(c) for c in tail) if tail else 0.0)
    return [fmt(rises, 0), fmt(largest), fmt(half)]


# ----- cases: BP-free comparison and fixed random classifiers ------------------------------------------
def row_name(arm: Arm, ctx: Context) -> str:
    """A rule's row across networks: the rule (and variant), '[invertible]' where it trains its own network."""
    setting = ctx.plan.settings[arm.setting]
    name = "local-random layerwise" if arm.entry.variant == "local-random-layerwise" else arm.entry.variant or arm.entry.rule
    return name if arm.entry.arch == setting.arch else f"{name} [invertible net]"


def grid(ctx: Context, arms: Sequence[Arm], columns: Sequence[tuple[str, str]]) -> dict[tuple[str, str, str], Stats]:
    """(row name, setting, data) -> Stats of the arms on those settings and data sets."""
    cells = {}
    for arm in arms:
        for setting, data in columns:
            if arm.setting == setting and data in arm.datasets:
                cells[row_name(arm, ctx), setting, data] = ctx.stats(arm, data)
    return cells


def column_title(ctx: Context, setting: str, data: str) -> str:
    return f"{setting.upper() if setting in ('mlp', 'vgg') else setting} {data_title(data)}"


def grid_table(ctx: Context, cells: dict, columns: Sequence[tuple[str, str]]) -> list[str]:
    names = list(dict.fromkeys(key[0] for key in cells))
    rows = []
    for name in names:
        row = [f"`{name}`"]
        for setting, data in columns:
            st = cells.get((name, setting, data))
            row.append("-" if st is None else cell(st) + (f" [lr {st.lr:.3g}]" if st.lr else ""))
        rows.append(row)
    return table(["row", *(column_title(ctx, s, d) + " error %" for s, d in columns)], rows)


def analyse_bp_free(ctx: Context, case: Case) -> CaseReport:
    report = CaseReport()
    columns = [(s, d) for s in ("mlp", "vgg") for d in ("mnist", "fashion-mnist")]
    cells = grid(ctx, case.arms, columns)
    report.lines += grid_table(ctx, cells, columns)
    panels = [(column_title(ctx, s, d), [(name, st, "-" if not name.startswith(REFERENCE) else
                                          "k--" if name == REFERENCE else "k:")
                                          for (name, s2, d2), st in cells.items() if (s2, d2) == (s, d)])
              for s, d in columns]
    plot_curves(report, ctx.out / f"{case.name}.png", panels,
                "LFNN-l against every BP-free rule (mean test error per epoch)")
    report.lines += ["", "Commands:", "", *commands(ctx, [a for a in case.arms if "mnist" in a.datasets])]

    ranks, evidence, ours, bp = [], [], [], []
    complete = True
    for setting in ("mlp", "vgg"):
        mine = cells.get(("lfnn-l", setting, "mnist"))
        others = {name: st for (name, s, d), st in cells.items()
                  if s == setting and d == "mnist" and name != "lfnn-l" and name.split(" ")[0] not in NOT_BP_FREE}
        reference = next((st for (name, s, d), st in cells.items() if s == setting and d == "mnist" and name == REFERENCE),
                         None)
        if mine is None or not mine.done or not all(st.done for st in others.values()):
            complete = False
            continue
        better = [name for name, st in others.items() if compare(st.final, mine.final) < 0]
        ties = [name for name, st in others.items() if compare(st.final, mine.final) == 0]
        order = sorted([*others.values(), mine], key=lambda st: st.mean)
        ranks.append((setting, better, ties))
        best_other = min(others.items(), key=lambda kv: kv[1].mean)
        ours.append(f"{setting.upper()} {fmt(mine.final)} (rank {order.index(mine) + 1} of {len(order)})")
        bp.append(f"{setting.upper()} {fmt(reference.final) if reference else '-'}")
        evidence.append(f"on the {setting.upper()} {len(better)} of {len(others)} BP-free rules beat lfnn-l beyond the "
                        f"tolerance and {len(ties)} tie (best: {best_other[0]} {best_other[1].mean:.2f} %)")
    if not complete:
        report.verdicts["lfnn-beats-bp-free"] = not_run(ctx, case)
        return report
    beats_all = all(not better and not ties for _, better, ties in ranks)
    best_somewhere = any(not better for _, better, _ in ranks)
    verdict = HOLDS if beats_all else PARTLY if best_somewhere else NOT
    report.verdicts["lfnn-beats-bp-free"] = Verdict(
        "lfnn-l MNIST error %: " + "; ".join(ours), "; ".join(bp), verdict,
        "On MNIST, " + "; ".join(evidence) + ".", cells[("lfnn-l", "mlp", "mnist")].command)
    return report


FIXED_RANDOM_ROWS = ("local-random", "local-random layerwise", "local-learned", "fa", REFERENCE)


def analyse_fixed_random(ctx: Context, case: Case) -> CaseReport:
    report = CaseReport()
    columns = [(s, d) for s in ("mlp", "vgg") for d in ("mnist", "fashion-mnist")]
    cells = grid(ctx, case.arms, columns)
    report.lines += grid_table(ctx, cells, columns)
    summary, mnist_outcomes, closer, gaps = [], [], [], {}
    complete = True
    for setting, data in columns:
        lr_, fa, bp = (cells.get((n, setting, data)) for n in ("local-random", "fa", REFERENCE))
        if lr_ is None or fa is None or bp is None or not (lr_.done and fa.done and bp.done):
            complete = complete and data != "mnist"
            summary.append([column_title(ctx, setting, data), "not run", "-", "-"])
            continue
        outcome = compare(lr_.final, fa.final)
        word = {-1: "beats FA", 0: "ties FA", 1: "loses to FA"}[outcome]
        gap_lr, gap_fa = lr_.mean - bp.mean, fa.mean - bp.mean
        gaps[setting, data] = gap_lr
        summary.append([column_title(ctx, setting, data), f"{lr_.mean - fa.mean:+.2f} ({word})", f"{gap_lr:+.2f}",
                        f"{gap_fa:+.2f}"])
        if data == "mnist":
            mnist_outcomes.append((setting, outcome))
            closer.append(gap_lr < gap_fa)
    report.lines += ["", *table(["network, data", "local-random − fa (points)", "local-random − bp", "fa − bp"],
                                summary)]
    panels = [(column_title(ctx, s, d), [(name, st, "-") for (name, s2, d2), st in cells.items() if (s2, d2) == (s, d)])
              for s, d in columns]
    plot_curves(report, ctx.out / f"{case.name}.png", panels,
                "Fixed random classifiers vs FA vs BP (mean test error per epoch)")
    report.lines += ["", "Commands:", "", *commands(ctx, case.arms)]
    if not complete or not mnist_outcomes:
        report.verdicts["random-beats-fa"] = not_run(ctx, case)
        return report
    wins = [s for s, o in mnist_outcomes if o < 0]
    verdict = (HOLDS if len(wins) == len(mnist_outcomes) and all(closer) else
               NOT if all(o > 0 for _, o in mnist_outcomes) else PARTLY)
    widen = [f"{s.upper()} {gaps[s, 'mnist']:+.2f} -> {gaps[s, 'fashion-mnist']:+.2f}" for s in ("mlp", "vgg")
             if (s, "mnist") in gaps and (s, "fashion-mnist") in gaps]
    ours = "; ".join(f"{s.upper()} MNIST local-random {fmt(cells[('local-random', s, 'mnist')].final)} vs fa "
                     f"{fmt(cells[('fa', s, 'mnist')].final)}" for s, _ in mnist_outcomes)
    bp_text = "; ".join(f"{s.upper()} {fmt(cells[(REFERENCE, s, 'mnist')].final)}" for s, _ in mnist_outcomes)
    evidence = (f"local-random beats FA beyond the tolerance on {len(wins)} of {len(mnist_outcomes)} MNIST networks "
                f"and ends closer to BP than FA on {sum(closer)}" +
                (f"; its gap to BP from MNIST to Fashion-MNIST: {', '.join(widen)} points" if widen else "") + ".")
    report.verdicts["random-beats-fa"] = Verdict(ours, bp_text, verdict, evidence,
                                                 cells[("local-random", "mlp", "mnist")].command)
    return report


# ----- case: memory ----------------------------------------------------------------------------------
MEMORY_FIGURES = (("step_memory_mb", "step memory MB"), ("credit_bytes_moved_mb", "bytes moved MB (credit)"),
                  ("credit_weight_bytes_read_mb", "weight bytes read MB"), ("saved_activations_mb",
                                                                            "activations kept for backward MB"),
                  ("optimizer_bytes_moved_mb", "optimiser bytes moved MB"))


def analyse_memory(ctx: Context, case: Case) -> CaseReport:
    report = CaseReport()
    ratios: dict[tuple[str, str], dict[str, float]] = {}
    for setting in dict.fromkeys(m.arm.setting for m in case.measures):
        found = {m.arm.label: ctx.measure(case, m.name) for m in case.measures if m.arm.setting == setting}
        bp = found.get(REFERENCE)
        rows = []
        for label, got in found.items():
            if got is None:
                rows.append([f"`{label}`", *(["not run"] * len(MEMORY_FIGURES))])
                continue
            cells = []
            for key, _ in MEMORY_FIGURES:
                ratio = got[key] / bp[key] if bp and bp.get(key) else None
                if ratio is not None:
                    ratios.setdefault((setting, label), {})[key] = ratio
                cells.append(f"{got[key]:.2f}" + (f" ({ratio:.2f}x)" if ratio is not None else ""))
            rows.append([f"`{label}`", *cells])
        report.lines += [f"{setting.upper()}, batch 128, one step after warm-up (ratio to BP in brackets):", "",
                         *table(["rule", *(title for _, title in MEMORY_FIGURES)], rows), ""]
    report.lines += ["`local-random-layerwise` is measured in its first phase (block 1 trains, the others wait), the "
                     "phase its run starts in.", "",
                     "Bytes moved: every aten operation's inputs read and outputs written at their tensors' sizes "
                     "(views move nothing), the forward pass and the learning signals; the optimiser's update (the "
                     "same Adam for every rule) apart. An upper bound on DRAM traffic that sees no on-chip reuse: the "
                     "paper's argument (a layer's error is there as soon as its output is, so its activations need "
                     "not wait in memory for a backward pass) shows in the step memory, not in this count."]
    needed = [(setting, "local-random") for setting in ("mlp", "vgg")]
    if not all(key in ratios and "step_memory_mb" in ratios[key] for key in needed):
        report.verdicts["random-memory"] = not_run(ctx, case)
        return report
    memory = {s: ratios[s, "local-random"]["step_memory_mb"] for s, _ in needed}
    traffic = {s: ratios[s, "local-random"]["credit_bytes_moved_mb"] for s, _ in needed}
    both = all(v <= 0.5 for v in [*memory.values(), *traffic.values()])
    some = any(v <= 0.5 for v in [*memory.values(), *traffic.values()])
    verdict = HOLDS if both else PARTLY if some else NOT
    ours = "; ".join(f"{s.upper()} step memory {memory[s]:.2f}x, bytes moved {traffic[s]:.2f}x BP" for s in memory)
    evidence = (f"local-random's step memory is {min(memory.values()):.2f}-{max(memory.values()):.2f}x BP's and its "
                f"traffic {min(traffic.values()):.2f}-{max(traffic.values()):.2f}x (MLP, VGG; 'drastically' read as "
                f"at most half).")
    report.verdicts["random-memory"] = Verdict(ours, "1.00x (the reference)", verdict, evidence,
                                               memory_command(ctx, case))
    return report


def memory_command(ctx: Context, case: Case) -> str:
    got = next((m for m in case.measures if m.arm.label == "local-random" and m.arm.setting == "vgg"), None)
    log = got.file(ctx.out, case.name).with_suffix(".log") if got else None
    if log is None or not log.exists():
        return ""
    return "python -m localcredit.bench.claims_measure " + log.read_text().splitlines()[0].split("claims_measure ", 1)[-1]


# ----- cases: GAIT-prop --------------------------------------------------------------------------------
def analyse_gait(ctx: Context, case: Case) -> CaseReport:
    report = CaseReport()
    report.lines += table(ARM_HEADER, arm_rows(ctx, case.arms))
    datasets = list(dict.fromkeys(d for a in case.arms for d in a.datasets))
    panels = [(data_title(d), [(a.label, ctx.stats(a, d), "-" if a.role == "main" else "--")
                               for a in case.arms if d in a.datasets]) for d in datasets]
    plot_curves(report, ctx.out / f"{case.name}.png", panels,
                "GAIT-prop on the deep invertible MLP (1024 x 6) and the invertible conv net")
    report.lines += ["", "Commands:", "", *commands(ctx, case.arms)]
    main = {a.entry.rule: a for a in case.arms if a.role == "main"}
    deep = ctx.plan.settings[main["gaitprop"].setting]
    gaps, texts, bp_texts, others = [], [], [], []
    for data in deep.datasets:
        g, b = ctx.stats(main["gaitprop"], data), ctx.stats(main[REFERENCE], data)
        if not (g.done and b.done):
            report.verdicts["gait-near-bp"] = not_run(ctx, case)
            return report
        gap = g.mean - b.mean
        gaps.append((gap, tolerance(g.final, b.final)))
        texts.append(f"{data_title(data)} {fmt(g.final)}")
        bp_texts.append(f"{data_title(data)} {fmt(b.final)}")
        rest = [f"{name} {ctx.stats(main[name], data).mean:.2f}" for name in ("tp", "itp", "fa")
                if name in main and ctx.stats(main[name], data).final]
        others.append(f"{data_title(data)}: gaitprop {gap:+.2f} points from BP ({', '.join(rest)})")
    near = all(gap <= max(t, 0.5) for gap, t in gaps)
    verdict = HOLDS if near else PARTLY if any(gap <= 2.0 for gap, _ in gaps) else NOT
    conv = {a.entry.rule: a for a in case.arms if a.entry.arch == "invertible-conv"}
    conv_text = ""
    if "gaitprop" in conv and REFERENCE in conv:
        g, b = ctx.stats(conv["gaitprop"], "fashion-mnist"), ctx.stats(conv[REFERENCE], "fashion-mnist")
        if g.final and b.final:
            conv_text = f"; on the invertible conv net (Fashion-MNIST) {g.mean - b.mean:+.2f}"
    report.verdicts["gait-near-bp"] = Verdict(
        f"gaitprop [deep invertible] {'; '.join(texts)}", "; ".join(bp_texts), verdict,
        f"At depth 7, {'; '.join(others)}{conv_text} (trained {deep.epochs} epochs on "
        f"{deep.limit_train or 'all':,} images: cut from the paper's 200).",
        ctx.stats(main["gaitprop"], deep.datasets[0]).command)
    return report


def analyse_gait_align(ctx: Context, case: Case) -> CaseReport:
    report = CaseReport()
    curves = {m.arm.entry.rule: ctx.measure(case, m.name) for m in case.measures}
    drawn = {rule: got for rule, got in curves.items() if got}
    for rule, got in drawn.items():
        rows = [[str(p["step"]), f"{p['epoch']:.2f}", " / ".join(f"{c:.4f}" for c in p["cosine"])] for p in got["curve"]]
        report.lines += [f"`{rule}` on the deep invertible MLP ({got['data']}, lr {got['lr']}, seed {got['seed']}; "
                         f"test accuracy at the end {100 * got['test_accuracy']:.2f} %): cosine with BP per layer "
                         "(1 ... 7):", "", *table(["step", "epoch", "cosine per layer"], rows), ""]
    path = ctx.out / f"{case.name}.png"
    path.unlink(missing_ok=True)
    if drawn:
        fig, ax = plt.subplots(figsize=(8, 4.8))
        for style, (rule, got) in zip(("-", "--", ":"), drawn.items()):
            steps = [p["step"] for p in got["curve"]]
            layers = len(got["curve"][0]["cosine"])
            for l in range(layers):
                ax.plot(steps, [p["cosine"][l] for p in got["curve"]], style,
                        color=plt.get_cmap("viridis")(l / max(1, layers - 1)), label=f"{rule} layer {l + 1}")
        ax.set_xlabel("training step")
        ax.set_ylabel("cosine with BP's gradient")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="x-small", ncols=2)
        ax.set_title("Alignment with BP per layer over training, depth 7")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        report.plots.append(path.name)
    gait = drawn.get("gaitprop")
    if not gait:
        report.verdicts["gait-credit"] = not_run(ctx, case)
        return report

    def after_first_epoch(curve: dict) -> list[float]:
        points = [p for p in curve["curve"] if p["epoch"] >= 1] or curve["curve"][-1:]
        return [min(p["cosine"][l] for p in points) for l in range(len(points[0]["cosine"]))]

    lows = after_first_epoch(gait)
    verdict = HOLDS if min(lows) >= 0.9 else PARTLY if min(lows) >= 0.5 else NOT
    itp = drawn.get("itp")
    contrast = f"; itp's: {' / '.join(f'{c:.3f}' for c in after_first_epoch(itp))}" if itp else ""
    report.verdicts["gait-credit"] = Verdict(
        "gaitprop, lowest cosine with BP per layer after epoch 1: " + " / ".join(f"{c:.3f}" for c in lows),
        "1 (the reference)", verdict,
        f"Over {gait['steps']} steps at depth 7 every layer's update stays at cosine >= {min(lows):.3f} with BP after "
        f"the first epoch{contrast}.", measure_command(ctx, case, "gaitprop"))
    return report


def measure_command(ctx: Context, case: Case, rule: str) -> str:
    """The command line of a case's measurement of ``rule``, as its log recorded it."""
    m = next((m for m in case.measures if m.arm.entry.rule == rule), None)
    log = m.file(ctx.out, case.name).with_suffix(".log") if m else None
    if log is None or not log.exists():
        return ""
    return "python -m localcredit.bench.claims_measure " + log.read_text().splitlines()[0].split("claims_measure ", 1)[-1]


# ----- case: NAN -----------------------------------------------------------------------------------------
def analyse_nan(ctx: Context, case: Case) -> CaseReport:
    report = CaseReport()
    arms = {a.entry.rule: a for a in case.arms}
    report.lines += table(ARM_HEADER, arm_rows(ctx, case.arms))
    rows, diffs, cosines = [], [], []
    complete = True
    for data in arms[REFERENCE].datasets:
        n, b = ctx.stats(arms["nan-bp"], data), ctx.stats(arms[REFERENCE], data)
        if not (n.done and b.done):
            complete = False
            continue
        for seed, (x, y) in enumerate(zip(n.final, b.final)):
            diffs.append(abs(x - y))
            rows.append([data_title(data), str(seed), f"{100 - y:.2f}", f"{100 - x:.2f}", f"{x - y:+.3f}"])
    report.lines += ["", "Test accuracy %, final epoch:", "",
                     *table(["data", "seed", "bp", "nan-bp", "nan-bp − bp error (points)"], rows)]
    for m in case.measures:
        got = ctx.measure(case, m.name)
        if got:
            cosines += [*got["init"], *got["final"]]
            report.lines += ["", f"nan-bp's cosine with BP per layer ({data_title(m.data)}, seed {m.seed}): at "
                                 f"initialisation {' / '.join(f'{c:.6f}' for c in got['init'])}; trained "
                                 f"{' / '.join(f'{c:.6f}' for c in got['final'])}"]
        else:
            complete = False
    panels = [(data_title(d), [(a.label, ctx.stats(a, d), "-" if a.entry.rule == REFERENCE else "--")
                               for a in case.arms]) for d in arms[REFERENCE].datasets]
    plot_curves(report, ctx.out / f"{case.name}.png", panels, "nan-bp vs bp (the curves should coincide)")
    report.lines += ["", "Commands:", "", *commands(ctx, case.arms)]
    if complete and diffs and cosines:
        worst, low = max(diffs), min(cosines)
        verdict = HOLDS if worst <= 0.1 and low >= 0.999 else PARTLY if worst <= 0.5 or low >= 0.99 else NOT
        report.verdicts["nan-equals-bp"] = Verdict(
            f"nan-bp accuracy − bp at most {worst:.3f} points over {len(diffs)} runs; cosine >= {low:.6f}",
            fmt(ctx.stats(arms[REFERENCE], "mnist").final) + " % error (MNIST)", verdict,
            f"Every nan-bp run ends within {worst:.3f} points of BP's test error on the same seed, and every layer's "
            f"update has cosine >= {low:.6f} with BP's gradient, at initialisation and trained.",
            ctx.stats(arms["nan-bp"], "mnist").command)
    else:
        report.verdicts["nan-equals-bp"] = not_run(ctx, case)
    forgetting, lines = forgetting_verdict()
    report.verdicts["nan-forgets-less"] = forgetting
    report.lines += ["", "Forgetting (read, not run, by this suite):", "", *lines]
    return report


#: The commands that made each source of forgetting figures (their READMEs say so).
PROTOCOL_COMMAND = "python benchmarks/continual_protocol.py --out results/continual/protocol"
TABLE_COMMAND = ("python benchmarks/continual_experiment.py --out results/continual --seeds 3 --tasks 5 "
                 "(at commit a8aab30)")


def forgetting_verdict() -> tuple[Verdict, list[str]]:
    """NAN vs BP forgetting under naive fine-tuning, from the best source present (the row names it)."""
    for path in CONTINUAL_RESULTS:
        if path.exists():
            with open(path, newline="") as handle:
                rows = [r for r in csv.DictReader(handle) if r.get("stage") == "final" and r.get("strategy") == "naive"
                        and r.get("status") == "finished" and r.get("label") in ("nan", REFERENCE)]
            found: dict[str, dict[str, list[float]]] = {}
            for r in rows:
                found.setdefault(r["scenario"], {}).setdefault(r["label"], []).append(float(r["forgetting"]))
            if found:
                return _forgetting(found, f"the continual suite's `{path}` (naive fine-tuning, split MNIST)",
                                   f"localcredit bench --suite continual --out {path.parent}")
    protocol: dict[str, dict[str, list[float]]] = {}
    for scenario in ("split-task", "split-domain", "split-class"):
        for rule in ("nan", REFERENCE):
            path = CONTINUAL_PROTOCOL / scenario / f"{rule}-naive" / "result.json"
            if path.exists():
                forgetting = json.loads(path.read_text()).get("forgetting")
                if forgetting is not None:
                    protocol.setdefault(scenario, {})[rule] = [float(forgetting)]
    if any(len(v) == 2 for v in protocol.values()):
        # One seed each: METHODS.md measured single-seed differences of +-0.05 in forgetting as noise.
        return _forgetting({k: v for k, v in protocol.items() if len(v) == 2},
                           f"`{CONTINUAL_PROTOCOL}` (naive fine-tuning, split MNIST, van de Ven's protocol, one seed "
                           "each, so differences below 0.05 count as ties; the continual suite's results.csv was not "
                           "found)", PROTOCOL_COMMAND, floor=0.05)
    if CONTINUAL_TABLE.exists():
        with open(CONTINUAL_TABLE, newline="") as handle:
            table_rows = [r for r in csv.DictReader(handle) if r["rule"] in ("nan", REFERENCE)]
        found = {}
        for r in table_rows:
            mean, _, std = r["forgetting"].partition(" ± ")
            found.setdefault(r["scenario"], {})[r["rule"]] = [float(mean) + float(std or 0) * k
                                                              for k in _unit(int(r["seeds"]))]
        if found:
            return _forgetting(found, f"`{CONTINUAL_TABLE}` (plain fine-tuning, Fashion-MNIST, before strategies "
                                      "existed)", TABLE_COMMAND)
    return Verdict(evidence="No continual-learning results were found (`localcredit bench --suite continual` writes "
                            "them)."), []


def _unit(n: int) -> list[float]:
    """n numbers with mean 0 and sample std 1 (to carry a table's mean ± std into the tolerance)."""
    if n < 2:
        return [0.0]
    values = [i - (n - 1) / 2 for i in range(n)]
    scale = statistics.stdev(values)
    return [v / scale for v in values]


def _forgetting(found: dict[str, dict[str, list[float]]], source: str, command: str,
                floor: float = 0.0) -> tuple[Verdict, list[str]]:
    rows, outcomes, ours, bp = [], [], [], []
    for scenario, by_rule in found.items():
        if "nan" not in by_rule or REFERENCE not in by_rule:
            continue
        n, b = by_rule["nan"], by_rule[REFERENCE]
        t = max(tolerance(n, b) / 100, floor, 0.005)  # forgetting is a fraction, the tolerance's floor in points
        d = statistics.mean(n) - statistics.mean(b)
        outcomes.append(-1 if d < -t else 1 if d > t else 0)
        word = {-1: "nan forgets less", 0: "a tie", 1: "nan forgets more"}[outcomes[-1]]
        rows.append([scenario, fmt(n, 3), fmt(b, 3), f"{d:+.3f} ({word})"])
        ours.append(f"{scenario} {fmt(n, 3)}")
        bp.append(f"{scenario} {fmt(b, 3)}")
    if not outcomes:
        return Verdict(evidence=f"{source} holds no nan and bp pair."), []
    verdict = HOLDS if all(o < 0 for o in outcomes) else NOT if all(o >= 0 for o in outcomes) else PARTLY
    evidence = (f"Source: {source}; nan forgets less than bp beyond the tolerance in {outcomes.count(-1)} of "
                f"{len(outcomes)} scenarios, more in {outcomes.count(1)}.")
    return (Verdict("forgetting " + "; ".join(ours), "; ".join(bp), verdict, evidence, command, read=True),
            [f"Source: {source}.", "", *table(["scenario", "nan forgetting", "bp forgetting", "difference"], rows)])


# ----- case: CIFAR-10, SVHN, ImageNet ----------------------------------------------------------------------
def analyse_external(ctx: Context, case: Case) -> CaseReport:
    report = CaseReport()
    absent = [d for d in ("cifar10", "svhn") if d not in ctx.plan.present]
    missing = (f"{' and '.join(data_title(d) for d in absent)} not on this machine (`localcredit datasets` says where "
               "to put them; then rerun with `--cases external --resume`)") if absent else ""
    imagenet = "ImageNet-scale training is out of reach of this 2-core CPU machine: no run is planned"
    if case.arms:
        report.lines += table(ARM_HEADER, arm_rows(ctx, case.arms))
        report.lines += ["", "Commands:", "", *commands(ctx, case.arms)]
    else:
        report.lines += [f"No run: {missing}. {imagenet}."]

    def untested(why: str) -> Verdict:
        return Verdict("-", "-", UNTESTABLE, why + ".")

    stats = {a.label: (a, ctx.stats(a, a.datasets[0])) for a in case.arms}
    cifar = {label: st for label, (a, st) in stats.items() if a.datasets == ("cifar10",)}
    if "cifar10" in ctx.plan.present and cifar:
        mine, bp = cifar.get("lfnn-l [vgg]"), cifar.get("bp [vgg]")
        others = {k: v for k, v in cifar.items() if k.split(" ")[0] not in (*NOT_BP_FREE, "lfnn-l") and "[vgg]" in k}
        if mine and bp and mine.done and all(o.done for o in others.values()):
            better = [k for k, o in others.items() if compare(o.final, mine.final) < 0]
            verdict = HOLDS if not better and compare(mine.final, bp.final) <= 0 else PARTLY if not better else NOT
            report.verdicts["lfnn-cifar-imagenet"] = Verdict(
                f"CIFAR-10 lfnn-l [vgg] {fmt(mine.final)}", fmt(bp.final), verdict,
                f"On CIFAR-10 {len(better)} of {len(others)} BP-free rules beat lfnn-l; {imagenet}.", mine.command)
        else:
            report.verdicts["lfnn-cifar-imagenet"] = not_run(ctx, case)
    else:
        report.verdicts["lfnn-cifar-imagenet"] = untested(f"{missing or 'no CIFAR-10 run'}; {imagenet}")
    cells = []
    for data, suffix in (("cifar10", ""), ("svhn", " svhn")):
        got = {name: stats.get(f"{name} [vgg]{suffix}") for name in ("local-random", "fa", REFERENCE)}
        if all(v is not None and v[1].done for v in got.values()):
            lr_, fa, bp = (got[n][1] for n in ("local-random", "fa", REFERENCE))  # type: ignore[index]
            cells.append((data, compare(lr_.final, fa.final), lr_, fa, bp))
    if cells:
        verdict = HOLDS if all(o < 0 for _, o, *_ in cells) else NOT if all(o > 0 for _, o, *_ in cells) else PARTLY
        report.verdicts["random-cifar-svhn"] = Verdict(
            "; ".join(f"{data_title(d)} local-random {fmt(a.final)} vs fa {fmt(f.final)}" for d, _, a, f, _ in cells),
            "; ".join(f"{data_title(d)} {fmt(b.final)}" for d, *_, b in cells), verdict,
            f"local-random beats FA beyond the tolerance on {sum(o < 0 for _, o, *_ in cells)} of {len(cells)} data "
            f"sets{'; ' + missing if missing else ''}.", cells[0][2].command)
    else:
        report.verdicts["random-cifar-svhn"] = untested(missing or "the CIFAR-10/SVHN runs are not finished")
    deep = {k: v for k, v in cifar.items() if "deep invertible" in k}
    g, b = deep.get("gaitprop [deep invertible]"), deep.get("bp [deep invertible]")
    if g and b and g.done and b.done:
        gap = g.mean - b.mean
        report.verdicts["gait-imagenet"] = Verdict(
            f"CIFAR-10 gaitprop [deep invertible] {fmt(g.final)}", fmt(b.final),
            HOLDS if gap <= max(tolerance(g.final, b.final), 0.5) else PARTLY if gap <= 2 else NOT,
            f"On CIFAR-10 the deep MLP's gaitprop ends {gap:+.2f} points from BP; {imagenet}.", g.command)
    else:
        report.verdicts["gait-imagenet"] = untested(f"{missing or 'no CIFAR-10 run'}; {imagenet}")
    return report


ANALYSES: dict[str, Callable[[Context, Case], CaseReport]] = {
    "lfnn": analyse_lfnn, "bp-free": analyse_bp_free, "fixed-random": analyse_fixed_random, "memory": analyse_memory,
    "gait": analyse_gait, "gait-align": analyse_gait_align, "nan": analyse_nan, "external": analyse_external}


# ----- results.csv ----------------------------------------------------------------------------------------
def run_rows(ctx: Context) -> list[dict[str, Any]]:
    """One row per run folder of the plan, tuning runs included; the cases and row names that use it."""
    rows: dict[Path, dict[str, Any]] = {}

    def add(job: ClaimRun, case: str, label: str) -> None:
        folder = job.folder(ctx.out)
        if folder in rows:
            if case not in rows[folder]["cases"].split():
                rows[folder]["cases"] += f" {case}"
            return
        result = ctx.result(job) or {}
        errors = errors_of(result)
        seconds = result.get("seconds_per_epoch") or []
        steady = statistics.median(seconds[1:] if len(seconds) > 1 else seconds) if seconds else None
        steps = -(-int(result.get("train_samples") or 0) // job.setting.batch_size) if result.get("train_samples") else None
        rows[folder] = {
            "cases": case, "setting": job.setting.name, "stage": job.run.stage, "row": label, "rule": job.run.entry.rule,
            "arch": job.run.entry.arch, "options": " ".join(job.run.entry.options), "data": job.run.data,
            "evaluated_on": "validation" if job.run.stage == "tune" else "test", "seed": job.run.seed,
            "lr": job.run.lr, "epochs": result.get("epochs"), "status": result.get("status", "missing"),
            "final_error": errors[-1] if errors else None, "best_error": min(errors) if errors else None,
            "best_epoch": errors.index(min(errors)) + 1 if errors else None,
            "error_per_epoch": " ".join(f"{e:.2f}" for e in errors), "seconds_per_epoch": steady,
            "ms_per_step": 1000 * steady / steps if steady and steps else None,
            "train_samples": result.get("train_samples"), "command": command_text(job, ctx.out),
            "result_json": str(folder / "result.json")}

    for case in ctx.plan.cases:
        for key in tuning_keys(ctx.plan, [case]):
            setting = ctx.plan.settings[key[0]]
            for lr in grid_of(ctx.plan, key, ctx.out)[0]:
                add(tune_run(setting, key[1], key[2], lr), case.name, key[1].variant or key[1].label)
        for arm in case.arms:
            for job in final_runs(ctx.plan, arm, ctx.out):
                if job is not None:
                    add(job, case.name, arm.label)
    return list(rows.values())


# ----- RESULTS.md -----------------------------------------------------------------------------------------
def quickly(verdict: Verdict, plan: ClaimsPlan) -> Verdict:
    if plan.quick and verdict.read:
        verdict.evidence = "Not from the quick budget: read from results made elsewhere. " + verdict.evidence
    elif plan.quick and verdict.verdict in (HOLDS, PARTLY, NOT):
        verdict.verdict = f"quick budget, not a verdict (reads: {verdict.verdict})"
        verdict.evidence = ("Quick budget (2 epochs on 1,000-2,000 images, 1 seed, no tuning): this tests that the "
                            "suite runs, not the claim. " + verdict.evidence)
    return verdict


def escape(text: str) -> str:
    return text.replace("|", "\\|")


def verdict_table(plan: ClaimsPlan, verdicts: dict[str, Verdict]) -> list[str]:
    rows = []
    for claim in CLAIMS:
        v = verdicts[claim.key]
        paper = SEED_CLAIMS[claim.key]
        rows.append([claim.paper, escape(claim.text), escape(f"{paper.figure} [{paper.source}]"), escape(v.ours),
                     escape(v.bp), f"**{v.verdict}**", escape(v.evidence),
                     f"`{escape(v.command)}`" if v.command else "-", f"[{claim.case}](#case-{claim.case})"])
    return table(["paper", "claim", "published (source)", "ours (mean ± std over seeds)", "BP, same network and recipe",
                  "verdict", "evidence", "command (seed 0; the others differ in --seed and --out)", "case"], rows)


def timing_lines(out: Path) -> list[str]:
    path = out / TIMING
    if not path.exists():
        return []
    log = json.loads(path.read_text())
    lines = ["| started | command | wall | processes | their wall s | their CPU s | load average at end (1/5/15 min) |",
             "|---|---|---|---|---|---|---|"]
    for entry in log:
        lines.append(f"| {entry['started']} | `{entry['command']}` | {entry['wall_seconds'] / 60:.1f} min"
                     f"{' (interrupted)' if entry.get('interrupted') else ''} | {entry.get('processes', '-')} | "
                     f"{entry.get('process_wall_seconds', '-')} | {entry.get('process_cpu_seconds', '-')} | "
                     f"{' / '.join(f'{v:.2f}' for v in entry['load_average_at_end'])} |")
    return lines


def write_report(plan: ClaimsPlan, out: Path, command: str, resume_hint: str = "") -> dict:
    ctx = Context(plan, out)
    verdicts: dict[str, Verdict] = {}
    sections: list[str] = []
    for case in plan.cases:
        report = ANALYSES[case.name](ctx, case)
        for key in case.claims:
            verdicts[key] = quickly(report.verdicts.get(key) or not_run(ctx, case), plan)
        settings = list(dict.fromkeys(a.setting for a in (*case.arms, *(m.arm for m in case.measures))))
        sections += [f'<a id="case-{case.name}"></a>', f"### Case `{case.name}`: {case.title}", "",
                     f"Design: {case.design}", "",
                     *(f"- setting `{s}`: {plan.settings[s].description}." for s in settings), "",
                     *report.lines, "", *(f"![{p}]({p})" for p in report.plots), ""]
    rows = run_rows(ctx)
    write_csv(out / "results.csv", rows)
    write_csv(out / "verdicts.csv", [{"paper": c.paper, "claim": c.text, "case": c.case,
                                      "published": SEED_CLAIMS[c.key].figure, "source": SEED_CLAIMS[c.key].source,
                                      **{k: v for k, v in vars(verdicts[c.key]).items() if k != "read"}}
                                     for c in CLAIMS])
    done = sum(r["status"] in ("ok", "diverged") for r in rows)
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    budget = ("**Quick budget** (`--quick`): every case at 2 epochs on 1,000-2,000 images, 1 seed, no tuning. It checks "
              "that the suite runs end to end; its verdicts are marked and say nothing about the claims."
              if plan.quick else
              "Full budget: 3 seeds for every claim's rows (ablations 1), learning rates tuned on a validation split "
              "where a setting tunes; docs/bench.md gives each case's design and the CPU time.")
    lines = [
        "# The seed papers' claims, a verdict each", "",
        f"Command: `{command}`  ", f"Report written {now}; machine: {machine_description()}.", "",
        budget, "",
        f"Runs: {done} of {len(rows)} finished (results.csv); per case below its tables, plots and commands.", "",
        "## Verdicts", "", *verdict_table(plan, verdicts), "",
        "How a verdict is read: errors are test errors in %, mean ± sample std over seeds; two figures differ when "
        f"their means differ by more than the tolerance, twice the standard error of the difference and at least "
        f"{MIN_TOLERANCE} points (a published figure counts as exact). Each case's design says which outcome is "
        "'holds', 'holds partly' or 'does not hold'. 'cannot be tested here': the data or the scale is not on this "
        "machine. A published LFNN setting field by field: "
        + ", ".join(f"{k} {v}" for k, v in LFNN_AUTHORS.items()) + ".", "",
        "## Cases", "", *sections]
    if plan.quick:
        lines += ["## What the full run would cost", "", *estimate_lines(plan, ctx, rows), ""]
    timing = timing_lines(out)
    if timing:
        lines += ["## Time taken (each invocation of the command)", "", *timing, ""]
    if resume_hint:
        lines += [f"Resume or complete with: `{resume_hint}`", ""]
    (out / "RESULTS.md").write_text("\n".join(lines))
    plots = [p.name for p in sorted(out.glob("*.png"))]
    return {"rows": len(rows), "files": ["results.csv", "verdicts.csv", "RESULTS.md", *plots]}


# ----- the full run's cost, from a quick run's step times ------------------------------------------------
TRAIN_SIZE = {"mnist": 60_000, "fashion-mnist": 60_000, "cifar10": 50_000, "svhn": 73_257}
PROCESS_SECONDS = 4.0  # a process's start, data loading and building, when nothing better is measured


def estimate_lines(plan: ClaimsPlan, ctx: Context, rows: list[dict]) -> list[str]:
    """CPU hours of the full plan: each of its runs' steps x the step time this quick run measured for that
    setting and row, scaled by the share of a core the quick run's processes got, plus their start-up."""
    path = ctx.out / TIMING
    log = json.loads(path.read_text()) if path.exists() else []
    wall = sum(e.get("process_wall_seconds", 0) for e in log)
    cpu = sum(e.get("process_cpu_seconds", 0) for e in log)
    share = cpu / wall if wall else 1.0
    measured: dict[tuple[str, str], list[float]] = {}
    for r in rows:
        if r["ms_per_step"]:
            measured.setdefault((r["setting"], r["options"] and f"{r['rule']} {r['options']}" or r["rule"]), []).append(
                r["ms_per_step"])
            measured.setdefault((r["setting"], r["rule"]), []).append(r["ms_per_step"])
    quick_steps_cpu = sum((r["ms_per_step"] or 0) * (r["epochs"] or 0) * -(-int(r["train_samples"] or 0) // 128) / 1000
                          for r in rows) * share
    processes = max(1, sum(e.get("processes", 0) for e in log))
    per_process = max(PROCESS_SECONDS, (cpu - quick_steps_cpu) / processes) if cpu else PROCESS_SECONDS
    full = claims_plan(quick=False, present=set(plan.present))
    by_case: dict[str, float] = {}
    unknown: set[str] = set()
    seen: set[tuple] = set()
    for case in full.cases:
        hours = 0.0
        for key in tuning_keys(full, [case]):
            setting = full.settings[key[0]]
            size = min(TRAIN_SIZE.get(key[2], 60_000) * 5 // 6, setting.tune_limit_train or setting.limit_train or 10**9)
            grid_size = 2 * setting.lr_span + 1
            job = (key, "tune")
            if job in seen:
                continue
            seen.add(job)
            ms = _ms(measured, key[0], key[1].rule, key[1].options, unknown)
            hours += grid_size * (setting.tune_epochs * -(-size // setting.batch_size) * ms * share / 1000 +
                                  per_process) / 3600
        for arm in case.arms:
            setting = full.settings[arm.setting]
            for data in arm.datasets:
                runs = (arm.setting, arm.entry, data, arm.seeds, arm.lr)
                if runs in seen:
                    continue
                seen.add(runs)
                size = min(TRAIN_SIZE.get(data, 60_000), setting.limit_train or 10**9)
                ms = _ms(measured, arm.setting, arm.entry.rule, arm.entry.options, unknown)
                steps = setting.epochs * (-(-size // setting.batch_size) + 10_000 // setting.batch_size // 3)  # + eval
                hours += arm.seeds * (steps * ms * share / 1000 + per_process) / 3600
        for m in case.measures:
            if m.kind == "align-curve":
                setting = full.settings[m.arm.setting]
                size = min(TRAIN_SIZE[m.data], setting.limit_train or 10**9)
                steps = setting.epochs * -(-size // setting.batch_size)
                ms = _ms(measured, m.arm.setting, m.arm.entry.rule, (), unknown)
                marks = 8 + setting.epochs + 1
                hours += (steps + marks * 6) * ms * share / 1000 / 3600
            else:
                hours += 2 * per_process / 3600
        by_case[case.name] = hours
    total = sum(by_case.values())
    loads = [e["load_average_at_end"][0] for e in log]
    lines = [f"From this quick run's step times (each row's median wall ms per step on its own network) times the "
             f"share of a core its processes got ({share:.2f}: {cpu:.0f} CPU s in {wall:.0f} s of their wall time; "
             f"1-minute load average at the end {', '.join(f'{v:.1f}' for v in loads) or '-'}), plus "
             f"{per_process:.1f} CPU s per process (start, data, evaluation), over the full plan's runs (the first "
             "tuning grid; a widened grid adds up to one run per tuned row):", "",
             *table(["case", "CPU hours"], [[f"`{k}`", f"{v:.2f}"] for k, v in by_case.items()]), "",
             f"**{total:.1f} CPU hours: about {total / 2:.1f} h of wall time with 2 runs at a time on 2 quiet cores.** "
             "Step times measured under load are inflated by cache and memory-bandwidth contention beyond what the "
             "CPU share corrects, so this errs high."]
    if unknown:
        lines.append(f"No quick-run step time for {', '.join(sorted(unknown))}: counted at 50 ms per step.")
    return lines


def _ms(measured: dict[tuple[str, str], list[float]], setting: str, rule: str, options: Sequence[str],
        unknown: set[str]) -> float:
    for key in ((setting, f"{rule} {' '.join(options)}" if options else rule), (setting, rule)):
        if key in measured:
            return statistics.median(measured[key])
    unknown.add(f"{rule} ({setting})")
    return 50.0
