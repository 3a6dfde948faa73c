"""The claims suite: every claim has a case, the LFNN case holds the authors' setting, a tiny run writes a
verdict row per claim, and bad options are one line with exit code 2."""

from __future__ import annotations

import csv
import json
from dataclasses import replace
from pathlib import Path

import pytest

from localcredit.bench.claims_cases import CLAIMS, LFNN_AUTHORS, claims_plan
from localcredit.bench.claims_figures import NOT_RUN, UNTESTABLE
from localcredit.bench.claims_runs import ClaimRun, final_runs, train_arguments
from localcredit.bench.claims_suite import ClaimsOptions, run_claims
from localcredit.bench.plan import Run
from localcredit.bench.published import SEED_CLAIMS
from localcredit.cli import main
from localcredit.nets.architectures import NetSpec

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_every_claim_has_a_case_a_published_figure_and_a_source():
    plan = claims_plan(quick=False, present=set())
    cases = {case.name: case for case in plan.cases}
    for claim in CLAIMS:
        assert claim.key in cases[claim.case].claims
        assert SEED_CLAIMS[claim.key].figure and SEED_CLAIMS[claim.key].source
    answered = [key for case in plan.cases for key in case.claims]
    assert sorted(answered) == sorted(c.key for c in CLAIMS)  # one case per claim, none left over
    assert all(case.arms or case.measures for case in plan.cases if case.name != "external")


def test_the_lfnn_case_holds_the_authors_setting_field_by_field(tmp_path):
    plan = claims_plan(quick=False, present=set())
    case = plan.case("lfnn")
    main_rows = {arm.label: arm for arm in case.arms if arm.role == "main"}
    assert set(main_rows) == {"lfnn-l", "lfnn", "bp"} and all(arm.seeds >= 3 for arm in main_rows.values())
    for label in ("lfnn-l", "lfnn"):
        job = final_runs(plan, main_rows[label], tmp_path)[0]
        assert job is not None
        argv = train_arguments(job, tmp_path, threads=1)
        flags = dict(zip(argv[1::2], argv[2::2]))
        sets = [argv[i + 1] for i, word in enumerate(argv) if word == "--set"]
        assert flags["--rule"] == label and flags["--data"] == "mnist"
        assert flags["--arch"] == LFNN_AUTHORS["arch"] == "mlp"
        assert flags["--hidden"] == "256,128" and flags["--epochs"] == "50" and flags["--batch-size"] == "128"
        assert flags["--optimizer"] == "adam" and float(flags["--lr"]) == LFNN_AUTHORS["lr"] == 5e-4
        assert "workers=32" in sets and "delta=0.7" in sets
        assert "--augment" not in flags and "--lr-schedule" not in flags  # none stated by the authors
    # the BP row trains the same network and recipe, and the ablations change one thing each
    bp = final_runs(plan, main_rows["bp"], tmp_path)[0]
    assert bp is not None and "--set" not in train_arguments(bp, tmp_path, 1)
    ablations = [arm for arm in case.arms if arm.role == "ablation"]
    assert {"lfnn-l workers=8", "lfnn-l delta=0.5", "lfnn-l lr=1e-3", "lfnn-l fashion-mnist"} <= {a.label for a in ablations}
    assert {m.kind for m in case.measures} == {"readout"}


def test_quick_plan_keeps_every_case_at_a_tiny_budget():
    plan = claims_plan(quick=True, present=set())
    assert {case.name for case in plan.cases} == {case.name for case in claims_plan(present=set()).cases}
    for setting in plan.settings.values():
        assert setting.epochs <= 2 and setting.seeds == 1 and setting.tune_epochs == 0
        assert setting.limit_train is not None and setting.limit_train <= 2000
    assert all(arm.seeds == 1 for case in plan.cases for arm in case.arms)


def tiny_plan():
    """The quick plan on a 32-unit MLP and 300 images, its nan and memory cases cut to MNIST and two rows."""
    plan = claims_plan(quick=True, seeds=1, present=set())
    settings = {name: replace(s, network=NetSpec(arch="mlp", hidden=[32]) if s.arch == "mlp" else s.network,
                              limit_train=300, epochs=1) for name, s in plan.settings.items()}
    nan = plan.case("nan")
    nan = replace(nan, arms=tuple(replace(a, datasets=("mnist",)) for a in nan.arms),
                  measures=tuple(replace(m, arm=replace(m.arm, datasets=("mnist",))) for m in nan.measures
                                 if m.data == "mnist"))
    memory = plan.case("memory")
    memory = replace(memory, measures=tuple(m for m in memory.measures if m.arm.setting == "mlp"
                                            and m.arm.label in ("bp", "local-random")))
    cases = tuple({"nan": nan, "memory": memory}.get(c.name, c) for c in plan.cases)
    return replace(plan, settings=settings, cases=cases)


@pytest.mark.slow
def test_tiny_run_of_two_cases_writes_a_verdict_row_per_claim(tmp_path, monkeypatch):
    from localcredit.bench import claims_verdicts_bp

    monkeypatch.setattr(claims_verdicts_bp, "CONTINUAL_RESULTS", ())  # the forgetting row reads the committed protocol runs
    plan = tiny_plan()
    options = ClaimsOptions(out=tmp_path, quick=True, cases=["nan", "memory"], workers=2, threads=1, progress=False,
                            command="pytest tiny claims")
    summary = run_claims(options, plan)
    assert summary["trained"] == 2 and summary["measured"] == 3

    report = (tmp_path / "RESULTS.md").read_text()
    verdicts = list(csv.DictReader(open(tmp_path / "verdicts.csv")))
    assert [v["claim"] for v in verdicts] == [c.text for c in CLAIMS]
    by_case = {v["case"]: v for v in verdicts}
    for claim in CLAIMS:
        assert f"| {claim.paper} | {claim.text.replace('|', chr(92) + '|')} |" in report
    equal = next(v for v in verdicts if v["case"] == "nan" and "equals" in v["claim"])
    assert equal["verdict"].startswith("quick budget, not a verdict") and "Quick budget" in equal["evidence"]
    assert "localcredit train --rule nan-bp --data mnist --arch mlp --hidden 32" in equal["command"]
    assert by_case["memory"]["verdict"] == NOT_RUN  # its VGG rows were left out of the tiny plan
    assert by_case["lfnn"]["verdict"] == NOT_RUN and "--cases lfnn" in by_case["lfnn"]["evidence"]
    assert by_case["external"]["verdict"] == UNTESTABLE
    forgetting = next(v for v in verdicts if "forgets" in v["claim"])
    assert "results/continual" in forgetting["evidence"]  # the row names its source
    assert (tmp_path / "nan.png").read_bytes()[:8] == PNG_MAGIC
    rows = list(csv.DictReader(open(tmp_path / "results.csv")))
    finished = [r for r in rows if r["status"] == "ok"]
    assert {r["rule"] for r in finished} == {"bp", "nan-bp"} and all(r["cases"] == "nan" for r in finished)
    assert "step memory" in report and "pytest tiny claims" in report

    stamps = sorted(p.stat().st_mtime_ns for p in tmp_path.glob("**/result.json"))
    summary = run_claims(replace(options, resume=True), plan)  # --resume keeps every finished run and measurement
    assert summary["trained"] == 0 and summary["skipped"] == 2 and summary["measured"] == 0
    assert sorted(p.stat().st_mtime_ns for p in tmp_path.glob("**/result.json")) == stamps


@pytest.mark.parametrize("argv, message", [
    (["--cases", "nope"], "unknown case 'nope' of suite claims"),
    (["--rules", "bp"], "--rules: not for the claims suite"),
    (["--seeds", "0"], "--seeds must be at least 1"),
    (["--resume", "--overwrite"], "--resume and --overwrite contradict"),
])
def test_bad_options_exit_2_with_one_line(argv, message, tmp_path, capsys):
    code = main(["bench", "--suite", "claims", "--quick", "--out", str(tmp_path / "out"), *argv])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_runs_shared_by_two_cases_train_once(tmp_path):
    plan = claims_plan(quick=False, present=set())
    folders = {}
    for name in ("bp-free", "fixed-random"):
        for arm in plan.case(name).arms:
            if arm.entry.rule == "local-random" and not arm.entry.options and arm.setting == "vgg":
                run = Run("final", arm.entry, "mnist", 0, 1e-3)
                folders[name] = ClaimRun(plan.settings[arm.setting], run).folder(Path(tmp_path))
    assert folders["bp-free"] == folders["fixed-random"]


def _write_result(folder: Path, accuracy: float) -> None:
    folder.mkdir(parents=True)
    (folder / "result.json").write_text(json.dumps({"status": "ok", "test_accuracy": accuracy, "epochs": 1,
                                                    "epochs_completed": 1}))


def test_tuning_widens_a_winning_edge_once_and_the_final_runs_take_the_choice(tmp_path):
    from localcredit.bench.claims_runs import chosen_lr, grid_of, tune_run, tuning_keys

    plan = claims_plan(quick=False, present=set())
    case = plan.case("fixed-random")
    arm = next(a for a in case.arms if a.label == "fa")
    key = ("mlp", arm.entry, "mnist")
    assert key in tuning_keys(plan, [case])
    setting = plan.settings["mlp"]
    lrs, complete = grid_of(plan, key, tmp_path)
    assert lrs == pytest.approx([1e-3 / 3, 1e-3, 3e-3]) and not complete and chosen_lr(plan, arm, "mnist", tmp_path) is None
    for lr in lrs:  # validation accuracy grows with the learning rate: the upper edge wins
        _write_result(tune_run(setting, arm.entry, "mnist", lr).folder(tmp_path), 0.5 + lr)
    lrs, complete = grid_of(plan, key, tmp_path)
    assert lrs == pytest.approx([1e-3 / 3, 1e-3, 3e-3, 9e-3]) and not complete  # one more value beyond it
    _write_result(tune_run(setting, arm.entry, "mnist", lrs[-1]).folder(tmp_path), 0.5 + lrs[-1])
    lrs, complete = grid_of(plan, key, tmp_path)
    assert complete and len(lrs) == 4  # lr_extensions = 1: no second widening although the edge won again
    assert chosen_lr(plan, arm, "mnist", tmp_path) == pytest.approx(9e-3)
    jobs = final_runs(plan, arm, tmp_path)
    assert [j.run.lr for j in jobs[:3] if j is not None] == pytest.approx([9e-3] * 3)
    assert jobs[3:] == [None] * 3  # Fashion-MNIST: not tuned yet, so no final run is planned there


def test_nan_forgetting_counts_a_difference_only_beyond_the_seeds_spread():
    from localcredit.bench.claims_figures import HOLDS, NOT
    from localcredit.bench.claims_verdicts_bp import _forgetting

    noisy = {"split-domain": {"nan": [0.50, 0.55, 0.60], "bp": [0.52, 0.57, 0.62]}}  # 2 points less, std 5
    verdict, lines = _forgetting(noisy, "test", "cmd")
    assert verdict.verdict == NOT and any("(a tie)" in line for line in lines)
    clear = {"split-domain": {"nan": [0.30, 0.31, 0.32], "bp": [0.50, 0.51, 0.52]}}
    assert _forgetting(clear, "test", "cmd")[0].verdict == HOLDS
