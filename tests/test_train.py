"""The Trainer: result.json contract, resume equivalence, the NaN guard, determinism of whole runs."""

import json

import pytest
import torch

from localcredit.experiment import RunSpec, build_rule
from localcredit.training.config import TrainConfig
from localcredit.training.progress import Diverged, read_figures
from localcredit.training.runfiles import CHECKPOINT, RESULT
from localcredit.training.trainer import Parallelism, Trainer

from .conftest import subset

REQUIRED = ["rule", "data", "arch", "hidden", "epochs", "seed", "test_accuracy", "test_accuracy_per_epoch",
            "train_loss_per_epoch", "seconds_per_epoch", "samples_per_second", "peak_memory_mb", "parameters",
            "command"]


@pytest.fixture(scope="module")
def tiny(fashion):
    return subset(fashion, 3_000, 1_000)


def run(data, out, epochs, rule="fa", resume=False, lr=None, optimizer="adam", network=None):
    spec = RunSpec(rule=rule, data=data.name, seed=3, lr=lr, optimizer=optimizer, **(network or {"hidden": [64]}))
    trainer = Trainer(build_rule(spec, data), data, TrainConfig(epochs=epochs, batch_size=100, seed=3,
                                                                 progress=False),
                      out_dir=out, run_info={"rule": rule, "data": data.name, "command": "test"})
    return trainer, trainer.fit(resume=resume)


def test_result_json_has_the_documented_fields(tiny, tmp_path):
    from localcredit.experiment import run_info

    spec = RunSpec(rule="bp", data="fashion-mnist", hidden=[32])
    rule = build_rule(spec, tiny)
    Trainer(rule, tiny, TrainConfig(epochs=2, progress=False), out_dir=tmp_path,
            run_info={**run_info(spec, rule), "command": "x"}).fit()
    result = json.loads((tmp_path / RESULT).read_text())
    assert set(REQUIRED) <= set(result)
    assert result["status"] == "ok" and len(result["test_accuracy_per_epoch"]) == 2
    assert 0 <= result["test_accuracy"] <= 1 and result["parameters"] == 784 * 32 + 32 + 32 * 10 + 10


@pytest.mark.parametrize("rule,network", [
    ("fa", None),
    ("gaitprop", {"hidden": [64, 64]}),  # its LU factors are a few steps old: they travel in the checkpoint
    ("lfnn", dict(arch="vgg", channels="4,M,8,M", hidden=[16], dropout=0.1)),  # batch norm, dropout, worker heads
])
def test_resume_reaches_the_same_final_state(tiny, tmp_path, rule, network):
    _, straight = run(tiny, tmp_path / "straight", epochs=3, rule=rule, network=network)
    run(tiny, tmp_path / "killed", epochs=1, rule=rule, network=network)  # as if killed after epoch 1
    resumed_trainer, resumed = run(tiny, tmp_path / "killed", epochs=3, resume=True, rule=rule, network=network)
    assert resumed["test_accuracy_per_epoch"] == straight["test_accuracy_per_epoch"]
    assert resumed["train_loss_per_epoch"] == straight["train_loss_per_epoch"]
    straight_state = torch.load(tmp_path / "straight" / CHECKPOINT, weights_only=True)["rule"]["rule"]
    assert resumed["rule_statistics"] == straight["rule_statistics"]
    for key, value in resumed_trainer.rule.state_dict().items():  # batch-norm statistics included
        assert torch.equal(value, straight_state[key]), key


def test_resuming_a_finished_run_reuses_it_and_rewrites_nothing(tiny, tmp_path, capsys):
    # What a second `make demo` does: its runs are finished, so --resume must only report them.
    _, first = run(tiny, tmp_path, epochs=1)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    _, again = run(tiny, tmp_path, epochs=1, resume=True)
    assert again == first
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    assert "finished (1 epochs): reusing it" in capsys.readouterr().err


def test_checkpoint_loads_with_weights_only_and_leaves_no_temp_files(tiny, tmp_path):
    run(tiny, tmp_path, epochs=1)
    state = torch.load(tmp_path / CHECKPOINT, weights_only=True)
    assert state["epochs_done"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT, RESULT]


def test_resume_with_other_options_is_refused(tiny, tmp_path):
    from localcredit.errors import UserError

    run(tiny, tmp_path, epochs=1, rule="fa")
    with pytest.raises(UserError, match="other options"):
        run(tiny, tmp_path, epochs=2, rule="bp", resume=True)


def test_divergence_stops_with_epoch_and_step(tiny, tmp_path):
    with pytest.raises(Diverged, match=r"epoch 1, step \d+"):
        run(tiny, tmp_path, epochs=2, rule="bp", lr=1e12, optimizer="sgd")
    result = json.loads((tmp_path / RESULT).read_text())
    assert result["status"] == "diverged" and "epoch 1" in result["message"]


def test_same_seed_same_run(tiny):
    first = run(tiny, None, epochs=1)[1]
    second = run(tiny, None, epochs=1)[1]
    assert first["test_accuracy"] == second["test_accuracy"]
    assert first["train_loss_per_epoch"] == second["train_loss_per_epoch"]


# ----- figures read every few steps (as on CUDA, where reading makes the host wait) ----------------
def fit_reading_every(data, every: int, parallel: Parallelism | None = None, epochs: int = 2) -> Trainer:
    spec = RunSpec(rule="fa", data=data.name, seed=3, hidden=[64])
    trainer = Trainer(build_rule(spec, data), data, TrainConfig(epochs=epochs, batch_size=100, seed=3, progress=False),
                      parallel=parallel)
    trainer.sync_every = every  # what CUDA gets (CUDA_SYNC_EVERY), forced on the CPU
    trainer.fit()
    return trainer


def test_figures_read_every_few_steps_log_what_reading_every_step_logs(tiny):
    every_step, every_seventh = fit_reading_every(tiny, 1), fit_reading_every(tiny, 7)  # 30 steps per epoch
    assert every_seventh.history["train_loss"] == every_step.history["train_loss"]
    assert len(every_step.history["train_loss"]) == 2


class NanLossAt(Parallelism):
    """One process whose ``at``-th step (1-based) reports a NaN loss; counts the steps it ran."""

    def __init__(self, at: int):
        self.at, self.calls = at, 0

    def step(self, trainer, x, y):
        self.calls += 1
        stats = super().step(trainer, x, y)
        return {**stats, "loss": torch.full_like(stats["loss"], float("nan"))} if self.calls == self.at else stats


@pytest.mark.parametrize("every", [1, 4])
def test_a_nan_loss_read_later_still_names_its_step_and_stops_within_the_reading_interval(tiny, every):
    nan_at = 6
    parallel = NanLossAt(nan_at)
    with pytest.raises(Diverged, match=f"epoch 1, step {nan_at}:") as stopped:
        fit_reading_every(tiny, every, parallel)
    assert stopped.value.step == nan_at
    assert nan_at <= parallel.calls < nan_at + every


def test_read_figures_gives_the_floats_item_gives_in_one_go():
    loss = torch.tensor(0.1, dtype=torch.float32)  # not a float64 number: the read must not round it
    steps = [{"loss": loss, "count": 3}, {"loss": torch.tensor(2.5, dtype=torch.bfloat16), "head_loss": 0.25}]
    assert read_figures(steps) == [{"loss": loss.item(), "count": 3}, {"loss": 2.5, "head_loss": 0.25}]
    assert read_figures([{"loss": 1.0}]) == [{"loss": 1.0}]


# ----- batch norm and a last step of one sample ------------------------------------------------------
def test_a_last_step_of_one_sample_joins_the_step_before_with_batch_norm(tiny, tmp_path):
    def trainer(limit, norm, out=None, epochs=2):
        spec = RunSpec(rule="bp", data=tiny.name, hidden=[16], norm=norm, seed=3)
        return Trainer(build_rule(spec, tiny), tiny, TrainConfig(epochs=epochs, batch_size=128, limit_train=limit,
                                                                 seed=3, progress=False), out_dir=out)

    with_bn = trainer(257, "batch")
    assert with_bn.step_sizes == [128, 129] and with_bn.steps_per_epoch == 2
    assert sorted(torch.cat(with_bn.epoch_batches(1)).tolist()) == list(range(257))  # every sample, every epoch
    assert trainer(257, "none").step_sizes == [128, 128, 1]  # without batch norm nothing changes
    straight = with_bn.fit()
    assert straight["status"] == "ok" and len(straight["train_loss_per_epoch"]) == 2
    trainer(257, "batch", tmp_path, epochs=1).fit()  # as if stopped after epoch 1
    resumed = trainer(257, "batch", tmp_path).fit(resume=True)
    assert resumed["train_loss_per_epoch"] == straight["train_loss_per_epoch"]
    assert trainer(129, "batch").step_sizes == [129]


def test_batch_norm_on_steps_of_one_sample_is_a_user_error(tiny):
    from localcredit.errors import UserError

    spec = RunSpec(rule="bp", data=tiny.name, hidden=[16], norm="batch")
    with pytest.raises(UserError, match="--batch-size 1"):
        Trainer(build_rule(spec, tiny), tiny, TrainConfig(epochs=1, batch_size=1, limit_train=10, progress=False))
    with pytest.raises(UserError, match="1 training sample"):
        Trainer(build_rule(spec, tiny), tiny, TrainConfig(epochs=1, batch_size=8, limit_train=1, progress=False))


# ----- a checkpoint records its process layout ----------------------------------------------------
class LaidOut(Parallelism):
    """One process that reports the layout ``mode`` x ``procs`` and dies at its ``dies_at``-th step."""

    def __init__(self, mode="none", procs=1, dies_at=None):
        self.mode, self.procs, self.dies_at, self.calls = mode, procs, dies_at, 0

    def step(self, trainer, x, y):
        self.calls += 1
        if self.calls == self.dies_at:
            raise RuntimeError("killed")
        return super().step(trainer, x, y)

    def describe(self):
        return {"mode": self.mode, "procs": self.procs, "backend": None}


@pytest.mark.parametrize("first,then", [(("blocks", 2), ("none", 1)), (("none", 1), ("data", 2))])
def test_a_mid_epoch_checkpoint_resumes_only_under_its_layout_an_epoch_end_under_any(tiny, tmp_path, first, then):
    from localcredit.errors import UserError

    def fit(out, parallel, resume=False, every="4"):
        spec = RunSpec(rule="fa", data=tiny.name, hidden=[16], seed=3)
        config = TrainConfig(epochs=2, batch_size=100, limit_train=1000, seed=3, progress=False, checkpoint_every=every)
        return Trainer(build_rule(spec, tiny), tiny, config, out_dir=out, parallel=parallel).fit(resume=resume)

    with pytest.raises(RuntimeError, match="killed"):
        fit(tmp_path / "mid", LaidOut(*first, dies_at=7))  # after the checkpoint at step 4 of epoch 1
    assert torch.load(tmp_path / "mid" / CHECKPOINT, weights_only=True)["layout"] == dict(zip(("mode", "procs"), first))
    with pytest.raises(UserError, match="middle of an epoch") as refused:
        fit(tmp_path / "mid", LaidOut(*then), resume=True)
    assert all(f"--parallel {mode} --procs {procs}" in str(refused.value) or mode == "none"
               for mode, procs in (first, then)) and "one process" in str(refused.value)
    assert fit(tmp_path / "mid", LaidOut(*first), resume=True)["status"] == "ok"  # under its own layout it goes on
    with pytest.raises(RuntimeError, match="killed"):
        fit(tmp_path / "end", LaidOut(*first, dies_at=13), every="off")  # the checkpoint of epoch 1's end
    assert fit(tmp_path / "end", LaidOut(*then), resume=True)["epochs_completed"] == 2
