"""The modules suite's outputs: results.csv (one row per run), RESULTS.md and modules.png (error and memory
against K, InfoPro's published CIFAR-10 curve beside them).

Everything is read back from the runs' own files and the probes, so the report can be rebuilt at any
time from a bench folder.
"""

from __future__ import annotations

import datetime
import statistics
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers or in CI
import matplotlib.pyplot as plt  # noqa: E402

from .modules_suite import REFERENCE, ModulesRun, ModulesSuite, Point  # noqa: E402
from .plan import read_result  # noqa: E402
from .published import INFOPRO_NOTE  # noqa: E402
from .report import machine_description, write_csv  # noqa: E402

PLOT = "modules.png"
#: InfoPro's K values (their table goes to 16).
PUBLISHED_KS = (1, 2, 4, 8, 16)


def run_row(run: ModulesRun, suite: ModulesSuite, out: Path, probes: dict) -> dict:
    result = read_result(run.folder(out)) or {}
    memory = probes.get((run.point, run.depth), {})
    accuracy = result.get("test_accuracy") if result.get("status") == "ok" else None
    return {"suite": suite.name, "stage": run.stage, "data": run.data,
            "evaluated_on": "validation" if run.stage == "tune" else "test", "depth": run.depth,
            "rule": run.point.rule, "modules": run.point.k, "end_to_end": run.point.modules is None,
            "seed": run.seed, "lr": run.lr, "epochs": result.get("epochs"), "status": result.get("status", "missing"),
            "accuracy": accuracy, "error_percent": None if accuracy is None else 100 * (1 - accuracy),
            "seconds_per_epoch": statistics.median(result["seconds_per_epoch"]) if result.get("seconds_per_epoch")
            else None,
            "step_memory_mb": memory.get("step_memory_mb"), "step_gradient_mb": memory.get("step_gradient_mb"),
            "folder": str(run.folder(out).relative_to(out))}


def _errors(rows: list[dict], point: Point, depth: int, data: str) -> list[float]:
    return [r["error_percent"] for r in rows if r["stage"] == "final" and r["rule"] == point.rule
            and r["end_to_end"] == (point.modules is None) and r["modules"] == point.k and r["depth"] == depth
            and r["data"] == data and r["error_percent"] is not None]


def _cell(values: Sequence[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def _row_names(points: Sequence[Point]) -> list[str]:
    return list(dict.fromkeys(p.rule for p in points))


def _point(points: Sequence[Point], rule: str, k: int) -> Point | None:
    return next((p for p in points if p.rule == rule and p.k == k), None)


def error_table(rows: list[dict], suite: ModulesSuite, points: Sequence[Point], depth: int, data: str) -> list[str]:
    lines = ["| row | " + " | ".join(f"K = {k}" for k in suite.ks) + " |", "|---|" + "---|" * len(suite.ks)]
    for rule in _row_names(points):
        label = f"{rule} (end to end)" if rule == REFERENCE else rule
        cells = [_cell(_errors(rows, p, depth, data)) if (p := _point(points, rule, k)) else "" for k in suite.ks]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def memory_table(probes: dict, suite: ModulesSuite, points: Sequence[Point], depth: int) -> list[str]:
    lines = ["| row | " + " | ".join(f"K = {k}" for k in suite.ks) + " |", "|---|" + "---|" * len(suite.ks)]
    for rule in _row_names(points):
        cells = []
        for k in suite.ks:
            point = _point(points, rule, k)
            figure = probes.get((point, depth), {}).get("step_memory_mb") if point else None
            cells.append("" if point is None else "-" if figure is None else f"{figure:.1f}")
        lines.append(f"| {f'{rule} (end to end)' if rule == REFERENCE else rule} | " + " | ".join(cells) + " |")
    return lines


def lr_table(rows: list[dict], suite: ModulesSuite, points: Sequence[Point], depth: int) -> list[str]:
    lines = ["| row | data | " + " | ".join(f"K = {k}" for k in suite.ks) + " |", "|---|---|" + "---|" * len(suite.ks)]
    for rule in _row_names(points):
        for data in suite.datasets:
            cells = []
            for k in suite.ks:
                point = _point(points, rule, k)
                lrs = {r["lr"] for r in rows if point and r["stage"] == "final" and r["rule"] == rule
                       and r["modules"] == k and r["end_to_end"] == (point.modules is None) and r["data"] == data
                       and r["depth"] == depth}
                cells.append(", ".join(f"{lr:.3g}" for lr in sorted(lrs)))
            lines.append(f"| {rule} | {data} | " + " | ".join(cells) + " |")
    return lines


def published_table(suite: ModulesSuite) -> list[str]:
    names = {REFERENCE: "end to end (BP)", "infopro": "InfoPro", "dgl": "DGL"}
    lines = ["| row | " + " | ".join(f"K = {k}" for k in PUBLISHED_KS) + " |", "|---|" + "---|" * len(PUBLISHED_KS)]
    for rule, name in names.items():
        cells = [f"{suite.published[rule, k].error:.2f}" if (rule, k) in suite.published else "-" for k in PUBLISHED_KS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    sources = sorted({p.source for p in suite.published.values()})
    return [*lines, "", f"Source: {'; '.join(sources)}. {INFOPRO_NOTE}."]


def markdown(options, rows: list[dict], points: Sequence[Point], probes: dict) -> str:
    suite = options.suite
    lines = [f"# Bench `{suite.name}`: test error and training memory against the number of modules K", "",
             suite.description + ".", "",
             f"Command: `{options.command}`  ", f"Machine: {machine_description()}  ",
             f"Written {datetime.datetime.now().isoformat(timespec='minutes')}; every number below is read from the "
             f"runs in `runs/` and the probes in `probes/` (results.csv has one row per run).", "",
             "K = 1 for a local rule is `--modules 1`: its loss on one module holding every block, which trains the "
             "network end to end by BP through the rule's own auxiliary network; its head learns on the detached "
             "output (infopro: the one module learns through the head, so its K = 1 is the bp row's training). "
             "docs/modules.md explains the rows.", ""]
    for depth in suite.depths:
        for data in suite.datasets:
            seeds = suite.seeds
            lines += [f"## resnet-{depth} on {data}: test error % ({seeds} seed{'s' if seeds > 1 else ''}, "
                      f"mean ± std)", "", *error_table(rows, suite, points, depth, data), ""]
        lines += [f"## resnet-{depth}: training-step memory (MB)", "",
                  f"The probe's peak of the tensors one training step makes (activations kept for the backward "
                  f"passes, auxiliary networks' included), batch {suite.batch_size}, on {suite.datasets[0]}; weights, "
                  f"gradients and optimiser state left out (`bench/memory.py`).", "",
                  *memory_table(probes, suite, points, depth), ""]
        if suite.tune_epochs:
            lines += [f"## resnet-{depth}: learning rates chosen on the validation split", "",
                      *lr_table(rows, suite, points, depth), ""]
    lines += ["## Published: InfoPro's CIFAR-10 table (ResNet-110), test error %", "", *published_table(suite), ""]
    missing = [r["folder"] for r in rows if r["stage"] == "final" and r["status"] not in ("ok", "diverged")]
    diverged = [r["folder"] for r in rows if r["stage"] == "final" and r["status"] == "diverged"]
    if diverged:
        lines += ["Diverged (left out of the means): " + ", ".join(f"`{f}`" for f in diverged), ""]
    if missing:
        lines += ["Missing or unfinished: " + ", ".join(f"`{f}`" for f in missing), ""]
    lines += [f"![error and memory against K]({PLOT})", ""]
    return "\n".join(lines)


def _k_axis(ax, ks: Sequence[int]) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(ks), [str(k) for k in ks])
    ax.minorticks_off()


def plot(path: Path, rows: list[dict], suite: ModulesSuite, points: Sequence[Point], probes: dict) -> None:
    columns = len(suite.datasets) + 2  # error per data set, memory, the published curve
    fig, axes = plt.subplots(len(suite.depths), columns, figsize=(4.2 * columns, 3.6 * len(suite.depths)),
                             squeeze=False)
    names = [rule for rule in _row_names(points) if rule != REFERENCE]
    for row, depth in enumerate(suite.depths):
        for column, data in enumerate(suite.datasets):
            ax = axes[row][column]
            reference = _errors(rows, Point(REFERENCE, None), depth, data)
            if reference:
                ax.axhline(statistics.mean(reference), color="black", ls="--", lw=1, label="bp, end to end")
            for rule in names:
                ks = [k for k in suite.ks if _errors(rows, Point(rule, k), depth, data)]
                ax.plot(ks, [statistics.mean(_errors(rows, Point(rule, k), depth, data)) for k in ks], marker="o",
                        label=rule)
            ax.set(title=f"resnet-{depth}, {data}", xlabel="modules K", ylabel="test error %")
            _k_axis(ax, suite.ks)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        ax = axes[row][len(suite.datasets)]
        bp_memory = probes.get((Point(REFERENCE, None), depth), {}).get("step_memory_mb")
        if bp_memory is not None:
            ax.axhline(bp_memory, color="black", ls="--", lw=1, label="bp, end to end")
        for rule in names:
            ks = [k for k in suite.ks if probes.get((Point(rule, k), depth), {}).get("step_memory_mb") is not None]
            ax.plot(ks, [probes[Point(rule, k), depth]["step_memory_mb"] for k in ks], marker="o", label=rule)
        ax.set(title=f"resnet-{depth}: training-step memory", xlabel="modules K", ylabel="MB")
        _k_axis(ax, suite.ks)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        ax = axes[row][-1]
        if row == 0:
            published = suite.published
            if (REFERENCE, 1) in published:
                ax.axhline(published[REFERENCE, 1].error, color="black", ls="--", lw=1, label="end to end")
            for rule, name in (("infopro", "InfoPro"), ("dgl", "DGL")):
                ks = [k for k in PUBLISHED_KS if (rule, k) in published]
                ax.plot(ks, [published[rule, k].error for k in ks], marker="s", label=name)
            ax.set(title="published: CIFAR-10, ResNet-110", xlabel="modules K", ylabel="test error %")
            _k_axis(ax, PUBLISHED_KS)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        else:
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(options, points: Sequence[Point], tune: Sequence[ModulesRun], final: Sequence[ModulesRun],
                 probes: dict) -> dict:
    suite, out = options.suite, options.out
    rows = [run_row(run, suite, out, probes) for run in [*tune, *final]]
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "results.csv", rows)
    (out / "RESULTS.md").write_text(markdown(options, rows, points, probes))
    plot(out / PLOT, rows, suite, points, probes)
    return {"rows": len(rows), "files": ["results.csv", "RESULTS.md", PLOT]}
