"""The continual report's answers: margins, and which rows each question picks out, on hand-made rows."""

from __future__ import annotations

import pytest

from localcredit.bench.continual_findings import collect, compare, findings_lines, margin, nan_lines


def row(label, scenario, strategy, accuracy, forgetting, seed=0, stage="final", status="finished"):
    return {"stage": stage, "status": status, "label": label, "scenario": scenario, "strategy": strategy,
            "seed": seed, "average_accuracy": accuracy, "forgetting": forgetting}


def rows_of(label, scenario, strategy, accuracies, forgettings):
    return [row(label, scenario, strategy, a, f, seed=i) for i, (a, f) in enumerate(zip(accuracies, forgettings))]


def test_the_margin_is_twice_the_standard_error_of_the_difference_and_at_least_one_point():
    assert margin([50.0, 50.0, 50.0], [50.0, 50.0, 50.0]) == 1.0  # no spread: the floor
    bp = [40.0, 44.0, 48.0]  # variance 16
    assert margin([30.0], bp) == pytest.approx(2 * (16 / 1 + 16 / 3) ** 0.5)  # one seed borrows BP's variance
    assert compare([30.0], bp) == -1 and compare([38.0], bp) == 0 and compare([60.0], bp) == 1


def test_each_question_picks_out_the_rows_beyond_the_margin_and_only_those():
    rows = [*rows_of("bp", "split-class", "naive", [0.20, 0.20, 0.20], [0.99, 0.99, 0.99]),
            *rows_of("bp", "split-class", "replay", [0.90, 0.89, 0.91], [0.10, 0.11, 0.12]),
            *rows_of("nan", "split-class", "naive", [0.20, 0.20, 0.20], [0.98, 0.99, 0.99]),  # a tie
            *rows_of("nan", "split-class", "replay", [0.92, 0.92, 0.92], [0.05, 0.05, 0.05]),  # less
            row("local-random", "split-class", "naive", 0.20, 0.90),  # 9 points less than bp's naive
            row("local-random", "split-class", "replay", 0.70, 0.30),  # helped less than bp
            row("fa", "split-class", "naive", 0.20, 0.985),
            row("bp", "split-class", "replay", 0.5, 0.5, stage="tune"),  # tuning runs are not counted
            row("fa", "split-class", "replay", 0.9, 0.1, status="failed")]
    cells = collect(rows)
    assert cells["bp", "split-class", "replay"].forgetting == pytest.approx((10.0, 11.0, 12.0))
    assert ("fa", "split-class", "replay") not in cells
    text = "\n".join(findings_lines(rows, ["bp", "nan", "local-random", "fa"], ["split-class"],
                                    ["naive", "joint", "replay"]))
    naive_row = next(line for line in text.splitlines() if line.startswith("| split-class | `naive` |"))
    assert "`local-random` 90.0 (20.0)" in naive_row and "`nan`" not in naive_row and "`fa`" not in naive_row
    same, best = [line for line in text.splitlines() if line.startswith("| split-class | `replay` | 11.0 (90.0)")]
    assert same.endswith("| `nan` 5.0 (92.0) |")  # under replay, as BP
    assert best.endswith("| `nan` 5.0 (92.0), replay |")  # against BP's best strategy (replay): local-random not

    assert "in 1 cell(s), more in 0, a tie in 1" in "\n".join(nan_lines(cells, ["split-class"], ["naive", "replay"]))
    assert "| `bp` | - | +70.0 |" in text and "| `local-random` | - | +50.0 |" in text  # no joint runs: "-"
    assert "| *median of the other rules* | - | +61.0 |" in text  # nan +72, local-random +50 (fa has no replay)


def test_without_bp_runs_there_is_nothing_to_compare_with():
    assert "No finished BP runs" in findings_lines([row("fa", "split-class", "naive", 0.2, 0.9)], ["fa"],
                                                   ["split-class"], ["naive"])[0]
