"""The outputs of the continual suite: results.csv (one row per run), RESULTS.md and PNG plots.

Everything is read back from the runs' own files (result.json, or the suite's divergence note), so
the report can be rebuilt at any time from a bench folder.
"""

from __future__ import annotations

import datetime
import json
import statistics
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers or in CI
import matplotlib.pyplot as plt  # noqa: E402

from ..continual import strategies  # noqa: E402
from ..continual.scenarios import SCENARIOS  # noqa: E402
from ..data.base import VALIDATION_PREFIX  # noqa: E402
from .continual_findings import findings_lines  # noqa: E402
from .continual_suite import (  # noqa: E402
    DIVERGED,
    ContinualSuite,
    Entry,
    SuiteRun,
    left_out,
    lr_of,
    read_result,
    spec_of,
)
from .published import CONTINUAL_NOTE  # noqa: E402
from .report import machine_description, mean_std, write_csv  # noqa: E402

KINDS = {"task": "task-incremental: the task's own head answers",
         "domain": "domain-incremental: no task id, the same 2 outputs for every task",
         "class": "class-incremental: no task id, every class seen so far competes"}
STABILITY_PLOT = "stability_gap.png"


def accuracy_plot(scenario: str) -> str:
    return f"accuracy_{scenario}.png"


def plot_files(suite: ContinualSuite) -> list[str]:
    return [*(accuracy_plot(s) for s in suite.scenarios), STABILITY_PLOT]


# ----- rows ------------------------------------------------------------------------------------
def run_row(run: SuiteRun, suite: ContinualSuite, out: Path) -> dict:
    folder = run.folder(out)
    result = read_result(folder)
    spec = spec_of(run, suite)
    status = result.get("status") or ("failed" if (folder / "log.txt").exists() else "missing")
    steps = spec.tasks * spec.steps_per_task
    seconds = result.get("seconds")
    return {"stage": run.stage, "scenario": run.scenario, "strategy": run.strategy, "rule": run.entry.rule,
            "arch": run.entry.arch, "label": run.entry.label, "seed": run.seed, "data": spec.data,
            "evaluated_on": "validation" if run.stage == "tune" else "test", "status": status,
            "average_accuracy": result.get("average_accuracy"), "forgetting": result.get("forgetting"),
            "backward_transfer": result.get("backward_transfer"), "seconds": seconds,
            "ms_per_step": seconds * 1000 / steps if seconds else None, "steps_per_task": spec.steps_per_task,
            "lr": spec.lr, "strategy_options": " ".join(run.options), "tuned": run.tuned,
            "strategy_config": json.dumps(result.get("strategy_config")) if "strategy_config" in result else "",
            "accuracy_matrix": json.dumps(result.get("accuracy_matrix")) if "accuracy_matrix" in result else "",
            "result_json": str(folder / ("result.json" if status != "diverged" else DIVERGED))}


def _finished(rows: list[dict], label: str, scenario: str, strategy: str, stage: str = "final") -> list[dict]:
    return [r for r in rows if r["stage"] == stage and r["label"] == label and r["scenario"] == scenario
            and r["strategy"] == strategy and r["status"] == "finished"]


def _cell_runs(rows: list[dict], label: str, scenario: str, strategy: str) -> list[dict]:
    return [r for r in rows if r["stage"] == "final" and r["label"] == label and r["scenario"] == scenario
            and r["strategy"] == strategy]


# ----- the Markdown report ---------------------------------------------------------------------
def _pct(values: Sequence[float], digits: int = 2) -> str:
    mean, std = mean_std([v * 100 for v in values])
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if len(values) > 1 else f"{mean:.{digits}f}"


def accuracy_cell(runs: list[dict]) -> str:
    """Mean ± std of the average accuracy (%), forgetting beside it; what went wrong, where it did."""
    if not runs:
        return "-"
    done = [r for r in runs if r["status"] == "finished"]
    others = [r["status"] for r in runs if r["status"] != "finished"]
    text = ""
    if done:
        forgetting = [r["forgetting"] for r in done if r["forgetting"] is not None]
        text = _pct([r["average_accuracy"] for r in done]) + (f" (F {_pct(forgetting, 1)})" if forgetting else "")
    if others:
        counts = {status: others.count(status) for status in dict.fromkeys(others)}
        text += (" + " if text else "") + ", ".join(f"{n} {status}" for status, n in counts.items())
    return text


class Sources:
    """Footnote numbers for the published figures' sources, in order of first use."""

    def __init__(self) -> None:
        self.numbers: dict[str, int] = {}

    def mark(self, source: str) -> str:
        return f"[{self.numbers.setdefault(source, len(self.numbers) + 1)}]"

    def lines(self) -> list[str]:
        return [f"[{n}] {source}." for source, n in self.numbers.items()]


def scenario_table(rows: list[dict], suite: ContinualSuite, chosen: Sequence[Entry], scenario: str,
                   sources: Sources) -> list[str]:
    names = suite.strategy_names()
    lines = ["| rule (seeds) | " + " | ".join(f"`{s}`" for s in names) + " |", "|---|" + "---|" * len(names)]
    for entry in chosen:
        cells = [accuracy_cell(_cell_runs(rows, entry.label, scenario, s)) if SCENARIOS[scenario]
                 in strategies.get(s).kinds else "n/a" for s in names]
        lines.append(f"| `{entry.label}` ({suite.seeds_of(entry)}) | " + " | ".join(cells) + " |")
        if entry.rule == "bp" and entry.arch == "mlp" and suite.published:
            published = [" / ".join(f"{p.text} {sources.mark(p.source)}" for p in suite.published.get((s, scenario), ()))
                         or "-" for s in names]
            lines.append("| *published, BP* | " + " | ".join(published) + " |")
    return lines


def tuning_lines(rows: list[dict], suite: ContinualSuite, chosen: Sequence[Entry]) -> list[str]:
    tuned = [r for r in rows if r["stage"] == "tune"]
    if not suite.tuning:
        return ["No tuning in this suite: every strategy runs at its defaults (`localcredit strategies`)."]
    lines = [f"Each strategy's strength is chosen per rule and scenario from a grid of three log-spaced values "
             f"around the authors' choices, by the average accuracy on the validation split (`--data "
             f"{VALIDATION_PREFIX}{suite.data}`: a fixed, stratified sixth of the training split held out; the test "
             f"split is never seen), seed 0, **{suite.tune_steps_per_task} steps per task** instead of "
             f"{suite.steps_per_task} (to fit the budget), no accuracy curve. Same grid, same budget for every rule; "
             f"ties go to the value nearest the grid's middle.", "",
             "| strategy | option | grid per scenario | the authors' choices |", "|---|---|---|---|"]
    for strategy, tuning in suite.tuning.items():
        grids = "; ".join(f"{sc}: {', '.join(f'{v:g}' for v in values)}" for sc, values in tuning.grid.items())
        fixed = "; ".join(f"{sc}: {' '.join(o)}" for sc, o in tuning.fixed.items())
        lines.append(f"| `{strategy}` | `{tuning.key}`{f' (fixed: {fixed})' if fixed else ''} | {grids} | "
                     f"{tuning.source} |")
    if not tuned:
        return lines
    lines += ["", "Validation average accuracy % per value (chosen in bold; the final runs use it):", "",
              "| scenario | strategy | rule | validation accuracy % per value |", "|---|---|---|---|"]
    chosen_values = {(r["label"], r["scenario"], r["strategy"]): r["tuned"] for r in rows if r["stage"] == "final"}
    for scenario in suite.scenarios:
        for strategy in suite.tuning:
            for entry in chosen:
                runs = [r for r in tuned if r["scenario"] == scenario and r["strategy"] == strategy
                        and r["label"] == entry.label]
                if not runs:
                    continue
                cells = []
                for r in runs:
                    value = f"{r['average_accuracy'] * 100:.2f}" if r["status"] == "finished" else r["status"]
                    text = f"{r['tuned'].split('=', 1)[1]}: {value}"
                    cells.append(f"**{text}**" if r["tuned"] == chosen_values.get((entry.label, scenario, strategy))
                                 else text)
                lines.append(f"| {scenario} | `{strategy}` | `{entry.label}` | {', '.join(cells)} |")
    return lines


def time_lines(rows: list[dict], suite: ContinualSuite, chosen: Sequence[Entry]) -> list[str]:
    """Mean milliseconds per training step by rule and strategy (the run's whole time: evaluations, Fisher and
    memory included) and the CPU hours of all runs; runs shared the CPU, so these are indicative."""
    names = suite.strategy_names()
    finals = [r for r in rows if r["stage"] == "final" and r["ms_per_step"] is not None]
    hours = sum(r["seconds"] for r in rows if r["seconds"]) / 3600
    lines = [f"Time spent in the runs (training, evaluations, Fisher and memory upkeep; process starts and data "
             f"loading left out): **{hours:.2f} CPU hours** over {sum(1 for r in rows if r['seconds'])} runs. "
             "Milliseconds per training step, mean over scenarios and seeds (runs shared the CPU, so these are "
             "indicative):", "",
             "| rule | " + " | ".join(f"`{s}`" for s in names) + " |", "|---|" + "---|" * len(names)]
    for entry in chosen:
        cells = []
        for strategy in names:
            values = [r["ms_per_step"] for r in finals if r["label"] == entry.label and r["strategy"] == strategy]
            cells.append(f"{statistics.mean(values):.1f}" if values else "-")
        lines.append(f"| `{entry.label}` | " + " | ".join(cells) + " |")
    return lines


def protocol_lines(suite: ContinualSuite, chosen: Sequence[Entry]) -> list[str]:
    slow = sorted({e.label for e in chosen if lr_of(e, suite) != 1e-3})
    other_nets = sorted({f"`{e.label}` on {e.arch}" for e in chosen if e.arch != "mlp"})
    data = f"the first {suite.limit_train:,} training images" if suite.limit_train else "the whole training split"
    return [
        f"- Data: split {suite.data} ({data}, the whole test split), {suite.tasks} tasks of "
        f"{10 // suite.tasks} classes in order (0-1, 2-3, ...), the same for every seed.",
        "- Scenarios: " + "; ".join(f"`{s}` ({KINDS[SCENARIOS[s]]})" for s in suite.scenarios) + ".",
        f"- Network: an MLP 784-{'-'.join(map(str, suite.hidden))}-outputs, ReLU (10 outputs; 2 in "
        f"domain-incremental learning) for every rule"
        + (f"; rules that invert their layers train those sizes in their own network ({', '.join(other_nets)})"
           if other_nets else "") + ".",
        f"- Recipe: `--optimizer {suite.optimizer}` at the rule's default learning rate (1e-3, the protocol's"
        + (f"; {', '.join(slow)}: their documented default" if slow else "") + f"), batch {suite.batch_size}, "
        f"{suite.steps_per_task} steps per task, constant learning rate, no augmentation; seed s sets the weights, "
        f"the batches and the strategy's draws.",
        "- Strategies: " + ", ".join(f"`{s}`" + (f" ({' '.join(suite.strategy_options[s])})"
                                                  if suite.strategy_options.get(s) else "")
                                     for s in suite.strategy_names())
        + "; every other option at the strategy's default unless tuned (below).",
        "- Metrics (after the last task, on the test split): *average accuracy* = mean over the tasks of their "
        "test accuracy; *forgetting* F = mean over the earlier tasks of (best accuracy before the last task - "
        "final accuracy); backward transfer in results.csv.",
        *(f"- Not run: `{s}` on `{sc}` ({s} applies to "
          f"{', '.join(k + '-incremental' for k in strategies.get(s).kinds)} scenarios only)."
          for s, sc in left_out(suite)),
    ]


def markdown(options, rows: list[dict], chosen: Sequence[Entry]) -> str:
    suite = options.suite
    wall = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    sources = Sources()
    lines = [f"# Benchmark: suite `{suite.name}`", "", f"{suite.description}.", "", "Command:", "",
             f"    {options.command}", "",
             f"Machine: {machine_description()}. Runs: {options.workers} at a time, {options.threads} thread(s) "
             f"each (every run is its own `localcredit continual` process). Report written {wall}.", "",
             "## Protocol", "", *protocol_lines(suite, chosen), ""]
    for scenario in suite.scenarios:
        lines += [f"## `{scenario}`: average test accuracy % after the last task (mean ± std over seeds; "
                  f"F = forgetting %)", "", *scenario_table(rows, suite, chosen, scenario, sources), "",
                  f"![{scenario}]({accuracy_plot(scenario)})", ""]
    if sources.numbers:
        departure = f" Not the same budget: {suite.departure}." if suite.departure else ""
        lines += ["Published figures (BP on the same MLP), by source:", "", *sources.lines(), "",
                  f"{CONTINUAL_NOTE}.{departure}", ""]
    lines += ["## What the grid says", "",
              *findings_lines(rows, [e.label for e in chosen], suite.scenarios, suite.strategy_names()), "",
              "## Strategy strengths", "", *tuning_lines(rows, suite, chosen), "",
              "## Stability gap", "",
              "Accuracy on the first task while the later ones are learned (seed 0; dashed: task switches), BP "
              "against a local rule, without and with replay. A dip right after a switch that recovers is the "
              "stability gap (De Lange et al. 2023).", "", f"![stability gap]({STABILITY_PLOT})", "",
              "## Run time", "", *time_lines(rows, suite, chosen), "",
              "Every run's `result.json` (the accuracy matrix, the accuracy curve, the exact command), `log.txt`, "
              "`config.yaml` and plots are under `runs/<scenario>/<strategy>/<rule>-seed<s>/` (tuning runs under "
              "`runs/tune/`); all rows in `results.csv`.", ""]
    return "\n".join(lines)


# ----- plots -----------------------------------------------------------------------------------
def _colours(chosen: Sequence[Entry]) -> dict[str, tuple]:
    cmap = plt.get_cmap("tab20")
    order = [*range(0, 20, 2), *range(1, 20, 2)]  # dark shades first: neighbours should not share a hue
    return {entry.label: cmap(order[i % 20]) for i, entry in enumerate(chosen)}


def plot_accuracy(path: Path, rows: list[dict], suite: ContinualSuite, chosen: Sequence[Entry], scenario: str) -> None:
    """Grouped bars: per strategy, each rule's mean average accuracy (± std); BP's published figures as ticks."""
    names = [s for s in suite.strategy_names() if SCENARIOS[scenario] in strategies.get(s).kinds]
    colours = _colours(chosen)
    width = 0.8 / max(1, len(chosen))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.22 * len(names) * len(chosen) + 2.5), 4.6))
    for i, entry in enumerate(chosen):
        xs, means, stds = [], [], []
        for x, strategy in enumerate(names):
            values = [r["average_accuracy"] * 100 for r in _finished(rows, entry.label, scenario, strategy)]
            if values:
                mean, std = mean_std(values)
                xs.append(x - 0.4 + width * (i + 0.5))
                means.append(mean)
                stds.append(std)
        ax.bar(xs, means, width, yerr=stds, capsize=2, color=colours[entry.label], label=entry.label)
    marked = False
    for x, strategy in enumerate(names):
        for published in suite.published.get((strategy, scenario), ()):
            ax.plot([x - 0.4, x + 0.4], [published.accuracy] * 2, color="black", lw=1.2, ls="--",
                    label=None if marked else "published BP")
            marked = True
    ax.set_xticks(range(len(names)), names)
    ax.set(title=f"{scenario}: average test accuracy after the last task", ylabel="accuracy (%)", ylim=(0, 100))
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, ncol=min(5, len(chosen) + 1), loc="upper center", bbox_to_anchor=(0.5, -0.08))
    _save(fig, path)


def stability_rows(suite: ContinualSuite, chosen: Sequence[Entry]) -> list[Entry]:
    """BP and the first of the suite's local rules that ran (or any other row)."""
    bp = [e for e in chosen if e.rule == "bp" and e.arch == "mlp"]
    others = [e for e in chosen if e not in bp]
    local = [e for name in suite.local_rules for e in others if e.name == name][:1] or others[:1]
    return bp + local


def plot_stability(path: Path, runs: Sequence[SuiteRun], suite: ContinualSuite, chosen: Sequence[Entry],
                   out: Path) -> None:
    shown = stability_rows(suite, chosen)
    columns = [s for s in ("naive", "replay") if s in suite.strategy_names()] or suite.strategy_names()[:1]
    colours = _colours(chosen)
    fig, axes = plt.subplots(len(suite.scenarios), len(columns), figsize=(5.5 * len(columns),
                                                                          2.8 * len(suite.scenarios)),
                             squeeze=False, sharey=True)
    for row, scenario in enumerate(suite.scenarios):
        for col, strategy in enumerate(columns):
            ax = axes[row][col]
            for entry in shown:
                run = next((r for r in runs if r.stage == "final" and r.entry == entry and r.scenario == scenario
                            and r.strategy == strategy and r.seed == 0), None)
                curve = read_result(run.folder(out)).get("accuracy_curve") if run is not None else None
                if curve:
                    ax.plot([p["global_step"] for p in curve], [p["accuracy"][0] * 100 for p in curve],
                            color=colours[entry.label], lw=1.1, label=entry.label)
            for task in range(1, suite.tasks):
                ax.axvline(task * suite.steps_per_task, color="grey", ls="--", lw=0.6)
            ax.set(title=f"{scenario}, {strategy}", ylim=(0, 101))
            ax.grid(alpha=0.3)
            if row == len(suite.scenarios) - 1:
                ax.set_xlabel("training step")
            if col == 0:
                ax.set_ylabel("task 1 test accuracy (%)")
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7, loc="lower left")
    _save(fig, path)


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----- entry point -----------------------------------------------------------------------------
def write_report(options, chosen: Sequence[Entry], tune: Sequence[SuiteRun], final: Sequence[SuiteRun]) -> dict:
    suite, out = options.suite, options.out
    rows = [run_row(run, suite, out) for run in [*tune, *final]]
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "results.csv", rows)
    (out / "RESULTS.md").write_text(markdown(options, rows, chosen))
    for scenario in suite.scenarios:
        plot_accuracy(out / accuracy_plot(scenario), rows, suite, chosen, scenario)
    plot_stability(out / STABILITY_PLOT, final, suite, chosen, out)
    return {"rows": len(rows), "files": ["results.csv", "RESULTS.md", *plot_files(suite)]}

