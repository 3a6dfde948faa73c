"""The outputs of a benchmark suite: results.csv (one row per run), RESULTS.md and PNG plots.

Everything here is read back from the runs' own files (result.json, alignment.json, the
probes), so a report can be rebuilt at any time from a bench folder.
"""

from __future__ import annotations

import csv
import datetime
import os
import platform
import statistics
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers or in CI
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from ..spec import to_argv  # noqa: E402
from .plan import REFERENCE, Entry, Run, read_result, spec_of  # noqa: E402

PLOTS = ("learning_curves.png", "accuracy.png", "alignment.png", "cost.png")


def steady_seconds_per_epoch(result: dict) -> float:
    """Median epoch time, leaving out the first epoch (warm-up) when there are others."""
    seconds = result["seconds_per_epoch"]
    return statistics.median(seconds[1:] if len(seconds) > 1 else seconds)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _fmt(values: Sequence[float], scale: float = 100, digits: int = 2) -> str:
    if not values:
        return "-"
    mean, std = mean_std([v * scale for v in values])
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if len(values) > 1 else f"{mean:.{digits}f}"


# ----- rows ------------------------------------------------------------------------------------
def run_row(run: Run, options, alignments: dict, probes: dict) -> dict:
    result = read_result(run.folder(options.out)) or {}
    suite = options.suite
    row = {"suite": suite.name, "stage": run.stage, "data": run.data,
           "evaluated_on": "validation" if run.stage == "tune" else "test",
           "rule": run.entry.rule, "arch": run.entry.arch, "label": run.entry.label,
           "hidden": "-".join(map(str, suite.hidden)), "seed": run.seed, "lr": run.lr,
           "epochs": result.get("epochs"), "status": result.get("status", "missing"),
           "accuracy": result.get("test_accuracy"),
           "accuracy_per_epoch": " ".join(f"{a:.4f}" for a in result.get("test_accuracy_per_epoch", [])),
           "seconds_per_epoch": steady_seconds_per_epoch(result) if result.get("seconds_per_epoch") else None,
           "samples_per_second": result.get("samples_per_second"),
           "peak_rss_mb": result.get("peak_memory_mb"), "parameters": result.get("parameters"),
           "train_samples": result.get("train_samples")}
    if run.stage == "final":
        # Probes ran on the first data set only (a step costs the same on MNIST and Fashion-MNIST).
        probe = probes.get(run.entry, {}) if run.data == suite.datasets[0] else {}
        align = alignments.get(run, {})
        row.update(ms_per_step=probe.get("ms_per_step"), step_memory_mb=probe.get("step_memory_mb"),
                   alignment_init=" ".join(f"{c:.4f}" for c in align.get("init", [])),
                   alignment_final=" ".join(f"{c:.4f}" for c in align.get("final", [])))
    row["result_json"] = str(run.folder(options.out) / "result.json")
    return row


def add_ratios(rows: list[dict]) -> None:
    """Per final run: step time, epoch time and memory as ratios to BP on the same network, data and seed."""
    reference = {(r["arch"], r["data"], r["seed"]): r for r in rows
                 if r["stage"] == "final" and r["rule"] == REFERENCE and r["status"] == "ok"}
    for row in rows:
        bp = reference.get((row["arch"], row["data"], row["seed"])) if row["stage"] == "final" else None
        for key, ratio in (("ms_per_step", "step_time_ratio_to_bp"), ("seconds_per_epoch", "epoch_time_ratio_to_bp"),
                           ("step_memory_mb", "step_memory_ratio_to_bp"), ("peak_rss_mb", "peak_rss_ratio_to_bp")):
            ok = bp is not None and row.get(key) is not None and bp.get(key)
            row[ratio] = row[key] / bp[key] if ok and bp is not None else None  # ok implies bp; said for mypy


def write_csv(path: Path, rows: list[dict]) -> None:
    fields = list(dict.fromkeys(key for row in rows for key in row))
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


# ----- the Markdown report ---------------------------------------------------------------------
def machine_description() -> str:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = ""
    try:
        kib = int(Path("/proc/meminfo").read_text().split()[1])
        memory = f", {kib / 2**20:.0f} GiB RAM"
    except (OSError, ValueError, IndexError):
        pass
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", no GPU used"
    return (f"{model}, {os.cpu_count()} cores{memory}{gpu}; {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}, torch {torch.__version__}")


def summary_table(rows: list[dict], chosen: Sequence[Entry], datasets: Sequence[str], lrs: dict,
                  published: dict | None = None) -> list[str]:
    """Per row: per data set the learning rate, our test error, the published error and whether that
    training was BP-free; then step time and step memory as ratios to BP on the same network."""
    published = published or {}
    finals = [r for r in rows if r["stage"] == "final"]
    by_key = defaultdict(list)
    for row in finals:
        by_key[row["label"], row["data"]].append(row)
    header = ["rule", "network"]
    for data in datasets:
        header += [f"lr ({data})", f"{data} test error % (ours)", f"published error % ({data})", "published BP-free"]
    header += ["step time vs BP", "step memory vs BP"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    first = datasets[0]
    for entry in chosen:
        cells = [f"`{entry.name}`", entry.arch]
        for data in datasets:
            runs = by_key[entry.label, data]
            errors = [1 - r["accuracy"] for r in runs if r["status"] == "ok"]
            diverged = sum(r["status"] == "diverged" for r in runs)
            paper = published.get((entry.name, data))
            cells += [f"{lrs[entry, data]:.3g}", _fmt(errors) + (f" ({diverged} diverged)" if diverged else ""),
                      f"{paper.error:g} ({paper.source})" if paper else "-", paper.bp_free_text if paper else "-"]
        runs = by_key[entry.label, first]
        for key in ("step_time_ratio_to_bp", "step_memory_ratio_to_bp"):
            values = [r[key] for r in runs if r.get(key) is not None]
            cells.append(_ratio(statistics.mean(values)) if values else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def recipe_table(suite, chosen: Sequence[Entry], lrs: dict) -> list[str]:
    """Per row and data set, the options its final runs trained with: the recipe, line by line."""
    lines = ["| rule | data | options |", "|---|---|---|"]
    for data in suite.datasets:
        for entry in chosen:
            spec = spec_of(Run("final", entry, data, 0, lrs[entry, data]), suite)
            argv = " ".join(to_argv(spec))
            lines.append(f"| `{entry.name}` | {data} | `{argv}` |")
    return lines


def forward_flops_text(suite) -> str:
    """FLOPs of one sample's forward pass through the suite's network, for 28x28 grey images."""
    from ..nets import invertible  # noqa: F401  (registers the invertible architectures)
    from ..nets.architectures import build
    from .flops import forward_flops

    net = build(replace(suite.network, arch=suite.arch), (1, 28, 28), 10)
    parameters = sum(p.numel() for p in net.parameters())
    return f"{forward_flops(net, (1, 28, 28)) / 1e6:.2f} MFLOP per 28x28 sample forward, {parameters:,} parameters"


def published_notes(published: dict) -> list[str]:
    """The notes of the published numbers shown (one line each; the LFNN one says what is not BP-free)."""
    notes = dict.fromkeys(p.note for p in published.values() if p.note)
    return [f"- {note}." for note in notes]


def _ratio(value: float) -> str:
    return f"{value:.2f}" if value >= 0.1 else f"{value:.2g}"


def alignment_table(rows: list[dict], chosen: Sequence[Entry], data: str) -> list[str]:
    lines = ["| rule | network | cosine per layer at init | after training (mean over seeds) |", "|---|---|---|---|"]
    for entry in chosen:
        runs = [r for r in rows if r["stage"] == "final" and r["label"] == entry.label and r["data"] == data
                and r.get("alignment_final")]
        if not runs:
            continue
        init = _layer_means([r["alignment_init"] for r in runs])
        final = _layer_means([r["alignment_final"] for r in runs])
        lines.append(f"| `{entry.rule}` | {entry.arch} | {' '.join(f'{c:.2f}' for c in init)} | "
                     f"{' '.join(f'{c:.2f}' for c in final)} |")
    return lines


def _layer_means(texts: Sequence[str]) -> list[float]:
    per_run = [[float(v) for v in text.split()] for text in texts]
    return [statistics.mean(layer) for layer in zip(*per_run)]


def tuning_table(rows: list[dict], chosen: Sequence[Entry], datasets: Sequence[str], lrs: dict) -> list[str]:
    tune = [r for r in rows if r["stage"] == "tune"]
    if not tune:
        return []
    lines = ["| rule | network | data | validation accuracy % per learning rate (chosen in bold) |", "|---|---|---|---|"]
    for data in datasets:
        for entry in chosen:
            cells = []
            for row in sorted((r for r in tune if r["label"] == entry.label and r["data"] == data),
                              key=lambda r: r["lr"]):
                value = f"{row['accuracy'] * 100:.2f}" if row["status"] == "ok" else row["status"]
                text = f"{row['lr']:.3g}: {value}"
                cells.append(f"**{text}**" if row["lr"] == lrs[entry, data] else text)
            lines.append(f"| `{entry.rule}` | {entry.arch} | {data} | {', '.join(cells)} |")
    return lines


def mixed_training_sets(rows: list[dict], datasets: Sequence[str]) -> list[str]:
    """A warning when a data set's test runs trained on different numbers of images: a run kept by --resume
    from before the data set's source changed (e.g. MNIST from 10,000 to 60,000 images) is not comparable."""
    lines = []
    for data in datasets:
        sizes: dict[int, list[str]] = {}
        for row in rows:
            if row["stage"] == "final" and row["data"] == data and row.get("train_samples"):
                labels = sizes.setdefault(int(row["train_samples"]), [])
                if row["label"] not in labels:
                    labels.append(row["label"])
        if len(sizes) > 1:
            groups = "; ".join(f"{size:,} images: {', '.join(labels)}" for size, labels in sorted(sizes.items()))
            lines += [f"**Not comparable on {data}: its test runs trained on different numbers of images** ({groups}). "
                      "Runs kept by `--resume` from before the data set changed; delete their folders under `runs/` "
                      "and resume to train them again.", ""]
    return lines


def markdown(options, rows: list[dict], chosen: Sequence[Entry], lrs: dict, wall: str, probes: dict) -> str:
    suite = options.suite
    loads = [p["load_average_1min"] for p in probes.values() if "load_average_1min" in p]
    load = f" (1-minute load average after each probe: {min(loads):.1f}-{max(loads):.1f})" if loads else ""
    datasets = list(suite.datasets)
    train_size = f"the first {suite.limit_train:,} training images" if suite.limit_train else "the whole training split"
    tuning = (f"Learning rates: for every rule and data set, Adam at the rule's default learning rate x "
              f"{suite.lr_step:g}^k, k = -{suite.lr_span}..{suite.lr_span}, each trained for {suite.tune_epochs} "
              f"epoch(s), seed 0, on a validation split carved from the training data (`--data val:NAME`: a fixed, "
              f"stratified sixth of the training split is held out and evaluated, the rest trains). When the best "
              f"value lies on an edge of the grid, the grid grows by one more x{suite.lr_step:g} step beyond it "
              f"(at most {suite.lr_extensions} times). The value with the best final validation accuracy is used "
              f"for the test runs (ties: the one closest to the default). The test split is never seen by this "
              f"choice."
              if suite.tune_epochs else
              f"Learning rate: the published recipe's, {suite.recipe['lr']:g}, for every row; no tuning."
              if "lr" in suite.recipe else
              "Learning rates: every rule at its documented default (Adam 1e-3; 1e-4 for gaitprop/tp/itp, "
              "whose orthogonality regulariser needs slow steps); no tuning in this suite.")
    lines = [
        f"# Benchmark: suite `{suite.name}`",
        "",
        f"{suite.description}.",
        "",
        "Command:",
        "",
        f"    {options.command}",
        "",
        f"Machine: {machine_description()}. Runs: {options.workers} at a time, {options.threads} thread(s) each "
        f"(every run is its own `localcredit train` process). Report written {wall}.",
        "",
        "## What every rule got",
        f"- Network: `{' '.join(to_argv(suite.network)) or '--arch mlp'}` for every rule "
        f"({forward_flops_text(suite)}). Rules that invert their layers (gaitprop, tp, itp) train an "
        "invertible network instead (square layers, leaky ReLU 0.1; see each row's command below); BP on that very "
        "network is a row of its own, and their speed and memory ratios are taken against it.",
        f"- Data: {', '.join(datasets)}; {train_size}; inputs standardised with training statistics. "
        f"{suite.epochs} epoch(s), batch {suite.batch_size}, Adam, seeds 0..{suite.seeds - 1}; every other "
        "option at the rule's default (`localcredit rules` lists them).",
        f"- {tuning}",
        "- Speed and memory: measured after the runs by `python -m localcredit.bench.probe`, one rule at a time in a fresh "
        f"process on one thread, nothing else of the bench running{load}, on {datasets[0]}: *step time* = median wall "
        "time of a training step (after warm-up), as a ratio to BP on the same network. *Step memory* = the most "
        "memory of tensors made by training steps alive at one time during a step, whoever holds them "
        "(autograd, the rule's own lists, caches it keeps between steps), counted the same way for every rule "
        "(`localcredit.bench.memory`); weights, fixed feedback matrices, gradients, optimiser state and the data set "
        "are left out (results.csv: `step_memory_mb`, `step_memory_ratio_to_bp`; a run's whole peak RSS, "
        "dominated by the data set and torch itself, is there too as `peak_rss_mb`). The runs' own epoch "
        "times (results.csv: `seconds_per_epoch`, `epoch_time_ratio_to_bp`) were taken while runs shared the "
        "CPU, so they are noisier.",
        "",
        "## Test error (mean ± std over seeds) beside the published error, speed and memory",
        "",
        *summary_table(rows, chosen, datasets, lrs, suite.published),
        "",
        *mixed_training_sets(rows, datasets),
        "Published errors come from METHODS.md with their sources (`localcredit/bench/published.py`); '-' where none "
        "exists for that row. *published BP-free*: whether the published training kept the error from crossing "
        "blocks end to end." + (f" Recipe and comparability: {suite.source}." if suite.source else ""),
        *published_notes(suite.published),
        "",
        "## Each row's recipe (the `localcredit train` options of its test runs, seed and output left out)",
        "",
        *recipe_table(suite, chosen, lrs),
        "",
    ]
    for data in datasets:
        lines += [f"## Alignment with BP on {data} (cosine between the rule's update and the BP gradient, per layer, "
                  f"hidden layers then output; {suite.align_batch} training images)", "",
                  *alignment_table(rows, chosen, data), ""]
    tune = tuning_table(rows, chosen, datasets, lrs)
    if tune:
        lines += ["## Learning-rate choice (validation split, seed 0)", "", *tune, ""]
    lines += ["## Plots", ""] + [f"![{name}]({name})" for name in PLOTS] + [
        "", "Every run's `result.json` (per-epoch accuracy and loss, timings, the exact command), `log.txt` and "
            "`alignment.json` are under `runs/`; speed and memory probes under `probes/`; all rows in `results.csv`.", ""]
    return "\n".join(lines)


# ----- plots -----------------------------------------------------------------------------------
def _colours(chosen: Sequence[Entry]) -> dict[str, tuple]:
    # The dark tab20 shades first: neighbours in the legend should not share a hue.
    cmap = plt.get_cmap("tab20")
    order = [*range(0, 20, 2), *range(1, 20, 2)]
    return {entry.label: cmap(order[i % 20]) for i, entry in enumerate(chosen)}


MARKERS = "osD^v<>pXh*"


def _finals(rows: list[dict], label: str, data: str) -> list[dict]:
    return [r for r in rows if r["stage"] == "final" and r["label"] == label and r["data"] == data
            and r["status"] == "ok"]


def plot_learning_curves(path: Path, rows, chosen, datasets) -> None:
    colours = _colours(chosen)
    fig, axes = plt.subplots(1, len(datasets), figsize=(6.5 * len(datasets), 4.8), squeeze=False)
    for ax, data in zip(axes[0], datasets):
        for entry in chosen:
            curves = [[float(v) * 100 for v in r["accuracy_per_epoch"].split()] for r in _finals(rows, entry.label, data)]
            if not curves:
                continue
            epochs = range(1, min(map(len, curves)) + 1)
            mean = [statistics.mean(c[e - 1] for c in curves) for e in epochs]
            std = [mean_std([c[e - 1] for c in curves])[1] for e in epochs]
            marker = MARKERS[chosen.index(entry) % len(MARKERS)]
            ax.plot(epochs, mean, marker=marker, color=colours[entry.label], label=entry.label)
            ax.fill_between(epochs, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                            color=colours[entry.label], alpha=0.15)
        ax.set(title=f"Test accuracy per epoch: {data}", xlabel="epoch", ylabel="test accuracy (%)")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="lower right", ncol=2)
    _save(fig, path)


def plot_accuracy(path: Path, rows, chosen, datasets) -> None:
    colours = _colours(chosen)
    fig, axes = plt.subplots(1, len(datasets), figsize=(6.5 * len(datasets), 0.4 * len(chosen) + 1.8), squeeze=False)
    for ax, data in zip(axes[0], datasets):
        stats = [(entry.label, *mean_std([r["accuracy"] * 100 for r in _finals(rows, entry.label, data)]))
                 for entry in chosen if _finals(rows, entry.label, data)]
        stats.sort(key=lambda s: s[1])
        labels = [s[0] for s in stats]
        ax.barh(labels, [s[1] for s in stats], xerr=[s[2] for s in stats], capsize=3,
                color=[colours[label] for label in labels])
        low = min(s[1] - s[2] for s in stats) if stats else 0
        ax.set_xlim(max(0, low - 5), 100)
        for y, (_, mean, std) in enumerate(stats):
            ax.text(mean + std, y, f"  {mean:.2f}", va="center", fontsize=7)  # right of the error bar
        ax.set(title=f"Final test accuracy (mean ± std over seeds): {data}", xlabel="test accuracy (%)")
        ax.grid(axis="x", alpha=0.3)
    _save(fig, path)


def plot_alignment(path: Path, rows, chosen, datasets) -> None:
    colours = _colours(chosen)
    fig, axes = plt.subplots(1, len(datasets), figsize=(6.5 * len(datasets), 4.8), squeeze=False)
    for ax, data in zip(axes[0], datasets):
        for entry in chosen:
            runs = [r for r in _finals(rows, entry.label, data) if r.get("alignment_final")]
            if not runs:
                continue
            final = _layer_means([r["alignment_final"] for r in runs])
            ax.plot(range(1, len(final) + 1), final, marker=MARKERS[chosen.index(entry) % len(MARKERS)],
                    color=colours[entry.label], label=entry.label)
        ax.axhline(0, color="grey", lw=0.8)
        ax.set(title=f"Alignment with BP after training: {data}", xlabel="layer (last = output)",
               ylabel="cosine(rule update, BP gradient)", ylim=(-0.2, 1.05))
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="lower left", ncol=2)
    _save(fig, path)


def plot_cost(path: Path, rows, chosen, datasets) -> None:
    data = datasets[0]
    colours = _colours(chosen)
    panels = (("step_time_ratio_to_bp", "training step time / BP"), ("step_memory_ratio_to_bp", "step memory / BP"))
    fig, axes = plt.subplots(1, len(panels), figsize=(10, 0.4 * len(chosen) + 1.8))
    for ax, (key, title) in zip(axes, panels):
        stats = []
        for entry in chosen:
            values = [r[key] for r in _finals(rows, entry.label, data) if r.get(key) is not None]
            if values:
                stats.append((entry.label, statistics.mean(values)))
        ax.barh([s[0] for s in stats], [s[1] for s in stats], color=[colours[s[0]] for s in stats])
        ax.axvline(1, color="black", lw=1, ls="--", label="BP = 1")
        ax.set(title=f"{title} ({data})", xlabel="ratio to BP on the same network")
        ax.grid(axis="x", alpha=0.3)
        ax.legend(fontsize=7)
    _save(fig, path)


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----- entry point -----------------------------------------------------------------------------
def write_report(options, chosen: Sequence[Entry], tune: Sequence[Run], final: Sequence[Run], lrs: dict,
                 alignments: dict, probes: dict) -> dict:
    out, datasets = options.out, list(options.suite.datasets)
    rows = [run_row(run, options, alignments, probes) for run in [*tune, *final]]
    add_ratios(rows)
    write_csv(out / "results.csv", rows)
    wall = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    (out / "RESULTS.md").write_text(markdown(options, rows, chosen, lrs, wall, probes))
    for name, plot in zip(PLOTS, (plot_learning_curves, plot_accuracy, plot_alignment, plot_cost)):
        plot(out / name, rows, chosen, datasets)
    return {"rows": len(rows), "files": ["results.csv", "RESULTS.md", *PLOTS]}


# ----- a suite of cases (paper) ------------------------------------------------------------------------
def case_rows(folder: Path) -> list[dict]:
    """The final runs' rows of one case's results.csv (none when the case has not been run)."""
    path = folder / "results.csv"
    if not path.exists():
        return []
    with open(path, newline="") as handle:
        return [row for row in csv.DictReader(handle) if row["stage"] == "final"]


def case_lines(case, rows: list[dict]) -> list[str]:
    """One line per row and data set of a case: our error beside the published one."""
    from .plan import suite_entries

    lines = []
    for data in case.datasets:
        for entry in suite_entries(case):
            runs = [r for r in rows if r["label"] == entry.label and r["data"] == data]
            errors = [1 - float(r["accuracy"]) for r in runs if r["status"] == "ok"]
            paper = case.published.get((entry.name, data))
            ratios = [_mean_cell([r.get(key) for r in runs]) for key in ("step_time_ratio_to_bp",
                                                                           "step_memory_ratio_to_bp")]
            cells = [case.name, f"`{entry.name}`", entry.arch, data, str(case.epochs),
                     _fmt(errors) if errors else "not run", f"{paper.error:g}" if paper else "-",
                     paper.bp_free_text if paper else "-", *ratios]
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def _mean_cell(values: Sequence[str | None]) -> str:
    numbers = [float(v) for v in values if v not in (None, "")]
    return _ratio(statistics.mean(numbers)) if numbers else "-"


def write_cases_report(options) -> dict:
    """OUT/RESULTS.md of a suite of cases: every case's rows beside the published errors, read back from
    OUT/<case>/results.csv, so cases run at different times (or on other machines) join one table."""
    suite, out = options.suite, options.out
    header = ("| case | rule | network | data | epochs | test error % (ours) | published error % | "
              "published BP-free | step time vs BP | step memory vs BP |")
    lines = [f"# Benchmark: suite `{suite.name}`", "", f"{suite.description}.", "",
             "Every case is a bench of its own in `<case>/` (its RESULTS.md gives each row's exact options, "
             "the machine, step time and memory); this table gathers them. 'not run': run it with "
             f"`localcredit bench --suite {suite.name} --cases CASE --out {out} --resume`.", "",
             header, "|" + "---|" * (header.count("|") - 1)]
    published = {}
    for case in suite.cases:
        lines += case_lines(case, case_rows(out / case.name))
        published.update(case.published)
    lines += ["", "Sources and recipes:", ""]
    lines += [f"- `{case.name}`: {case.source}." for case in suite.cases]
    lines += ["", *published_notes(published), ""]
    out.mkdir(parents=True, exist_ok=True)
    (out / "RESULTS.md").write_text("\n".join(lines))
    return {"rows": len(lines), "files": ["RESULTS.md"]}
