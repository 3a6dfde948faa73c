"""fa and dfa: exact where theory says so (B = W^T makes FA equal BP), clearly not BP at random B."""

import pytest
import torch

from localcredit.nets.layers import weight_layers
from localcredit.rules.alignment import alignment, bp_gradients

from .rule_contract import RuleContract


class TestFeedbackAlignment(RuleContract):
    rule = "fa"
    accuracy_floor = 0.73  # seeds 0-4 x 1, 2 threads: min 0.768, median 0.810
    # min / median, seeds 0-4 x 1, 2 threads:
    # vgg 0.752 / 0.788, resnet 0.209 / 0.290, user 0.779 / 0.810
    deep_floors = {"vgg": 0.70, "resnet": 0.15, "user": 0.74}

    @pytest.mark.parametrize("network", [
        dict(arch="mlp", hidden=[64, 32]),
        dict(arch="conv", hidden=[32]),
        dict(arch="vgg", channels="6,M,8,M", hidden=[16]),  # BN after every conv and dense layer, bias-free
        dict(arch="resnet", depth=8, width=0.5),  # residual units, strided convs, 1x1 shortcuts
    ])
    def test_equals_bp_when_feedback_is_the_weight(self, fashion_small, network):
        rule = self.make(fashion_small, **network)
        for name, layer in weight_layers(rule.net):
            rule.feedback(name).copy_(layer.weight.detach())
        x, y = self.batch(fashion_small, n=40)
        for got, want in zip(rule.update_directions(x, y), bp_gradients(rule, x, y)):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)

    def test_head_gradient_is_exact_and_hidden_ones_are_not(self, fashion_small):
        rule = self.make(fashion_small)
        cosines = alignment(rule, *self.batch(fashion_small, n=256))
        assert cosines[-1] > 0.99999
        assert all(c < 0.9 for c in cosines[:-1]), cosines

    def test_feedback_is_fixed(self, fashion_small):
        rule = self.make(fashion_small)
        before = [b.clone() for b in rule.buffers()]
        rule.step(*self.batch(fashion_small))
        assert all(torch.equal(b, a) for b, a in zip(before, rule.buffers()))
        assert all(not b.requires_grad for b in rule.buffers())


class TestDirectFeedbackAlignment(RuleContract):
    rule = "dfa"
    accuracy_floor = 0.74  # seeds 0-4 x 1, 2 threads: min 0.779, median 0.806
    # min / median, seeds 0-4 x 1, 2 threads:
    # vgg 0.797 / 0.801, resnet 0.168 / 0.256, user 0.774 / 0.806
    deep_floors = {"vgg": 0.76, "resnet": 0.11, "user": 0.74}

    def test_equals_bp_for_one_hidden_layer_when_feedback_is_the_head(self, fashion_small):
        # With one hidden block, BP's error at h_1 is W_head^T e: DFA with B_1 = W_head is BP.
        rule = self.make(fashion_small, hidden=[50])
        rule.feedback_0.copy_(rule.net.head.weight.detach())
        x, y = self.batch(fashion_small, n=40)
        for got, want in zip(rule.update_directions(x, y), bp_gradients(rule, x, y)):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)

    def test_alignment_clearly_below_bp_at_init(self, fashion_small):
        rule = self.make(fashion_small)
        cosines = alignment(rule, *self.batch(fashion_small, n=256))
        assert cosines[-1] > 0.99999
        assert all(c < 0.9 for c in cosines[:-1]), cosines
