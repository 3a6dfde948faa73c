"""The Trainer: result.json contract, resume equivalence, the NaN guard, determinism of whole runs."""

import json

import pytest
import torch

from localcredit.experiment import RunSpec, build_rule
from localcredit.train import CHECKPOINT, RESULT, Diverged, Parallelism, TrainConfig, Trainer, read_figures

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
