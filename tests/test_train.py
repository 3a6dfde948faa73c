"""The Trainer: result.json contract, resume equivalence, the NaN guard, determinism of whole runs."""

import json

import pytest
import torch

from localcredit.experiment import RunSpec, build_rule
from localcredit.train import CHECKPOINT, RESULT, Diverged, TrainConfig, Trainer

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
