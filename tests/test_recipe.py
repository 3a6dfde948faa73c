"""The training recipe: learning-rate schedules are torch's, augmentation is seeded and keeps the labels,
evaluation cadence, and a resumed run mid-schedule with augmentation equals the uninterrupted one."""

import json

import pytest
import torch

from localcredit.experiment import RunSpec, build_rule, train_config
from localcredit.training.augment import Augment, augment_batch, parse_augment
from localcredit.training.runfiles import CHECKPOINT
from localcredit.training.trainer import Trainer

from .conftest import subset


@pytest.fixture(scope="module")
def tiny(fashion):
    return subset(fashion, 1_000, 300)


def run(data, out=None, resume=False, **recipe):
    spec = RunSpec(rule="local-learned", data=data.name, arch="conv", channels="4,M", hidden=[16], seed=2, **recipe)
    trainer = Trainer(build_rule(spec, data), data, train_config(spec, progress=False), out_dir=out,
                      run_info={"rule": spec.rule})
    return trainer, trainer.fit(resume=resume)


def learning_rates(trainer):
    return [group["lr"] for optimizer in trainer.rule.optimizers for group in optimizer.param_groups]


@pytest.mark.parametrize("recipe,scheduler", [
    (dict(lr_schedule="cosine"), lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=4)),
    (dict(lr_schedule="step", milestones=[1, 3], lr_decay=0.5),
     lambda o: torch.optim.lr_scheduler.MultiStepLR(o, milestones=[1, 3], gamma=0.5)),
])
def test_schedules_follow_torch_per_epoch_and_per_optimiser(tiny, recipe, scheduler):
    _, result = run(tiny, epochs=4, limit_train=100, eval_every=4, **recipe)
    seen = result["learning_rates_after_epoch"]
    reference = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1e-3)
    expected = []
    schedule = scheduler(reference)
    for _ in range(4):
        reference.step()
        schedule.step()
        expected.append(reference.param_groups[0]["lr"])
    for rates, lr in zip(seen, expected):
        assert len(rates) == 3 and rates == pytest.approx([lr] * 3)  # one optimiser per block, all scheduled


def test_resume_mid_schedule_with_augmentation_equals_the_uninterrupted_run(tiny, tmp_path):
    recipe = dict(epochs=3, lr_schedule="step", milestones=[1, 2], lr_decay=0.3, augment="crop:2,flip", dropout=0.2)
    straight, result = run(tiny, tmp_path / "straight", **recipe)
    run(tiny, tmp_path / "killed", **{**recipe, "epochs": 1})
    resumed, again = run(tiny, tmp_path / "killed", resume=True, **recipe)
    assert again["test_accuracy_per_epoch"] == result["test_accuracy_per_epoch"]
    assert again["train_loss_per_epoch"] == result["train_loss_per_epoch"]
    assert learning_rates(resumed) == learning_rates(straight)
    saved = torch.load(tmp_path / "straight" / CHECKPOINT, weights_only=True)
    for key, value in resumed.rule.state_dict().items():
        assert torch.equal(value, saved["rule"]["rule"][key]), key


def test_augmentation_changes_the_images_not_the_labels_and_is_seeded(tiny):
    trainer, _ = run(tiny, epochs=1, limit_train=256, augment="crop:2,flip", eval_every=1)
    batches = trainer.epoch_batches(0)
    for step, ((x, y), index) in enumerate(zip(trainer.training_batches(0), batches)):
        assert torch.equal(y, tiny.y_train[index])
        assert not torch.equal(x, tiny.x_train[index])
        again = trainer.augmented(tiny.x_train[index], 0, step)
        assert torch.equal(x, again)  # the same (seed, epoch, step): the same images
    other_epoch = trainer.augmented(tiny.x_train[batches[0]], 1, 0)
    assert not torch.equal(other_epoch, trainer.augmented(tiny.x_train[batches[0]], 0, 0))


def test_random_crop_shifts_each_image_and_pads_with_black():
    x = torch.arange(2 * 1 * 5 * 5, dtype=torch.float32).view(2, 1, 5, 5) + 1
    generator = torch.Generator().manual_seed(0)
    out = augment_batch(x, Augment(crop=2), generator, fill=torch.tensor([-7.0]))
    for sample, image in zip(out, x):
        found = False
        for dy in range(-2, 3):
            for dx in range(-2, 3):
                padded = torch.full((1, 9, 9), -7.0)
                padded[:, 2:7, 2:7] = image
                if torch.equal(sample, padded[:, 2 + dy:7 + dy, 2 + dx:7 + dx]):
                    found = True
        assert found, "every output is the input shifted by at most 2 pixels, the border black"
    flipped = augment_batch(x.repeat(32, 1, 1, 1), Augment(flip=True), torch.Generator().manual_seed(1), torch.zeros(1))
    kinds = {torch.equal(f, x[i % 2]) for i, f in enumerate(flipped)} | {torch.equal(f, x[i % 2].flip(-1))
                                                                       for i, f in enumerate(flipped)}
    assert kinds == {True, False}  # some flipped, some not
    assert str(parse_augment("flip, crop:4")) == "crop:4,flip" and str(parse_augment("none")) == "none"


def test_evaluation_every_n_epochs_and_after_the_last(tiny, tmp_path):
    _, result = run(tiny, tmp_path, epochs=5, limit_train=100, eval_every=2)
    accuracy = result["test_accuracy_per_epoch"]
    assert [a is not None for a in accuracy] == [False, True, False, True, True]
    assert result["test_accuracy"] == accuracy[-1]
    assert json.loads((tmp_path / "result.json").read_text())["test_accuracy_per_epoch"] == accuracy


def test_augmentation_of_vectors_is_refused(fashion, tmp_path):
    from localcredit.errors import UserError

    data = subset(fashion, 100, 50)
    data.x_train, data.x_test = data.x_train.flatten(1), data.x_test.flatten(1)
    spec = RunSpec(rule="bp", data="fashion-mnist", hidden=[8], augment="flip")
    with pytest.raises(UserError, match="image data"):
        Trainer(build_rule(spec, data), data, train_config(spec))
