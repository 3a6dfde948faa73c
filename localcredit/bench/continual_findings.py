"""The continual report's answers, computed from the final runs: does any rule forget less than BP once BP uses
a strategy, does NAN forget less than BP under any strategy or scenario, does a strategy help the other rules as
much as it helps BP (issue 27's three questions).

A difference counts only beyond a margin: twice the standard error of the difference of the two means, at
least one point. A one-seed row has no spread of its own, so BP's spread in the same cell stands in for it.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from ..continual import strategies
from ..continual.scenarios import SCENARIOS

REFERENCE = "bp"
#: the lower and upper bounds are not strategies against forgetting: left out of "BP's best strategy"
BOUNDS = ("naive", "joint")
MIN_MARGIN = 1.0  # points


@dataclass(frozen=True)
class Cell:
    """One rule x scenario x strategy: its final runs' average accuracy and forgetting, in points."""

    accuracy: tuple[float, ...]
    forgetting: tuple[float, ...]

    @property
    def acc(self) -> float:
        return statistics.mean(self.accuracy)

    @property
    def forget(self) -> float:
        return statistics.mean(self.forgetting)


Cells = dict[tuple[str, str, str], Cell]  # (label, scenario, strategy) -> cell


def collect(rows: Sequence[dict]) -> Cells:
    found: dict[tuple[str, str, str], list[dict]] = {}
    for r in rows:
        if r["stage"] == "final" and r["status"] == "finished" and r["forgetting"] not in (None, ""):
            found.setdefault((r["label"], r["scenario"], r["strategy"]), []).append(r)
    return {key: Cell(tuple(float(r["average_accuracy"]) * 100 for r in runs),
                      tuple(float(r["forgetting"]) * 100 for r in runs)) for key, runs in found.items()}


def margin(values: Sequence[float], reference: Sequence[float]) -> float:
    """Twice the standard error of the difference of the means (BP's variance for a one-seed row), >= 1 point."""
    ref_var = statistics.variance(reference) if len(reference) > 1 else 0.0
    var = statistics.variance(values) if len(values) > 1 else ref_var
    return max(MIN_MARGIN, 2 * math.sqrt(var / len(values) + ref_var / len(reference)))


def compare(values: Sequence[float], reference: Sequence[float]) -> int:
    """-1 below the reference beyond the margin, +1 above it, 0 a tie."""
    diff = statistics.mean(values) - statistics.mean(reference)
    return 0 if abs(diff) <= margin(values, reference) else (1 if diff > 0 else -1)


def applied(scenario: str, names: Sequence[str]) -> list[str]:
    return [s for s in names if SCENARIOS[scenario] in strategies.get(s).kinds]


def _others(labels: Sequence[str]) -> list[str]:
    return [label for label in labels if label != REFERENCE and not label.startswith(REFERENCE + " ")]


def forgetting_lines(cells: Cells, labels: Sequence[str], scenarios: Sequence[str], names: Sequence[str]) -> list[str]:
    """Per scenario and strategy: BP's forgetting, and the rules that forget less than BP under it."""
    lines = ["| scenario | strategy | BP: F (accuracy) | rules forgetting less than BP: F (accuracy) |",
             "|---|---|---|---|"]
    for scenario in scenarios:
        for strategy in applied(scenario, names):
            bp = cells.get((REFERENCE, scenario, strategy))
            if bp is None or strategy == "joint":
                continue
            less = [f"`{label}` {c.forget:.1f} ({c.acc:.1f})" for label in _others(labels)
                    if (c := cells.get((label, scenario, strategy))) and compare(c.forgetting, bp.forgetting) < 0]
            lines.append(f"| {scenario} | `{strategy}` | {bp.forget:.1f} ({bp.acc:.1f}) | {', '.join(less) or 'none'} |")
    lines += ["", "Against BP with its best strategy (highest accuracy, bounds left out): rules that forget less "
              "under any strategy, bounds left out.", "",
              "| scenario | BP's best | BP: F (accuracy) | rules forgetting less: F (accuracy), strategy |",
              "|---|---|---|---|"]
    for scenario in scenarios:
        options = [s for s in applied(scenario, names) if s not in BOUNDS and (REFERENCE, scenario, s) in cells]
        if not options:
            continue
        best = max(options, key=lambda s: cells[REFERENCE, scenario, s].acc)
        bp = cells[REFERENCE, scenario, best]
        less = []
        for label in _others(labels):
            mine = [(c.forget, c.acc, s) for s in options if (c := cells.get((label, scenario, s)))
                    and compare(c.forgetting, bp.forgetting) < 0]
            if mine:
                forget, acc, s = min(mine)
                less.append(f"`{label}` {forget:.1f} ({acc:.1f}), {s}")
        lines.append(f"| {scenario} | `{best}` | {bp.forget:.1f} ({bp.acc:.1f}) | {'; '.join(less) or 'none'} |")
    return lines


def nan_lines(cells: Cells, scenarios: Sequence[str], names: Sequence[str], nan: str = "nan") -> list[str]:
    """NAN against BP in every cell both ran: forgetting and accuracy differences, and which way they go."""
    words = {-1: "less", 0: "tie", 1: "more"}
    lines = ["| scenario | strategy | nan F - bp F (points) | nan accuracy - bp accuracy | nan forgets |",
             "|---|---|---|---|---|"]
    tally = {"less": 0, "tie": 0, "more": 0}
    for scenario in scenarios:
        for strategy in applied(scenario, names):
            bp, mine = cells.get((REFERENCE, scenario, strategy)), cells.get((nan, scenario, strategy))
            if bp is None or mine is None or strategy == "joint":
                continue
            word = words[compare(mine.forgetting, bp.forgetting)]
            tally[word] += 1
            lines.append(f"| {scenario} | `{strategy}` | {mine.forget - bp.forget:+.1f} | {mine.acc - bp.acc:+.1f} | "
                         f"{word} |")
    return [*lines, "", f"NAN forgets less than BP beyond the margin in {tally['less']} cell(s), more in "
                        f"{tally['more']}, a tie in {tally['tie']}."]


def gain_lines(cells: Cells, labels: Sequence[str], scenarios: Sequence[str], names: Sequence[str]) -> list[str]:
    """Per scenario, each rule's gain in average accuracy over its own naive fine-tuning, strategy by strategy,
    and the other rules' median gain beside BP's."""
    lines = []
    for scenario in scenarios:
        shown = [s for s in applied(scenario, names) if s != "naive"]
        if not any((label, scenario, "naive") in cells for label in labels):
            continue
        lines += [f"`{scenario}`: points of average accuracy over the rule's own `naive`", "",
                  "| rule | " + " | ".join(f"`{s}`" for s in shown) + " |", "|---|" + "---|" * len(shown)]
        gains: dict[str, dict[str, float]] = {}
        for label in labels:
            base = cells.get((label, scenario, "naive"))
            if base is None:
                continue
            row = {s: c.acc - base.acc for s in shown if (c := cells.get((label, scenario, s)))}
            gains[label] = row
            lines.append(f"| `{label}` | " + " | ".join(f"{row[s]:+.1f}" if s in row else "-" for s in shown) + " |")
        others = [gains[label] for label in _others(list(gains))]
        median = [statistics.median(values) if (values := [g[s] for g in others if s in g]) else None for s in shown]
        lines.append("| *median of the other rules* | " + " | ".join(f"{m:+.1f}" if m is not None else "-"
                                                                     for m in median) + " |")
        lines.append("")
    return lines


def findings_lines(rows: Sequence[dict], labels: Sequence[str], scenarios: Sequence[str],
                   names: Sequence[str]) -> list[str]:
    cells = collect(rows)
    if not any(key[0] == REFERENCE for key in cells):
        return ["No finished BP runs yet: nothing to compare with."]
    return ["Computed from the final runs above. A difference counts only beyond twice the standard error of the "
            "difference of the means, at least 1 point (a one-seed row borrows BP's spread in the same cell). "
            "Forgetting F in points; a low F beside a low accuracy is a rule that learned little, not one that "
            "kept much.", "",
            "### Does any rule forget less than BP, once BP uses a strategy?", "",
            *forgetting_lines(cells, labels, scenarios, names), "",
            "### Does NAN forget less than BP under any strategy or scenario?", "",
            *nan_lines(cells, scenarios, names), "",
            "### Does a strategy help the other rules as much as it helps BP?", "",
            *gain_lines(cells, labels, scenarios, names)]
