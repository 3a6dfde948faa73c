"""The benchmark: suites cover every registered rule, a tiny suite writes every output, re-runs skip."""

from __future__ import annotations

import csv
import json
from dataclasses import replace
from pathlib import Path

import pytest

from localcredit import rules
from localcredit.bench.plan import FRAMING, PAPER
from localcredit.bench.report import PLOTS, mixed_training_sets
from localcredit.bench.runner import (
    SUITES,
    BenchOptions,
    Entry,
    Run,
    Suite,
    default_lr,
    entries,
    final_runs,
    initial_grid,
    run_bench,
    spec_of,
    suite_entries,
    train_arguments,
    tune,
    tuning_runs,
    validate_suite,
    widen,
    with_seeds,
)
from localcredit.cli import main
from localcredit.errors import UserError
from localcredit.nets.architectures import VGG8B, NetSpec
from localcredit.rules.backprop import Backprop
from localcredit.rules.base import _REGISTRY, register

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

TINY = Suite("tiny", "test suite", datasets=("fashion-mnist",), network=NetSpec(hidden=[64, 64]), epochs=2, seeds=1,
             limit_train=3000, tune_epochs=1, lr_span=1, lr_extensions=0, published=FRAMING)


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


@pytest.mark.slow
def test_tiny_suite_writes_every_output_and_a_rerun_skips_finished_runs(tmp_path):
    # One learning rate to tune per rule (how tuning chooses among several is tested above, without training):
    # 4 runs of real training, each a process of its own.
    options = BenchOptions(suite=replace(TINY, lr_span=0), out=tmp_path, rule_names=["bp", "local-random"], workers=2,
                           threads=1, progress=False, command="pytest tiny suite", log="csv")
    summary = run_bench(options)
    assert summary["trained"] == 2 * 1 + 2 and summary["skipped"] == 0

    rows = list(csv.DictReader(open(tmp_path / "results.csv")))
    assert len(rows) == 4
    assert {r["stage"] for r in rows} == {"tune", "final"}
    assert all(r["status"] == "ok" for r in rows)
    finals = [r for r in rows if r["stage"] == "final"]
    assert {r["rule"] for r in finals} == {"bp", "local-random"}
    # 3000 images, 2 epochs at the default learning rate: far above chance (0.1). Measured bp 0.758, local-random
    # 0.466 (still rising steeply: 0.240 after epoch 1), so the bar is set well below the slower one.
    assert all(float(r["accuracy"]) > 0.3 for r in finals)
    assert all(r["evaluated_on"] == "test" for r in finals)
    assert all(r["evaluated_on"] == "validation" for r in rows if r["stage"] == "tune")
    bp = next(r for r in finals if r["rule"] == "bp")
    assert float(bp["step_time_ratio_to_bp"]) == 1.0 and float(bp["epoch_time_ratio_to_bp"]) == 1.0
    assert [float(c) for c in bp["alignment_final"].split()] == pytest.approx([1, 1, 1], abs=1e-5)
    local = next(r for r in finals if r["rule"] == "local-random")
    assert float(local["step_memory_ratio_to_bp"]) > 0
    assert len(local["alignment_final"].split()) == 3

    assert len(list(tmp_path.glob("runs/**/logs/steps.csv"))) == 4  # --log is passed on to every training
    assert not list(tmp_path.glob("runs/tune/**/checkpoint.pt"))  # tuning weights are not kept
    assert len(list(tmp_path.glob("runs/final/**/checkpoint.pt"))) == 2

    report = (tmp_path / "RESULTS.md").read_text()
    for text in ("`bp`", "`local-random`", "9.2", "validation accuracy", "pytest tiny suite"):
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
    assert again["trained"] == 0 and again["skipped"] == 4
    assert [p.stat().st_mtime_ns for p in results] == stamps


@pytest.mark.parametrize("argv, message", [
    (["bench", "--suite", "nope"], "unknown suite"),
    (["bench", "--suite", "smoke", "--rules", "bp,nope"], "unknown rule"),
    (["bench", "--suite", "smoke", "--seeds", "0"], "--seeds must be at least 1"),
    (["bench", "--suite", "smoke", "--workers", "0"], "--workers must be at least 1"),
    (["bench", "--suite", "smoke", "--log", "wandb"], "--log must be one of none, csv, tensorboard"),
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


# ----- the conv and paper suites ----------------------------------------------------------------------
GAIT_FAMILY = ("gaitprop", "itp", "tp")


def test_the_conv_suite_runs_every_registered_rule_and_the_gait_family_on_invertible_conv_beside_bp():
    conv = SUITES["conv"]
    chosen = suite_entries(conv)
    assert {e.rule for e in chosen} == set(rules.available())
    for name in GAIT_FAMILY:
        assert Entry(name, "invertible-conv") in chosen
    assert Entry("bp", "invertible-conv") in chosen and Entry("bp", "vgg") in chosen
    assert conv.datasets == ("fashion-mnist", "mnist") and conv.seeds == 2 and conv.tune_epochs
    validate_suite(conv, chosen)
    fashion = spec_of(Run("final", Entry("fa", "vgg"), "fashion-mnist", 0, 1e-3), conv)
    digits = spec_of(Run("final", Entry("fa", "vgg"), "mnist", 0, 1e-3), conv)
    assert fashion.augment == "crop:2,flip" and digits.augment == "crop:2"  # flip only where it keeps the meaning
    assert fashion.lr_schedule == "step" and fashion.lr_decay == 0.25


#: The published recipes, field by field (anokland/local-loss run_experiments.sh; the LFNN logs).
PUBLISHED_RECIPES = {
    "local-loss-mlp-mnist": dict(epochs=100, milestones=[50, 75, 89, 94], dropout=0.1, augment="crop:2",
                                 hidden=[1024, 1024, 1024], arch="mlp"),
    "local-loss-mlp-fashion-mnist": dict(epochs=200, milestones=[100, 150, 175, 188], dropout=0.025,
                                         augment="crop:2,flip", hidden=[1024, 1024, 1024], arch="mlp"),
    "local-loss-vgg8b-mnist": dict(epochs=100, milestones=[50, 75, 89, 94], dropout=0.2, augment="crop:2",
                                   channels=VGG8B, hidden=[1024], arch="vgg"),
    "local-loss-vgg8b-fashion-mnist": dict(epochs=200, milestones=[100, 150, 175, 188], dropout=0.1,
                                           augment="crop:2,flip", channels=VGG8B, hidden=[1024], arch="vgg"),
}


@pytest.mark.parametrize("case_name, expected", sorted(PUBLISHED_RECIPES.items()))
def test_the_local_loss_cases_train_the_published_recipe_field_by_field(case_name, expected):
    case = PAPER.case(case_name)
    chosen = suite_entries(case)
    assert [e.name for e in chosen] == ["bp", "pred", "sim", "predsim"]
    for entry in chosen:
        spec = spec_of(Run("final", entry, case.datasets[0], 0, default_lr(entry, case)), case)
        assert spec.optimizer == "adam" and spec.lr == 5e-4 and spec.batch_size == 128
        assert spec.lr_schedule == "step" and spec.lr_decay == 0.25 and spec.norm == "batch"
        for key, value in expected.items():
            assert getattr(spec, key) == value, (entry.name, key)
        # local-loss runs sim and predsim with --nonlin leakyrelu, bp and pred with its default ReLU
        assert spec.activation == ("leaky_relu" if entry.name in ("sim", "predsim") else None)
    assert [e.rule for e in chosen] == ["bp", "local-learned", "predsim", "predsim"]
    assert spec_of(Run("final", chosen[2], case.datasets[0], 0, 5e-4), case).options == ["loss=sim"]
    assert case.published["bp", case.datasets[0]].bp_free is False
    assert case.published["predsim", case.datasets[0]].bp_free is True


def test_the_lfnn_and_biotorch_cases_train_their_published_networks():
    lfnn = PAPER.case("lfnn-mlp-mnist")
    entry = suite_entries(lfnn)[0]
    spec = spec_of(Run("final", entry, "mnist", 0, default_lr(entry, lfnn)), lfnn)
    assert (spec.rule, spec.hidden, spec.epochs, spec.batch_size, spec.optimizer, spec.lr) == (
        "lfnn-l", [256, 128], 50, 128, "adam", 5e-4)
    assert spec.options == ["workers=32", "delta=0.7"] and spec.augment == "none"
    assert "not BP-free" in lfnn.published["lfnn-l", "mnist"].note
    lenet = PAPER.case("biotorch-lenet")
    assert [e.name for e in suite_entries(lenet)] == ["bp", "fa", "dfa"]
    assert lenet.published["fa", "fashion-mnist"].error == 13.06
    for case in PAPER.cases:
        validate_suite(case, suite_entries(case))


@pytest.mark.slow
def test_a_tiny_conv_suite_writes_results_with_the_published_column(tmp_path, capsys):
    # A narrow VGG: the report is under test, and evaluating the suite's own net on 10k test images is most of a run.
    tiny = replace(SUITES["conv"], datasets=("fashion-mnist",), limit_train=600, tune_limit_train=300, epochs=1,
                   lr_span=0, lr_extensions=0, recipe={**SUITES["conv"].recipe, "milestones": [1]},
                   network=NetSpec(arch="vgg", channels="4,M,8,M", hidden=[16]))
    options = BenchOptions(suite=with_seeds(tiny, 1), out=tmp_path, rule_names=["bp", "local-learned"], workers=2,
                           threads=1, progress=False, command="localcredit bench --suite conv --rules bp,local-learned")
    run_bench(options)
    report = (tmp_path / "RESULTS.md").read_text()
    for text in ("`local-learned`", "published error %", "4.53", "published BP-free", "MFLOP", "--augment crop:2,flip"):
        assert text in report, text


def test_bench_estimate_and_cases_on_the_command_line(tmp_path, capsys):
    assert main(["bench", "--suite", "paper", "--cases", "nope", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "unknown case 'nope'" in err and len(err.splitlines()) == 1
    assert main(["bench", "--suite", "conv", "--cases", "x", "--out", str(tmp_path)]) == 2
    assert "--cases applies to a suite with cases" in capsys.readouterr().err
    assert main(["bench", "--suite", "paper", "--cases", "lfnn-mlp-mnist", "--rules", "lfnn-l", "--estimate"]) == 0
    out = capsys.readouterr().out
    assert "lfnn-mlp-mnist" in out and "CPU hours" in out
    assert not list(tmp_path.iterdir())


def test_a_report_says_when_test_runs_of_one_data_set_trained_on_different_numbers_of_images():
    def final(label, data, size):
        return {"stage": "final", "data": data, "label": label, "train_samples": size}

    same = [final("bp", "mnist", 60000), final("fa", "mnist", 60000), final("bp", "fashion-mnist", 60000)]
    assert mixed_training_sets(same, ["mnist", "fashion-mnist"]) == []
    mixed = [*same, final("kp", "mnist", 8000), {**final("kp", "mnist", 100), "stage": "tune"}]
    (line, _), = [mixed_training_sets(mixed, ["mnist", "fashion-mnist"])]
    assert "Not comparable on mnist" in line and "8,000 images: kp; 60,000 images: bp, fa" in line
