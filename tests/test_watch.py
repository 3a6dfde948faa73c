"""Runs you can watch: --log csv | tensorboard while a run trains, and `localcredit plot` of finished runs."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest

from localcredit.cli import main
from localcredit.experiment import RunSpec, build_rule
from localcredit.training.config import TrainConfig
from localcredit.training.loggers import numeric_leaves
from localcredit.training.runfiles import RESULT
from localcredit.training.trainer import Parallelism, Trainer

from .conftest import subset

#: 512 training images of Fashion-MNIST (4 steps an epoch) and 500 test images, from an .npz that loads at once.
TINY = ["--limit-train", "512", "--hidden", "32", "--quiet"]


@pytest.fixture(scope="module")
def npz(fashion_3k_npz) -> str:
    return fashion_3k_npz


def train(npz: str, out: Path, *argv: str) -> None:
    assert main(["train", "--data", npz, *TINY, "--out", str(out), *argv]) == 0


def rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def one_line_error(capsys, argv: list[str], expect: str) -> str:
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("localcredit: error: ") and expect in err, err
    return err


def folder_files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, npz) -> dict[str, Path]:
    """Two finished runs: fa with --log csv over 2 epochs, gaitprop (it has rule statistics) with --log tensorboard."""
    root = tmp_path_factory.mktemp("runs")
    train(npz, root / "fa", "--rule", "fa", "--epochs", "2", "--log", "csv")
    train(npz, root / "gaitprop", "--rule", "gaitprop", "--hidden", "32,32", "--epochs", "1", "--log", "tensorboard")
    return {"fa": root / "fa", "gaitprop": root / "gaitprop"}


# ----- --log -------------------------------------------------------------------------------------
def test_log_csv_writes_a_row_per_step_and_per_epoch(runs):
    steps, epochs = rows(runs["fa"] / "logs" / "steps.csv"), rows(runs["fa"] / "logs" / "epochs.csv")
    assert [int(r["step"]) for r in steps] == list(range(1, 9))  # 512 samples, batches of 128, 2 epochs
    assert {"step", "loss", "lr", "samples_per_second"} <= set(steps[0])
    assert all(float(r["samples_per_second"]) > 0 and float(r["lr"]) == 1e-3 for r in steps)
    assert [(r["epoch"], r["step"]) for r in epochs] == [("1", "4"), ("2", "8")]
    assert {"test_accuracy", "train_loss", "seconds"} <= set(epochs[0])
    result = json.loads((runs["fa"] / RESULT).read_text())
    assert [float(r["test_accuracy"]) for r in epochs] == result["test_accuracy_per_epoch"]
    assert [float(r["train_loss"]) for r in epochs] == result["train_loss_per_epoch"]
    assert result["log"] == "csv" and "log: csv" in (runs["fa"] / "config.yaml").read_text()


def test_log_tensorboard_writes_an_event_file_with_the_figures(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logs = runs["gaitprop"] / "logs"
    assert len(list(logs.glob("events.out.tfevents.*"))) == 1
    events = EventAccumulator(str(logs))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"step/loss", "step/lr", "step/samples_per_second", "epoch/test_accuracy", "epoch/train_loss",
            "epoch/seconds", "rule/orthogonality_error/0", "rule/steps"} <= tags
    assert [e.step for e in events.Scalars("step/loss")] == [1, 2, 3, 4]
    result = json.loads((runs["gaitprop"] / RESULT).read_text())
    (accuracy,) = events.Scalars("epoch/test_accuracy")
    assert accuracy.step == 4 and accuracy.value == pytest.approx(result["test_accuracy"])


def test_numeric_leaves_flattens_statistics_and_skips_what_is_not_a_number():
    statistics = {"alignment": [0.5, 0.25], "per_block": [{"fraction": 1, "name": "x"}], "steps": 3,
                  "meaning": "text", "flag": True, "missing": None}
    assert numeric_leaves(statistics, "rule") == {"rule/alignment/0": 0.5, "rule/alignment/1": 0.25,
                                                  "rule/per_block/0/fraction": 1.0, "rule/steps": 3.0}


class CrashAt(Parallelism):
    """Dies in its ``at``-th step, as with kill -9: only what was saved before remains."""

    def __init__(self, at: int):
        self.at, self.calls = at, 0

    def step(self, trainer, x, y):
        self.calls += 1
        if self.calls == self.at:
            raise RuntimeError("killed")
        return super().step(trainer, x, y)


def test_a_resumed_run_logs_on_from_its_checkpoint_without_duplicated_steps(fashion, tmp_path):
    data = subset(fashion, 512, 500)

    def trainer(parallel=None) -> Trainer:
        spec = RunSpec(rule="fa", data=data.name, hidden=[16])
        config = TrainConfig(epochs=2, batch_size=64, progress=False, checkpoint_every="3", log="csv")
        return Trainer(build_rule(spec, data), data, config, out_dir=tmp_path, run_info={"rule": "fa"},
                       parallel=parallel)

    with pytest.raises(RuntimeError, match="killed"):
        trainer(CrashAt(12)).fit()  # 8 steps an epoch; the last checkpoint at step 9, steps 10 and 11 logged after it
    assert [int(r["step"]) for r in rows(tmp_path / "logs" / "steps.csv")] == list(range(1, 12))
    trainer().fit(resume=True)
    assert [int(r["step"]) for r in rows(tmp_path / "logs" / "steps.csv")] == list(range(1, 17))
    assert [r["epoch"] for r in rows(tmp_path / "logs" / "epochs.csv")] == ["1", "2"]


def test_a_run_may_be_resumed_with_another_log(npz, tmp_path):
    train(npz, tmp_path, "--rule", "fa", "--epochs", "1")  # started without watching it
    train(npz, tmp_path, "--rule", "fa", "--epochs", "2", "--log", "csv", "--resume")
    assert [(r["epoch"], r["step"]) for r in rows(tmp_path / "logs" / "epochs.csv")] == [("2", "8")]
    assert [int(r["step"]) for r in rows(tmp_path / "logs" / "steps.csv")] == [5, 6, 7, 8]


def test_log_tensorboard_without_tensorboard_is_one_line_and_writes_nothing(npz, capsys, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if tensorboard were not installed
    argv = ["train", "--rule", "fa", "--data", npz, *TINY, "--log", "tensorboard", "--out", str(tmp_path / "run")]
    one_line_error(capsys, argv, "pip install 'localcredit[log]'")
    assert not (tmp_path / "run").exists()


def test_an_unknown_log_is_one_line(npz, capsys, tmp_path):
    argv = ["train", "--rule", "fa", "--data", npz, *TINY, "--log", "wandb", "--out", str(tmp_path / "run")]
    one_line_error(capsys, argv, "--log must be one of none, csv, tensorboard")
    assert not (tmp_path / "run").exists()


# ----- plot --------------------------------------------------------------------------------------
def test_plot_draws_the_runs_into_one_image(runs, tmp_path, capsys):
    out = tmp_path / "curves.png"
    assert main(["plot", str(runs["fa"]), str(runs["gaitprop"]), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "2 run(s)" in capsys.readouterr().out


def bad_plots(runs: dict[str, Path], tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    (tmp_path / "empty").mkdir()
    (tmp_path / "no-epochs").mkdir()
    (tmp_path / "no-epochs" / RESULT).write_text(json.dumps({"rule": "fa", "test_accuracy_per_epoch": []}))
    out = ["--out", str(tmp_path / "curves.png")]
    return {"no run": (["plot", *out], "at least one RUN"),
            "no result.json": (["plot", str(runs["fa"]), str(tmp_path / "empty"), *out], "holds no result.json"),
            "no per-epoch figures": (["plot", str(tmp_path / "no-epochs"), *out], "no per-epoch figures"),
            "--out in a missing folder": (["plot", str(runs["fa"]), "--out", str(tmp_path / "nope" / "c.png")],
                                          "does not exist")}


@pytest.mark.parametrize("case", ["no run", "no result.json", "no per-epoch figures", "--out in a missing folder"])
def test_bad_plot_input_is_one_line_and_writes_nothing(runs, tmp_path, capsys, case):
    argv, expect = bad_plots(runs, tmp_path)[case]
    before = folder_files(tmp_path)
    one_line_error(capsys, argv, expect)
    assert folder_files(tmp_path) == before
