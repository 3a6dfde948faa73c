"""The tests every rule gets for free: subclass :class:`RuleContract` and set the class attributes.

A new rule's test file is typically::

    class TestMyRule(RuleContract):
        rule = "my-rule"
        accuracy_floor = 0.78
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import localcredit as lc
from localcredit.experiment import RunSpec, build_rule
from localcredit.nets.layers import weight_layers
from localcredit.training.config import TrainConfig
from localcredit.training.progress import read_figures
from localcredit.training.trainer import Trainer

from .conftest import DEEP_NETWORKS, subset, user_conv_net
from .learning import Breakage, break_rule, fit


def assert_figures_unread_and_readable(stats) -> None:
    """A step's figures are floats or detached 0-dim tensors (not read on the host inside the step),
    and the Trainer reads them as the floats ``.item()`` gives."""
    tensors = {k: v for k, v in stats.items() if isinstance(v, torch.Tensor)}
    assert "loss" in tensors, "the loss stays a tensor: reading it would make a GPU step wait"
    assert all(v.dim() == 0 and not v.requires_grad for v in tensors.values()), stats
    assert all(isinstance(v, (float, int)) for k, v in stats.items() if k not in tensors), stats
    (read,) = read_figures([stats])
    assert read == {k: v.item() if k in tensors else v for k, v in stats.items()}


def all_gradients(rule, x, y) -> list[torch.Tensor]:
    """The gradient ``assign_credit`` writes into every parameter of the rule (its auxiliary ones too), zeros
    where it writes none; batch-norm statistics and the gradients are left as they were."""
    rule.net.train()
    rule.zero_grad()
    with rule.net.statistics_kept():
        rule.assign_credit(x, y)
    grads = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in rule.parameters()]
    rule.zero_grad()
    return grads


#: The head of the output-masking tests (task-incremental learning): classes 2 and 3 compete, the others are off.
HEAD = [2, 3]


class RuleContract:
    rule: str = ""
    options: list[str] = []
    hidden: list[int] = [256, 256]
    #: accuracy on 2k Fashion-MNIST test images after ``learn_epochs`` on 10k training images
    accuracy_floor: float = 0.75
    learn_epochs: int = 2
    learn_hidden: list[int] = [1000]
    learn_options: list[str] | None = None  # defaults to ``options``
    lr: float | None = None
    supports_conv: bool = True
    #: test accuracy floors after 2 epochs on 3k Fashion-MNIST images (``fashion_deep``), per deep network
    deep_floors: dict[str, float] = {}

    #: the network and the extra options of the output-masking and target tests (a small MLP: they are cheap)
    mask_hidden: list[int] = [24, 24]
    mask_options: list[str] = []

    def make(self, data, seed=0, arch=None, hidden=None, options=None, **network):
        spec = RunSpec(rule=self.rule, data=data.name, arch=arch, hidden=self.hidden if hidden is None else hidden,
                       options=self.options if options is None else options, seed=seed, lr=self.lr, **network)
        return build_rule(spec, data)

    def batch(self, data, n=64, offset=0):
        return data.x_train[offset:offset + n], data.y_train[offset:offset + n]

    def test_step_reports_finite_loss_and_changes_weights(self, fashion_small):
        rule = self.make(fashion_small)
        before = [p.detach().clone() for p in rule.net.parameters()]
        stats = rule.step(*self.batch(fashion_small))
        assert math.isfinite(stats["loss"])
        assert_figures_unread_and_readable(stats)
        changed = [not torch.equal(b, p) for b, p in zip(before, rule.net.parameters())]
        assert all(changed), "every network parameter should move after one step"

    def test_update_directions_one_per_block_with_block_size(self, fashion_small):
        rule = self.make(fashion_small)
        directions = rule.update_directions(*self.batch(fashion_small))
        assert len(directions) == len(rule.net.layers)
        for direction, layer in zip(directions, rule.net.layers):
            assert direction.numel() == sum(p.numel() for p in layer.parameters())
            assert torch.isfinite(direction).all() and direction.abs().sum() > 0

    def test_same_seed_same_result(self, fashion_small):
        def run(seed):
            rule = self.make(fashion_small, seed=seed)
            for i in range(3):
                rule.step(*self.batch(fashion_small, offset=64 * i))
            return torch.cat([p.detach().reshape(-1) for p in rule.net.parameters()])

        first, second = run(0), run(0)
        assert torch.equal(first, second)
        assert not torch.equal(first, run(1))

    def test_conv_network_steps(self, fashion_small):
        if not self.supports_conv:
            pytest.skip(f"{self.rule} does not support conv networks")
        rule = self.make(fashion_small, arch="conv", hidden=[64])
        stats = rule.step(*self.batch(fashion_small, n=32))
        assert math.isfinite(stats["loss"])
        assert len(rule.update_directions(*self.batch(fashion_small, n=32))) == len(rule.net.layers)

    # ----- one masking for all: every class loss over the active classes; soft targets --------------
    def class_rows(self, rule) -> list[torch.Tensor]:
        """Views of the parameters that belong to one class each, class c in row c: the output layer's weight
        and bias by default; a rule with auxiliary class outputs (classifiers, decoders, worker heads) adds theirs."""
        _, layer = weight_layers(rule.net.layers[-1])[-1]
        return [t[:rule.net.num_classes] for t in (layer.weight, layer.bias) if t is not None]

    def make_small(self, data):
        return self.make(data, hidden=self.mask_hidden, options=[*self.options, *self.mask_options])

    def head_batch(self, data, n=32):
        """A batch labelled within HEAD (each sample answers in its own task's head)."""
        x, y = self.batch(data, n=n)
        return x, HEAD[0] + y % len(HEAD)

    def test_a_head_leaves_the_other_classes_alone(self, fashion_small):
        rule = self.make_small(fashion_small)
        others = [c for c in range(rule.net.num_classes) if c not in HEAD]
        rule.restrict_outputs(HEAD)
        before = [t.detach().clone() for t in self.class_rows(rule)]
        stats = rule.step(*self.head_batch(fashion_small))
        assert math.isfinite(stats["loss"])
        assert all(torch.isfinite(p).all() for p in rule.parameters())
        after = self.class_rows(rule)
        for b, a in zip(before, after):
            assert torch.equal(b[others], a[others]), "an inactive class's output weights moved"
        assert any(not torch.equal(b[HEAD], a[HEAD]) for b, a in zip(before, after)), "the head's classes learn"

    def test_a_per_sample_head_equal_for_every_sample_is_the_class_list(self, fashion_small):
        rule = self.make_small(fashion_small)
        x, y = self.head_batch(fashion_small)
        rule.restrict_outputs(HEAD)
        listed = all_gradients(rule, x, y)
        mask = torch.zeros(len(x), rule.net.num_classes, dtype=torch.bool)
        mask[:, HEAD] = True
        rule.restrict_outputs(mask)
        for got, want in zip(all_gradients(rule, x, y), listed):
            torch.testing.assert_close(got, want, rtol=0, atol=0)

    @pytest.mark.parametrize("head", [None, HEAD])
    def test_one_hot_targets_are_the_class_indices(self, fashion_small, head):
        rule = self.make_small(fashion_small)
        x, y = self.head_batch(fashion_small)
        rule.restrict_outputs(head)
        want = all_gradients(rule, x, y)
        for got, w in zip(all_gradients(rule, x, F.one_hot(y, rule.net.num_classes).float()), want):
            torch.testing.assert_close(got, w, rtol=1e-4, atol=1e-6)

    def test_soft_targets_give_finite_updates_in_any_head(self, fashion_small):
        rule = self.make_small(fashion_small)
        x, _ = self.batch(fashion_small, n=32)
        classes = rule.net.num_classes
        soft = torch.softmax(torch.randn(len(x), classes, generator=torch.Generator().manual_seed(0)), 1)
        mixed = torch.zeros(len(x), classes, dtype=torch.bool)  # replay: every other sample from another task's head
        mixed[0::2, HEAD] = True
        mixed[1::2, [4, 5]] = True
        for head in (None, HEAD, mixed):
            rule.restrict_outputs(head)
            grads = all_gradients(rule, x, soft)
            assert all(torch.isfinite(g).all() for g in grads), head
            assert sum(g.abs().sum() for g in grads) > 0, head

    def make_deep(self, data, network: str, seed: int = 0):
        """The rule on a deep network of DEEP_NETWORKS, or ("user") on a user's own, from the Python API."""
        if network == "user":
            torch.manual_seed(seed)
            return lc.make_rule(self.rule, user_conv_net(), lr=self.lr)
        spec = RunSpec(rule=self.rule, data=data.name, options=self.options, seed=seed, lr=self.lr,
                       **DEEP_NETWORKS[network])
        return build_rule(spec, data)

    @pytest.mark.parametrize("network", ["vgg", "resnet", "user"])
    def test_deep_network_steps_deterministically(self, fashion_small, network):
        if not self.supports_conv:
            pytest.skip(f"{self.rule} does not train conv networks")

        def two_steps(seed):
            rule = self.make_deep(fashion_small, network, seed=seed)
            before = [p.detach().clone() for p in rule.net.parameters()]
            for i in range(2):
                stats = rule.step(*self.batch(fashion_small, n=32, offset=32 * i))
                assert math.isfinite(stats["loss"])
            moved = [not torch.equal(b, p) for b, p in zip(before, rule.net.parameters())]
            assert all(moved), "every network parameter should move"
            return rule, torch.cat([t.detach().reshape(-1).double() for t in rule.net.state_dict().values()])

        rule, state = two_steps(0)
        assert torch.equal(state, two_steps(0)[1]), "same seed, same weights and statistics"
        directions = rule.update_directions(*self.batch(fashion_small, n=32))
        assert len(directions) == len(rule.net.layers)
        assert all(torch.isfinite(d).all() and d.abs().sum() > 0 for d in directions)

    def learn_deep(self, data, network: str, seed: int = 0, broken: Breakage | None = None) -> dict:
        """The deep-network learning case: 2 epochs on ``fashion_deep``, batch 64."""
        rule = break_rule(self.make_deep(data, network, seed=seed), broken)
        return fit(Trainer(rule, data, TrainConfig(epochs=2, batch_size=64, seed=seed, progress=False)), broken)

    def learn(self, data, seed: int = 0, broken: Breakage | None = None) -> dict:
        """The MLP learning case: ``learn_epochs`` on ``fashion_small``, batch 128."""
        options = self.options if self.learn_options is None else self.learn_options
        rule = break_rule(self.make(data, seed=seed, hidden=self.learn_hidden, options=options), broken)
        config = TrainConfig(epochs=self.learn_epochs, batch_size=128, seed=seed, progress=False)
        return fit(Trainer(rule, data, config), broken)

    @pytest.mark.parametrize("network", ["vgg", "resnet", "user"])
    def test_learns_fashion_mnist_on_deep_networks(self, fashion_deep, network):
        if not self.supports_conv:
            pytest.skip(f"{self.rule} does not train conv networks")
        result = self.learn_deep(fashion_deep, network)
        # Learning lowers the training loss whatever the test accuracy does (a broken rule's rises): on
        # resnet-8 the local rules' accuracy after 2 epochs on 3k images spreads down to near chance.
        assert result["train_loss_per_epoch"][-1] < result["train_loss_per_epoch"][0], result["train_loss_per_epoch"]
        assert result["test_accuracy"] >= self.deep_floors[network], result["test_accuracy_per_epoch"]

    def test_learns_fashion_mnist(self, fashion_small):
        result = self.learn(fashion_small)
        assert result["test_accuracy"] >= self.accuracy_floor, result["test_accuracy_per_epoch"]

    @pytest.mark.parametrize("broken", ["flip"])
    def test_a_broken_update_falls_under_the_floor(self, fashion_small, broken):
        # The floor above means something only if a rule that learns nothing (or unlearns) misses it.
        result = self.learn(fashion_small, broken=broken)
        assert result["test_accuracy"] < self.accuracy_floor, result["test_accuracy_per_epoch"]

__all__ = ["RuleContract", "subset"]
