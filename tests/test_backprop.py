"""bp: its update is autograd's gradient, exactly; align reports cosine 1."""

import pytest
import torch
import torch.nn.functional as F

from localcredit.rules.alignment import alignment, bp_gradients
from localcredit.rules.base import flat_grad

from .rule_contract import RuleContract


class TestBackprop(RuleContract):
    rule = "bp"
    accuracy_floor = 0.78  # seeds 0-4 x 1, 2 threads: min 0.811, median 0.830
    # min / median, seeds 0-4 x 1, 2 threads:
    # vgg 0.836 / 0.853, resnet 0.631 / 0.667, user 0.795 / 0.821
    # min / median, seeds 0-4 x 1, 2 threads:
    # vgg 0.836 / 0.853, resnet 0.631 / 0.667, user 0.795 / 0.821
    deep_floors = {"vgg": 0.80, "resnet": 0.60, "user": 0.76}

    @pytest.mark.parametrize("arch,activation", [("mlp", "relu"), ("mlp", "tanh"), ("conv", "relu")])
    def test_update_directions_equal_autograd(self, fashion_small, arch, activation):
        from localcredit.experiment import RunSpec, build_rule

        spec = RunSpec(rule="bp", data="fashion-mnist", arch=arch, hidden=[64, 32], activation=activation)
        rule = build_rule(spec, fashion_small)
        x, y = self.batch(fashion_small, n=50)
        loss = F.cross_entropy(rule.net(x), y)
        expected = torch.autograd.grad(loss, list(rule.net.parameters()))
        directions = rule.update_directions(x, y)
        i = 0
        for layer, direction in zip(rule.net.layers, directions):
            n = len(list(layer.parameters()))
            reference = torch.cat([g.reshape(-1) for g in expected[i:i + n]])
            torch.testing.assert_close(direction, reference, rtol=1e-6, atol=1e-8)
            i += n

    def test_alignment_is_one(self, fashion_small):
        rule = self.make(fashion_small)
        cosines = alignment(rule, *self.batch(fashion_small, n=128))
        assert all(c > 0.99999 for c in cosines), cosines

    def test_bp_gradients_leave_grad_fields_alone(self, fashion_small):
        rule = self.make(fashion_small)
        bp_gradients(rule, *self.batch(fashion_small))
        assert all(p.grad is None for p in rule.net.parameters())
        assert flat_grad(rule.net.head.parameters()).abs().sum() == 0
