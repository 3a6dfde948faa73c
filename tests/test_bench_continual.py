"""The continual suite: its plan (grid, seeds, tuning), a tiny real bench end to end, re-runs, bad input."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from localcredit import rules
from localcredit.bench.continual_report import plot_files
from localcredit.bench.continual_suite import (
    CONTINUAL,
    CONTINUAL_QUICK,
    DIVERGED,
    MEMORY,
    SINGLED_OUT,
    ContinualBenchOptions,
    ContinualSuite,
    choose,
    continual_arguments,
    final_runs,
    is_finished,
    run_continual_bench,
    suite_rows,
    tuning_runs,
    with_seeds,
)
from localcredit.bench.published import SPLIT_MNIST_BP
from localcredit.cli import main
from localcredit.continual import strategies

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SPLIT = ("split-task", "split-domain", "split-class")


def test_the_full_suite_runs_every_rule_under_every_strategy_in_the_three_split_scenarios():
    rows = suite_rows(CONTINUAL)
    assert {e.rule for e in rows} == set(rules.available())
    assert any(e.label == "bp [invertible]" for e in rows)  # BP beside the rules that need that network
    final = final_runs(CONTINUAL, rows, {})
    cells = {(r.entry, r.scenario, r.strategy) for r in final}
    expected = {(e, sc, s) for e in rows for sc in SPLIT for s in strategies.available()
                if (s, sc) != ("lwf", "split-task")}  # LwF refuses task-incremental learning: left out, not failed
    assert cells == expected
    for run in final:
        seeds = 3 if run.entry.name in SINGLED_OUT and run.entry.arch == "mlp" else 1
        assert run.seed < seeds
    assert sum(r.seed == 2 for r in final) == len(SINGLED_OUT) * len(expected) // len(rows)
    argv = continual_arguments(next(r for r in final if r.strategy == "replay"), CONTINUAL, Path("OUT"), 1)
    text = " ".join(argv)
    for protocol in ("--data mnist", "--hidden 400,400", "--optimizer adam", "--lr 0.001", "--batch-size 128",
                     "--steps-per-task 300", "--tasks 5", "--strategy-set size=1000", "--threads 1", "--quiet"):
        assert protocol in text
    assert "--out OUT/runs/split-task/replay/bp-seed0" in text


def test_the_full_suite_tunes_each_strength_on_the_validation_split_with_the_same_grid_for_every_rule():
    rows = suite_rows(CONTINUAL, ["bp", "local-random"])
    tune = tuning_runs(CONTINUAL, rows)
    assert {r.strategy for r in tune} == {"ewc", "online-ewc", "si", "lwf"}
    assert {(r.strategy, r.scenario) for r in tune if r.strategy == "lwf"} == {("lwf", "split-domain"),
                                                                                ("lwf", "split-class")}
    for run in tune:
        argv = continual_arguments(run, CONTINUAL, Path("OUT"), 1)
        assert argv[argv.index("--data") + 1] == "val:mnist" and argv[argv.index("--steps-per-task") + 1] == "100"
        assert run.seed == 0
    grids = {}
    for run in tune:
        grids.setdefault((run.entry.rule, run.scenario, run.strategy), []).append(run.tuned)
    assert all(len(values) == 3 for values in grids.values())
    assert grids["bp", "split-domain", "ewc"] == grids["local-random", "split-domain", "ewc"] == [
        "strength=1e6", "strength=1e8", "strength=1e10"]
    online = next(r for r in tune if r.strategy == "online-ewc" and r.scenario == "split-domain")
    assert "gamma=0.7" in online.options  # the authors' decay, kept fixed


def _finished(folder: Path, accuracy: float) -> None:
    folder.mkdir(parents=True)
    (folder / "result.json").write_text(json.dumps({"status": "finished", "average_accuracy": accuracy}))


def test_the_best_validation_accuracy_is_chosen_and_a_diverged_value_never(tmp_path):
    rows = suite_rows(CONTINUAL, ["bp"])
    tune = [r for r in tuning_runs(CONTINUAL, rows) if r.strategy == "si" and r.scenario == "split-class"]
    _finished(tune[0].folder(tmp_path), 0.3)
    _finished(tune[1].folder(tmp_path), 0.2)
    tune[2].folder(tmp_path).mkdir(parents=True)
    (tune[2].folder(tmp_path) / DIVERGED).write_text("localcredit: training diverged\n")
    assert is_finished(tune[2].folder(tmp_path))  # diverged runs are not run again
    choice = choose(CONTINUAL, tune, tmp_path)
    assert choice == {(rows[0], "split-class", "si"): 0.5}
    final = [r for r in final_runs(CONTINUAL, rows, choice) if r.strategy == "si" and r.scenario == "split-class"]
    assert final[0].tuned == "c=0.5" and "c=0.5" in final[0].options


def test_the_quick_suite_is_three_rules_three_strategies_two_scenarios_one_seed_300_steps_untuned():
    rows = suite_rows(CONTINUAL_QUICK)
    assert [e.label for e in rows] == ["bp", "local-random", "lfnn-l"]
    assert tuning_runs(CONTINUAL_QUICK, rows) == []
    final = final_runs(CONTINUAL_QUICK, rows, {})
    assert len(final) == 3 * 3 * 2 and {r.seed for r in final} == {0}
    assert {r.strategy for r in final} == {"naive", "ewc", "replay"}
    assert {r.scenario for r in final} == {"split-task", "split-class"}
    argv = continual_arguments(final[0], CONTINUAL_QUICK, Path("OUT"), 1)
    assert argv[argv.index("--steps-per-task") + 1] == "300" and "--log" not in argv
    logged = continual_arguments(final[0], CONTINUAL_QUICK, Path("OUT"), 1, ["--log", "csv"])
    assert logged[logged.index("--log") + 1] == "csv"  # the bench's --log, passed on
    assert with_seeds(CONTINUAL_QUICK, 2).seeds_of(rows[1]) == 2


def test_published_figures_are_bps_on_split_mnist_and_say_they_are_quoted():
    assert SPLIT_MNIST_BP["naive", "split-class"][0].accuracy == 19.90
    assert [p.accuracy for p in SPLIT_MNIST_BP["replay", "split-class"]] == [88.79]
    assert [p.text for p in SPLIT_MNIST_BP["ewc", "split-task"]] == ["98.6"]
    assert all("as quoted by" in p.source for values in SPLIT_MNIST_BP.values() for p in values)


TINY = ContinualSuite("tiny", "test suite", hidden=(32,), steps_per_task=5, limit_train=2000,
                      scenarios=("split-class",), strategies=("replay",), rules=("bp",), singled_out_seeds=1,
                      strategy_options=MEMORY, published=SPLIT_MNIST_BP)


def test_a_tiny_suite_writes_every_output_resumes_an_unfinished_run_and_skips_finished_ones(tmp_path):
    options = ContinualBenchOptions(suite=TINY, out=tmp_path, rule_names=None, workers=2, threads=1, progress=False,
                                    command="localcredit bench --suite tiny")
    summary = run_continual_bench(options)  # one real run: a process start costs seconds on a busy machine
    assert summary["trained"] == 1 and summary["skipped"] == 0
    assert sorted(summary["files"]) == sorted(["results.csv", "RESULTS.md", *plot_files(TINY)])
    for name in plot_files(TINY):
        assert (tmp_path / name).read_bytes()[:8] == PNG_MAGIC
    with open(tmp_path / "results.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["rule"], r["strategy"], r["scenario"], r["seed"], r["status"]) for r in rows] == [
        ("bp", "replay", "split-class", "0", "finished")]
    assert 0 <= float(rows[0]["average_accuracy"]) <= 1 and rows[0]["forgetting"] and float(rows[0]["seconds"]) > 0
    assert rows[0]["strategy_options"] == "size=1000" and json.loads(rows[0]["strategy_config"])["size"] == 1000
    report = (tmp_path / "RESULTS.md").read_text()
    assert "localcredit bench --suite tiny" in report and "*published, BP*" in report
    assert "88.79 [" in report and "as quoted by" in report  # ER's 2022 figure beside bp's row, with its source
    # A run that lost its result after its last checkpoint (as if stopped there) is resumed, not started over.
    run = tmp_path / "runs/split-class/replay/bp-seed0"
    (run / "result.json").unlink()
    again = run_continual_bench(ContinualBenchOptions(**{**options.__dict__, "resume": True}))
    assert again["trained"] == 1 and (run / "result.json").exists()
    commands = [line for line in (run / "log.txt").read_text().splitlines() if line.startswith("$ localcredit")]
    assert len(commands) == 2 and commands[-1].endswith("--resume")
    # Once more: the finished run is skipped (no process starts), the report is rewritten.
    (tmp_path / "RESULTS.md").unlink()
    third = run_continual_bench(ContinualBenchOptions(**{**options.__dict__, "resume": True}))
    assert third["trained"] == 0 and third["skipped"] == 1 and (tmp_path / "RESULTS.md").exists()
    assert len([line for line in (run / "log.txt").read_text().splitlines() if line.startswith("$ ")]) == 2


@pytest.mark.parametrize("argv, message", [
    (["--rules", "bp,nosuchrule"], "unknown rule 'nosuchrule'"),
    (["--quick", "--estimate"], "not for the continual suite"),
])
def test_bad_continual_bench_input_exits_2_with_one_line_and_writes_nothing(argv, message, tmp_path, capsys):
    out = tmp_path / "bench"
    assert main(["bench", "--suite", "continual", *argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_quick_is_for_the_continual_suite_only(tmp_path, capsys):
    assert main(["bench", "--suite", "smoke", "--quick", "--out", str(tmp_path / "b")]) == 2
    assert "--quick applies to --suite continual" in capsys.readouterr().err
