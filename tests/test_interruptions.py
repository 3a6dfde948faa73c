"""Never lose a run: refusals that change nothing on disk, damaged files, mid-epoch checkpoints, and a
clean stop on SIGTERM / SIGINT that resumes to the uninterrupted run's numbers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from localcredit.cli import main
from localcredit.experiment import RunSpec, build_rule
from localcredit.training.config import TrainConfig
from localcredit.training.runfiles import (
    CHECKPOINT,
    LOCK,
    RESULT,
    Interrupted,
    check_not_held,
    hold_run_folder,
    parse_checkpoint_every,
)
from localcredit.training.trainer import Parallelism, Trainer

from .conftest import subset

TIMEOUT_S = 180


@pytest.fixture(scope="module")
def tiny(fashion):
    return subset(fashion, 3_000, 1_000)


@pytest.fixture(scope="module")
def npz(fashion_3k_npz) -> str:
    return fashion_3k_npz


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


# ----- stopping and crashing inside an epoch (in this process) -------------------------------------
class SignalAt(Parallelism):
    """One process, which receives ``signum`` during its ``at``-th step (as from a scheduler)."""

    def __init__(self, at: int, signum: int = signal.SIGTERM):
        self.at, self.signum, self.calls = at, signum, 0

    def step(self, trainer, x, y):
        self.calls += 1
        if self.calls == self.at:
            signal.raise_signal(self.signum)  # noted by the Trainer; this step still finishes
        return super().step(trainer, x, y)


class Crash(Exception):
    pass


class CrashAt(Parallelism):
    """One process that dies in its ``at``-th step (as with kill -9): only what was saved before remains."""

    def __init__(self, at: int):
        self.at, self.calls = at, 0

    def step(self, trainer, x, y):
        self.calls += 1
        if self.calls == self.at:
            raise Crash
        return super().step(trainer, x, y)


RECIPES = {
    # A local rule with leader counts, batch norm, dropout and augmentation: all of it must carry over.
    "lfnn-l": (dict(rule="lfnn-l", arch="vgg", channels="4,M,8,M", hidden=[16], dropout=0.1),
               dict(augment="crop:2,flip")),
    # BP under a schedule that changes the learning rate every epoch.
    "bp": (dict(rule="bp", hidden=[64], optimizer="sgd", lr=0.05), dict(lr_schedule="cosine")),
}


def trainer(data, name: str, out: Path | None, parallel: Parallelism | None = None, **loop) -> Trainer:
    network, recipe = RECIPES[name]
    spec = RunSpec(data=data.name, seed=4, **network)
    config = TrainConfig(epochs=3, batch_size=100, seed=4, progress=False, **recipe, **loop)
    return Trainer(build_rule(spec, data), data, config, out_dir=out, run_info={"rule": name}, parallel=parallel)


def assert_same_run(resumed: Trainer, resumed_result: dict, straight: Trainer, straight_result: dict) -> None:
    for key in ("test_accuracy_per_epoch", "train_loss_per_epoch", "learning_rates_after_epoch", "rule_statistics",
                "train_metrics_per_epoch"):
        assert resumed_result[key] == straight_result[key], key
    straight_state = straight.rule.state_dict()
    for key, value in resumed.rule.state_dict().items():  # batch-norm statistics and leader counts included
        assert torch.equal(value, straight_state[key]), key


@pytest.fixture(scope="module")
def straight(tiny):
    """The uninterrupted runs, without mid-epoch checkpoints."""
    runs = {}
    for name in RECIPES:
        run = trainer(tiny, name, None, checkpoint_every="off")
        runs[name] = (run, run.fit())
    return runs


@pytest.mark.parametrize("name", list(RECIPES))
def test_sigterm_in_a_step_writes_a_checkpoint_and_resuming_ends_as_the_uninterrupted_run(tiny, tmp_path, straight,
                                                                                          name):
    # Step 45 of 30 per epoch: epoch 2, step 15.
    with pytest.raises(Interrupted) as stopped:
        trainer(tiny, name, tmp_path, SignalAt(45), checkpoint_every="off").fit()
    assert stopped.value.exit_code == 143 and (stopped.value.epoch, stopped.value.step) == (2, 15)
    written = json.loads((tmp_path / RESULT).read_text())
    assert written["status"] == "interrupted" and written["interrupted_at"] == {"epoch": 2, "step": 15,
                                                                                 "signal": signal.SIGTERM}
    assert written["epochs_completed"] == 1
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is gone once the run has stopped
    resumed = trainer(tiny, name, tmp_path)
    assert_same_run(resumed, resumed.fit(resume=True), *straight[name])


def test_a_stop_between_two_reads_of_the_figures_checkpoints_them_all(tiny, tmp_path, straight):
    # Figures read every 4 steps (as on CUDA, every CUDA_SYNC_EVERY): the stop at epoch 2, step 15
    # falls between two reads, and the checkpoint must still hold the sums of all 15 steps.
    stopping = trainer(tiny, "bp", tmp_path, SignalAt(45), checkpoint_every="off")
    stopping.sync_every = 4
    with pytest.raises(Interrupted):
        stopping.fit()
    saved = torch.load(tmp_path / CHECKPOINT, weights_only=True)["epoch_progress"]
    assert saved["steps_done"] == 15 and set(saved["totals"]) == {"loss"}
    resumed = trainer(tiny, "bp", tmp_path)
    resumed.sync_every = 4
    assert_same_run(resumed, resumed.fit(resume=True), *straight["bp"])


@pytest.mark.parametrize("name", list(RECIPES))
def test_a_crash_loses_only_the_steps_after_the_last_mid_epoch_checkpoint(tiny, tmp_path, straight, name):
    with pytest.raises(Crash):
        trainer(tiny, name, tmp_path, CrashAt(41), checkpoint_every="7").fit()
    saved = torch.load(tmp_path / CHECKPOINT, weights_only=True)
    assert saved["epochs_done"] == 1 and saved["epoch_progress"]["steps_done"] == 5  # global step 35
    resumed = trainer(tiny, name, tmp_path, checkpoint_every="7")
    assert_same_run(resumed, resumed.fit(resume=True), *straight[name])


def test_sigint_exits_130(tiny, tmp_path):
    with pytest.raises(Interrupted) as stopped:
        trainer(tiny, "bp", tmp_path, SignalAt(3, signal.SIGINT)).fit()
    assert stopped.value.exit_code == 130 and "SIGINT" in str(stopped.value)


@pytest.mark.parametrize("text,expected", [("500", (500, None)), ("10m", (None, 600.0)), ("30s", (None, 30.0)),
                                           ("1.5h", (None, 5400.0)), ("off", (None, None))])
def test_checkpoint_every_accepts_steps_and_times(text, expected):
    every = parse_checkpoint_every(text)
    assert (every.steps, every.seconds) == expected


# ----- refusals: one line, exit 2, nothing changed on disk ----------------------------------------------
@pytest.fixture(scope="module")
def finished(npz, tmp_path_factory) -> tuple[Path, list[str]]:
    out = tmp_path_factory.mktemp("finished") / "run"
    argv = ["train", "--rule", "bp", "--data", npz, "--hidden", "16", "--epochs", "1", "--out", str(out), "--quiet"]
    assert main(argv) == 0
    return out, argv


def test_a_finished_run_survives_a_second_train_into_its_folder(finished, capsys):
    out, argv = finished
    before = folder_bytes(out)
    assert main(argv) == 2
    err = one_error_line(capsys)
    assert "already holds a run" in err and "--resume" in err and "--overwrite" in err
    assert main([*argv, "--resume", "--overwrite"]) == 2 and "contradict" in one_error_line(capsys)
    assert folder_bytes(out) == before


def test_overwrite_replaces_the_run(finished, tmp_path):
    out, argv = finished
    copy = tmp_path / "copy"
    copy.mkdir()
    for name, data in folder_bytes(out).items():
        (copy / name).write_bytes(data)
    argv = [a if a != str(out) else str(copy) for a in argv]
    assert main([*argv[:-1], "--seed", "1", "--overwrite", "--quiet"]) == 0
    assert json.loads((copy / RESULT).read_text())["seed"] == 1


def damage(path: Path, how: str) -> None:
    if how == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif how == "random bytes":
        path.write_bytes(np.random.default_rng(0).bytes(4096))
    elif how == "foreign":
        torch.save({"weights": torch.zeros(3)}, path)


@pytest.mark.parametrize("how", ["truncated", "random bytes", "foreign"])
def test_a_damaged_checkpoint_is_one_line_and_changes_nothing(finished, tmp_path, capsys, how):
    out, argv = finished
    copy = tmp_path / "run"
    copy.mkdir()
    for name, data in folder_bytes(out).items():
        (copy / name).write_bytes(data)
    damage(copy / CHECKPOINT, how)
    before = folder_bytes(copy)
    argv = [a if a != str(out) else str(copy) for a in argv]
    assert main([*argv, "--epochs", "2", "--resume"]) == 2
    err = one_error_line(capsys)
    assert str(copy / CHECKPOINT) in err and ("damaged" in err or "not a localcredit training checkpoint" in err), err
    assert folder_bytes(copy) == before


def test_a_damaged_result_file_in_a_bench_is_one_line(tmp_path, capsys):
    run = tmp_path / "runs" / "final" / "x"
    run.mkdir(parents=True)
    (run / RESULT).write_text('{"status": "ok", "epochs"')
    before = folder_bytes(tmp_path)
    from localcredit.bench.plan import read_result

    with pytest.raises(Exception, match="damaged"):
        read_result(run)
    assert main(["bench", "--suite", "smoke", "--rules", "bp", "--out", str(tmp_path), "--quiet"]) == 2
    assert "already holds a bench" in one_error_line(capsys)
    assert folder_bytes(tmp_path) == before


@pytest.mark.parametrize("value", ["soon", "-5", "1.5", "10x"])
def test_bad_checkpoint_every_is_one_line(npz, tmp_path, capsys, value):
    out = tmp_path / "run"
    assert main(["train", "--rule", "bp", "--data", npz, "--hidden", "8", "--epochs", "1", "--out", str(out),
                 "--checkpoint-every", value]) == 2
    assert "--checkpoint-every" in one_error_line(capsys) and not out.exists()


# ----- real processes: SIGTERM, kill -9 while a checkpoint is written --------------------------------------
def train_command(npz: str, out: Path, *extra: str, epochs: int = 3) -> list[str]:
    return [sys.executable, "-m", "localcredit", "train", "--quiet", "--data", npz, "--batch-size", "10",
            "--epochs", str(epochs), "--threads", "1", "--out", str(out), *extra]


def wait_for(path: Path, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


@pytest.mark.parametrize("layout", [
    ["--rule", "bp", "--hidden", "256"],
    # 800 images for the two-process layouts (each of their steps pays an exchange between the processes):
    # 80 steps an epoch still leave the signal well inside epoch 2 (it is sent within 20 ms of epoch 1's checkpoint).
    ["--rule", "lfnn-l", "--hidden", "128,128", "--procs", "2", "--parallel", "blocks", "--limit-train", "800"],
    ["--rule", "bp", "--arch", "vgg", "--channels", "4,M,8,M", "--hidden", "16", "--dropout", "0.1", "--procs", "2",
     "--limit-train", "800"],
])
@pytest.mark.slow
def test_sigterm_in_epoch_2_exits_143_and_resume_reaches_the_uninterrupted_accuracy(npz, tmp_path, layout):
    # Two epochs: the signal lands in the last one, so resuming must restore the state mid-run and finish it.
    command = train_command(npz, tmp_path / "stopped", *layout, "--checkpoint-every", "off", epochs=2)
    straight = subprocess.Popen(train_command(npz, tmp_path / "straight", *layout, epochs=2), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    stopped = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(tmp_path / "stopped" / CHECKPOINT, stopped)  # epoch 1 is done: we are in epoch 2
    stopped.send_signal(signal.SIGTERM)
    _, err = stopped.communicate(timeout=TIMEOUT_S)
    assert stopped.returncode == 143, err
    assert err.strip().splitlines()[-1].startswith("localcredit: stopped by SIGTERM") and "--resume" in err
    written = json.loads((tmp_path / "stopped" / RESULT).read_text())
    assert written["status"] == "interrupted" and written["interrupted_at"]["epoch"] == 2
    resumed = subprocess.run([*command, "--resume"], capture_output=True, text=True, timeout=TIMEOUT_S)
    assert resumed.returncode == 0, resumed.stderr
    assert straight.wait(timeout=TIMEOUT_S) == 0, straight.stderr.read()
    final, reference = (json.loads((tmp_path / o / RESULT).read_text()) for o in ("stopped", "straight"))
    assert final["status"] == "ok" and final["test_accuracy"] == reference["test_accuracy"]
    # Every epoch's: the interrupted one's batch-norm statistics (each process's own) show here.
    assert final["test_accuracy_per_epoch"] == reference["test_accuracy_per_epoch"]
    assert final["train_loss_per_epoch"] == reference["train_loss_per_epoch"]


KILL_WHILE_SAVING = """
import os, signal, sys, torch
import localcredit.training.checkpoint as train
real_save, calls = torch.save, []
def save(obj, handle, *args, **kwargs):
    calls.append(1)
    if len(calls) == 2:  # the second checkpoint: half of it written, then the process dies
        handle.write(b"PK" + os.urandom(1000))
        handle.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save(obj, handle, *args, **kwargs)
train.torch.save = save
from localcredit.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_kill_9_while_a_checkpoint_is_written_leaves_the_previous_one_usable(npz, tmp_path):
    argv = ["train", "--quiet", "--rule", "bp", "--data", npz, "--hidden", "32", "--epochs", "2", "--threads", "1",
            "--out", str(tmp_path / "run")]
    killed = subprocess.run([sys.executable, "-c", KILL_WHILE_SAVING, *argv], capture_output=True, timeout=TIMEOUT_S)
    assert killed.returncode == -signal.SIGKILL
    assert torch.load(tmp_path / "run" / CHECKPOINT, weights_only=True)["epochs_done"] == 1
    assert list((tmp_path / "run").glob(f".{CHECKPOINT}.*")), "the half-written temporary file is left"
    assert main([*argv, "--resume"]) == 0
    assert not list((tmp_path / "run").glob(f".{CHECKPOINT}.*")), "the resumed run removes it"
    assert main([*argv[:-1], str(tmp_path / "straight")]) == 0
    final, reference = (json.loads((tmp_path / o / RESULT).read_text()) for o in ("run", "straight"))
    assert final["test_accuracy_per_epoch"] == reference["test_accuracy_per_epoch"]


# ----- a signal after the run is written; options that changed on --resume; one process per folder ------------
LATE_SIGNAL = """
import atexit, os, signal, sys, time
import localcredit.cli as cli
when, signum = sys.argv[1], getattr(signal, sys.argv[2])
real_fit = cli.fit
def fit(*args, **kwargs):
    result = real_fit(*args, **kwargs)  # result.json is written
    if when == "after the run":
        os.kill(os.getpid(), signum)
    return result
cli.fit = fit
if when == "while the process ends":  # an atexit callback runs after the command, as the process ends
    atexit.register(lambda: (os.kill(os.getpid(), signum), time.sleep(30)))
sys.argv = ["localcredit", *sys.argv[3:]]
cli.run()
"""


@pytest.mark.parametrize("when,signum", [("after the run", signal.SIGTERM), ("while the process ends", signal.SIGTERM),
                                         ("while the process ends", signal.SIGINT)])
def test_a_stop_signal_after_the_run_is_written_ends_with_its_exit_code(npz, tmp_path, when, signum):
    argv = ["train", "--quiet", "--rule", "bp", "--data", npz, "--hidden", "16", "--epochs", "1", "--limit-train",
            "500", "--threads", "1", "--out", str(tmp_path / "run")]
    done = subprocess.run([sys.executable, "-c", LATE_SIGNAL, when, signal.Signals(signum).name, *argv],
                          capture_output=True, text=True, timeout=TIMEOUT_S)
    assert done.returncode == 128 + signum, done.stderr  # not killed by the signal's default action (-15)
    assert "Traceback" not in done.stderr and f"stopped by {signal.Signals(signum).name}" in done.stderr
    assert json.loads((tmp_path / "run" / RESULT).read_text())["status"] == "ok"


def test_resume_names_the_options_that_changed(finished, capsys):
    out, argv = finished
    before = folder_bytes(out)
    assert main([*argv, "--resume", "--lr", "0.01", "--batch-size", "64"]) == 2
    err = one_error_line(capsys)
    assert "other options" in err and "--batch-size: 128 in the checkpoint, 64 now" in err, err
    assert "--lr: default in the checkpoint, 0.01 now" in err, err
    assert main([*argv, "--resume", "--set", "init=uniform"]) == 2  # bp has no such option: refused earlier
    assert folder_bytes(out) == before


def test_resume_cannot_stretch_a_cosine_schedule(npz, tmp_path, capsys):
    argv = ["train", "--rule", "bp", "--data", npz, "--hidden", "16", "--epochs", "1", "--limit-train", "500",
            "--lr-schedule", "cosine", "--out", str(tmp_path / "run"), "--quiet"]
    assert main(argv) == 0
    before = folder_bytes(tmp_path / "run")
    assert main([*argv, "--epochs", "3", "--resume"]) == 2
    err = one_error_line(capsys)
    assert "cosine" in err and "over 1 epoch" in err and "--epochs 3" in err and "--epochs 1" in err, err
    assert folder_bytes(tmp_path / "run") == before
    assert main([*argv, "--resume"]) == 0  # the same epochs: the finished run, reused


def test_a_second_process_in_a_run_folder_is_refused_with_the_holders_pid(npz, tmp_path):
    out = tmp_path / "run"
    first = subprocess.Popen(train_command(npz, out, "--rule", "bp", "--hidden", "256", "--epochs", "50"),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while not ((out / LOCK).exists() and (out / LOCK).read_text().strip() == str(first.pid)):
            assert first.poll() is None, first.communicate()[1]
            assert time.monotonic() < deadline, "timed out"
            time.sleep(0.05)
        first.send_signal(signal.SIGSTOP)  # it holds the lock, alive, and leaves the cores to the others
        for extra in ([], ["--resume"], ["--overwrite"]):
            second = subprocess.run(train_command(npz, out, "--rule", "bp", "--hidden", "256", "--epochs", "50",
                                                  *extra), capture_output=True, text=True, timeout=TIMEOUT_S)
            assert second.returncode == 2, second.stderr
            assert second.stderr.count("\n") == 1 and str(out) in second.stderr, second.stderr
            assert f"PID {first.pid}" in second.stderr and "in use" in second.stderr, second.stderr
            assert first.poll() is None  # the first one goes on
    finally:
        first.kill()
        first.communicate()
    check_not_held(out)  # kill -9 released the lock: the stale file holds nobody
    with hold_run_folder(out):
        assert (out / LOCK).read_text().strip() == str(os.getpid())
    assert not (out / LOCK).exists()


def test_continual_and_bench_refuse_a_folder_another_process_holds(npz, tmp_path, capsys):
    for argv in (["continual", "--rule", "bp", "--data", npz, "--hidden", "16", "--scenario", "permuted",
                  "--tasks", "2", "--limit-train", "200", "--quiet"],
                 ["bench", "--suite", "smoke", "--rules", "bp", "--quiet"]):
        out = tmp_path / argv[0]
        with hold_run_folder(out):
            assert main([*argv, "--out", str(out)]) == 2
            err = one_error_line(capsys)
            assert str(out) in err and f"PID {os.getpid()}" in err, err
            assert sorted(p.name for p in out.iterdir()) == [LOCK]
        assert not out.exists()  # the hold made it, and took it away again
