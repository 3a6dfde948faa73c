"""The benchmark: suites cover every registered rule, a tiny suite writes every output, re-runs skip."""

from __future__ import annotations

import csv
import json
from dataclasses import replace
from pathlib import Path

import pytest

from localcredit import rules
from localcredit.architectures import NetSpec
from localcredit.errors import UserError
from localcredit.bench import (SUITES, BenchOptions, Entry, Run, Suite, entries, final_runs, initial_grid, run_bench,
                               train_arguments, tune, tuning_runs, validate_suite, widen)
from localcredit.bench_report import PLOTS
from localcredit.cli import main
from localcredit.rules.backprop import Backprop
from localcredit.rules.base import _REGISTRY, register

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

TINY = Suite("tiny", "test suite", datasets=("fashion-mnist",), network=NetSpec(hidden=[64, 64]), epochs=2, seeds=1,
             limit_train=3000, tune_epochs=1, lr_span=1, lr_extensions=0)


@pytest.mark.parametrize("name", sorted(SUITES))
def test_every_suite_builds_a_valid_config_for_every_registered_rule(name):
    chosen = entries(rules.available())
    assert {e.rule for e in chosen} == set(rules.available())
    validate_suite(SUITES[name], chosen)  # builds every network and rule; raises on a bad config
    suite = SUITES[name]
    grids = {(e, d): initial_grid(e, suite) for e in chosen for d in suite.datasets}
    for run in [*tuning_runs(grids), *final_runs(suite, chosen, {key: 1e-3 for key in grids})]:
        argv = train_arguments(run, suite, Path("out"), threads=1)
        assert argv[argv.index("--rule") + 1] == run.entry.rule


def test_bp_runs_on_every_network_a_rule_needs():
    chosen = entries(["gaitprop", "fa"])
    assert Entry("bp", "invertible") in chosen and Entry("bp", "mlp") in chosen
    assert Entry("bp", "invertible").label == "bp [invertible]"
    assert Entry("gaitprop", "invertible").label == "gaitprop"


def test_a_new_rule_is_picked_up_without_editing_bench_code():
    @register("bench-test-rule")
    class NewRule(Backprop):
        """A rule registered only inside this test."""

    try:
        chosen = entries(rules.available())
        assert Entry("bench-test-rule", "mlp") in chosen
        validate_suite(SUITES["quick"], chosen)
    finally:
        del _REGISTRY["bench-test-rule"]


def _write_result(folder: Path, status: str, accuracy: float | None) -> None:
    folder.mkdir(parents=True)
    (folder / "result.json").write_text(json.dumps({"status": status, "test_accuracy": accuracy,
                                                    "epochs": 1, "epochs_completed": 1}))


def test_tuning_picks_the_best_validation_accuracy_and_widens_a_grid_whose_edge_wins(tmp_path):
    suite = replace(TINY, lr_span=1, lr_extensions=2)
    bp, fa = Entry("bp", "mlp"), Entry("fa", "mlp")
    # Validation accuracy as a function of the learning rate: bp peaks at 9e-3 (beyond the first grid),
    # fa is flat between 1/3e-3 and 1e-3 and diverges above.
    outcome = {bp: lambda lr: ("ok", 0.8 + min(lr, 9e-3)), fa: lambda lr: ("ok", 0.8) if lr < 2e-3 else ("diverged", None)}
    rounds = []

    def fake_train(runs):
        rounds.append(len(runs))
        for run in runs:
            if not run.folder(tmp_path).exists():
                _write_result(run.folder(tmp_path), *outcome[run.entry](run.lr))

    chosen, runs = tune(suite, [bp, fa], tmp_path, fake_train)
    assert chosen[bp, "fashion-mnist"] == pytest.approx(9e-3)
    assert chosen[fa, "fashion-mnist"] == 1e-3  # a tie goes to the value closest to the default
    assert sorted(r.lr for r in runs if r.entry == bp) == pytest.approx([1e-3 / 3, 1e-3, 3e-3, 9e-3, 27e-3])
    assert rounds == [6, 7, 8]  # two widening rounds for bp, none for fa


def test_widen_only_at_an_edge():
    assert widen([1, 3, 9], 9, 3) == 27
    assert widen([1, 3, 9], 1, 3) == pytest.approx(1 / 3)
    assert widen([1, 3, 9], 3, 3) is None


def test_tiny_suite_writes_every_output_and_a_rerun_skips_finished_runs(tmp_path):
    options = BenchOptions(suite=TINY, out=tmp_path, rule_names=["bp", "local-random"], workers=2, threads=1,
                           progress=False, command="pytest tiny suite")
    summary = run_bench(options)
    assert summary["trained"] == 2 * 3 + 2 and summary["skipped"] == 0

    rows = list(csv.DictReader(open(tmp_path / "results.csv")))
    assert len(rows) == 8
    assert {r["stage"] for r in rows} == {"tune", "final"}
    assert all(r["status"] == "ok" for r in rows)
    finals = [r for r in rows if r["stage"] == "final"]
    assert {r["rule"] for r in finals} == {"bp", "local-random"}
    assert all(float(r["accuracy"]) > 0.5 for r in finals)  # 3000 images, 2 epochs: far above chance (0.1)
    assert all(r["evaluated_on"] == "test" for r in finals)
    assert all(r["evaluated_on"] == "validation" for r in rows if r["stage"] == "tune")
    bp = next(r for r in finals if r["rule"] == "bp")
    assert float(bp["step_time_ratio_to_bp"]) == 1.0 and float(bp["epoch_time_ratio_to_bp"]) == 1.0
    assert [float(c) for c in bp["alignment_final"].split()] == pytest.approx([1, 1, 1], abs=1e-5)
    local = next(r for r in finals if r["rule"] == "local-random")
    assert float(local["step_memory_ratio_to_bp"]) > 0
    assert len(local["alignment_final"].split()) == 3

    assert not list(tmp_path.glob("runs/tune/**/checkpoint.pt"))  # tuning weights are not kept
    assert len(list(tmp_path.glob("runs/final/**/checkpoint.pt"))) == 2

    report = (tmp_path / "RESULTS.md").read_text()
    for text in ("`bp`", "`local-random`", "90.8", "validation accuracy", "pytest tiny suite"):
        assert text in report
    for name in PLOTS:
        assert (tmp_path / name).read_bytes()[:8] == PNG_MAGIC

    results = sorted(tmp_path.glob("runs/**/result.json"))
    stamps = [p.stat().st_mtime_ns for p in results]
    report_bytes = (tmp_path / "RESULTS.md").read_bytes()
    with pytest.raises(UserError, match="already holds a bench .*--resume.*--overwrite"):
        run_bench(options)  # the same command again, without saying what to do with the finished bench
    assert [p.stat().st_mtime_ns for p in results] == stamps and (tmp_path / "RESULTS.md").read_bytes() == report_bytes
    again = run_bench(replace(options, resume=True))
    assert again["trained"] == 0 and again["skipped"] == 8
    assert [p.stat().st_mtime_ns for p in results] == stamps


@pytest.mark.parametrize("argv, message", [
    (["bench", "--suite", "nope"], "unknown suite"),
    (["bench", "--suite", "smoke", "--rules", "bp,nope"], "unknown rule"),
    (["bench", "--suite", "smoke", "--seeds", "0"], "--seeds must be at least 1"),
    (["bench", "--suite", "smoke", "--workers", "0"], "--workers must be at least 1"),
])
def test_bad_bench_options_exit_2_with_one_line_and_write_nothing(argv, message, tmp_path, capsys):
    out = tmp_path / "bench"
    assert main([*argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_a_suite_on_a_conv_network_builds_every_rule_and_passes_its_options_on():
    suite = replace(TINY, network=NetSpec(arch="vgg", channels="4,M", hidden=[16]))
    chosen = entries(rules.available(), suite.arch)
    assert Entry("fa", "vgg") in chosen and Entry("gaitprop", "invertible") in chosen
    assert Entry("bp", "vgg") in chosen and Entry("bp", "invertible") in chosen
    validate_suite(suite, chosen)
    argv = train_arguments(Run("final", Entry("fa", "vgg"), "fashion-mnist", 0, 1e-3), suite, Path("out"), threads=1)
    assert argv[argv.index("--arch") + 1] == "vgg" and argv[argv.index("--channels") + 1] == "4,M"
    invertible = train_arguments(Run("final", Entry("gaitprop", "invertible"), "fashion-mnist", 0, 1e-4), suite,
                                 Path("out"), threads=1)
    assert "--channels" not in invertible and invertible[invertible.index("--hidden") + 1] == "16"
