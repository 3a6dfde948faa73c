"""nan-bp and nan: the theorem (linear attention = BP), the attention budget, learning, determinism."""

import math

import pytest
import torch

from localcredit.errors import UserError
from localcredit.experiment import RunSpec, build_rule
from localcredit.nets.layers import LINEAR, swapped_input_gradients, weight_layers
from localcredit.rules.alignment import alignment, bp_gradients
from localcredit.rules.attention import BudgetConfig, attention_support
from localcredit.rules.base import parse_options
from localcredit.training.config import TrainConfig
from localcredit.training.trainer import Trainer

from .conftest import DEEP_NETWORKS, subset
from .rule_contract import RuleContract


def relative_errors(rule, x, y):
    got, want = rule.update_directions(x, y), bp_gradients(rule, x, y)
    return [((g - w).norm() / w.norm()).item() for g, w in zip(got, want)]


class TestNextLayerAttentionBP(RuleContract):
    rule = "nan-bp"
    accuracy_floor = 0.78  # seeds 0-4 x 1, 2 threads: min 0.811, median 0.830
    # min / median, seeds 0-4 x 1, 2 threads:
    # vgg 0.836 / 0.853, resnet 0.631 / 0.667, user 0.795 / 0.821
    # min / median, seeds 0-4 x 1, 2 threads:
    # vgg 0.836 / 0.853, resnet 0.631 / 0.667, user 0.795 / 0.821
    deep_floors = {"vgg": 0.80, "resnet": 0.60, "user": 0.76}

    @pytest.mark.parametrize("arch,hidden,activation", [
        ("mlp", [64, 32], "relu"), ("mlp", [64, 32], "tanh"), ("mlp", [64, 32], "sigmoid"),
        ("mlp", [48], "gelu"), ("conv", [32], "relu"), ("conv", [], "tanh"),
    ])
    def test_theorem_linear_attention_is_bp(self, fashion_small, arch, hidden, activation):
        spec = RunSpec(rule=self.rule, data=fashion_small.name, arch=arch, hidden=hidden, activation=activation)
        rule = build_rule(spec, fashion_small).double()
        x, y = self.batch(fashion_small, n=40)
        errors = relative_errors(rule, x.double(), y)
        assert len(errors) == len(rule.net.layers)
        assert max(errors) < 1e-5, errors

    @pytest.mark.parametrize("network", [
        dict(arch="vgg", channels="6,M,8,M", hidden=[16]),  # conv-BN-ReLU-pool and Linear-BN1d-ReLU blocks
        dict(arch="resnet", depth=8, width=0.5),  # residual units: two paths added, strided, 1x1 shortcuts
        dict(arch="mlp", hidden=[32, 16], norm="batch", activation="tanh"),
    ])
    def test_theorem_holds_through_batch_norm_and_residual_blocks(self, fashion_small, network):
        rule = build_rule(RunSpec(rule=self.rule, data=fashion_small.name, **network), fashion_small).double()
        x, y = self.batch(fashion_small, n=40)
        errors = relative_errors(rule, x.double(), y)
        assert len(errors) == len(rule.net.layers)
        assert max(errors) < 1e-5, errors

    @pytest.mark.parametrize("network", [DEEP_NETWORKS["vgg"], dict(arch="lenet", width=0.25, hidden=[32])])
    def test_trains_exactly_as_bp_with_the_same_seed(self, fashion_small, network):
        # Every registered layer computes BP's numbers bit for bit (the same kernels as autograd's),
        # so a run of nan-bp is a run of bp, not just close to one.
        def trained(name):
            rule = build_rule(RunSpec(rule=name, data=fashion_small.name, **network), fashion_small)
            for i in range(4):
                rule.step(*self.batch(fashion_small, n=32, offset=32 * i))
            return rule.net.state_dict()

        bp, nan_bp = trained("bp"), trained(self.rule)
        assert all(torch.equal(bp[key], nan_bp[key]) for key in bp)

    def test_theorem_holds_in_float32_after_training(self, fashion_small):
        rule = self.make(fashion_small)
        for i in range(5):
            rule.step(*self.batch(fashion_small, offset=64 * i))
        assert max(relative_errors(rule, *self.batch(fashion_small, n=128, offset=512))) < 1e-5

    def test_statistics_report_cosine_one_per_epoch(self, fashion_small):
        rule = self.make(fashion_small)
        Trainer(rule, subset(fashion_small, 512, 200), TrainConfig(epochs=2, progress=False)).fit()
        stats = rule.statistics()
        assert len(stats["per_epoch"]) == 2
        for record in stats["per_epoch"]:
            assert list(record["attention_support"]) == [name for name, _ in weight_layers(rule.net)][1:]
            assert all(0 < s <= 1 for s in record["attention_support"].values())
            assert min(record["cosine_with_bp"]) > 0.99999
        restored = self.make(fashion_small)
        restored.load_extra_state(rule.extra_state())
        assert restored.epoch_records == rule.epoch_records


class TestNextLayerAttention(RuleContract):
    rule = "nan"
    accuracy_floor = 0.78  # seeds 0-4 x 1, 2 threads: min 0.817, median 0.831
    # min / median, seeds 0-4 x 1, 2 threads:
    # vgg 0.842 / 0.849, resnet 0.624 / 0.663, user 0.796 / 0.819
    # min / median, seeds 0-4 x 1, 2 threads:
    # vgg 0.842 / 0.849, resnet 0.624 / 0.663, user 0.796 / 0.819
    deep_floors = {"vgg": 0.81, "resnet": 0.58, "user": 0.76}

    def kernels(self, rule):
        return [(layer.weight.detach(), rule.attention_kernel(layer.weight.detach()))
                for _, layer in weight_layers(rule.net)]

    @pytest.mark.parametrize("options", [["attention=softmax"], ["attention=softmax", "tau=0.2", "budget=2.5"],
                                         ["attention=topk", "k=7"], ["attention=topk", "k=40", "budget=0.5"]])
    @pytest.mark.parametrize("arch", ["mlp", "conv"])
    def test_budget_per_next_layer_unit(self, fashion_small, options, arch):
        rule = self.make(fashion_small, arch=arch, hidden=[32], options=options)
        budget = rule.config.budget
        for weight, kernel in self.kernels(rule):
            rows, spent = weight.flatten(1), kernel.flatten(1)
            torch.testing.assert_close(spent.abs().sum(1), budget * rows.abs().sum(1), rtol=1e-5, atol=0)
            assert torch.equal(torch.sign(spent[spent != 0]), torch.sign(rows[spent != 0]))
            if rule.config.attention == "topk":
                k = min(rule.config.k, rows.shape[1])
                assert ((spent != 0).sum(1) == k).all()
                # ... and it attends to the k largest |w_ji|.
                smallest_kept = torch.where(spent != 0, rows.abs(), math.inf).min(1).values
                largest_dropped = torch.where(spent == 0, rows.abs(), -math.inf).max(1).values
                assert (smallest_kept >= largest_dropped).all()

    @pytest.mark.parametrize("options", [[], ["tau=0.2", "budget=2.5"], ["attention=topk", "k=7"]])
    def test_kernel_equals_the_formula_written_out(self, fashion_small, options):
        # The kernel is computed in place for speed; this is the formula of the docstring, step by step.
        def reference(weight, config):
            rows = weight.flatten(1)
            magnitude = rows.abs()
            if config.attention == "softmax":
                scale = magnitude.mean(1, keepdim=True).clamp_min(torch.finfo(magnitude.dtype).tiny)
                shares = torch.softmax(magnitude / (config.tau * scale), dim=1)
            else:
                top = magnitude.topk(min(config.k, rows.shape[1]), dim=1)
                kept = torch.zeros_like(magnitude).scatter_(1, top.indices, top.values)
                shares = kept / kept.sum(1, keepdim=True)
            return (torch.sign(rows) * shares * config.budget * magnitude.sum(1, keepdim=True)).view_as(weight)

        rule = self.make(fashion_small, arch="mlp", hidden=[64, 32], options=options)
        for weight, kernel in self.kernels(rule):
            before = weight.clone()
            torch.testing.assert_close(kernel, reference(weight, rule.config), rtol=1e-6, atol=0)
            assert torch.equal(weight, before)  # the in-place steps work on copies

    def test_per_sample_attention_sums_match_the_budget(self, fashion_small):
        # alpha_ji = s_j M_ji for one sample: j's total is budget |s_j| ||w_j||_1, and A_i = sum_j alpha_ji
        # is exactly what the rule passes down.
        rule = self.make(fashion_small, hidden=[32, 16], options=["attention=topk", "k=5", "budget=3"])
        x, y = self.batch(fashion_small, n=8)
        head = rule.net.head
        logits = rule.net(x).detach().requires_grad_()
        need = -torch.autograd.grad(rule.task_loss(logits, y), logits)[0]  # the head's need: the task's attention
        kernel = rule.attention_kernel(head.weight.detach())
        alpha = need[:, :, None] * kernel[None]  # (sample, j, i)
        weight_l1 = head.weight.detach().abs().sum(1)
        torch.testing.assert_close(alpha.abs().sum(2), 3 * need.abs() * weight_l1)
        assert ((alpha != 0).sum(2)[need != 0] == 5).all()
        # What the head's registered math passes down with this kernel is exactly A_i = sum_j alpha_ji ...
        torch.testing.assert_close(LINEAR.input_gradient(head, torch.zeros(8, 16), kernel, need), alpha.sum(1))
        # ... and what the rule's step sends to the last hidden block is the same (with the gradient sign).
        hidden_out = rule.net.blocks[-1](rule.net.blocks[0](x)).detach().requires_grad_()
        with swapped_input_gradients(rule.net, rule.feedback):
            rule.task_loss(head(hidden_out), y).backward()
        torch.testing.assert_close(-hidden_out.grad, alpha.sum(1))

    def test_full_topk_with_unit_budget_is_bp(self, fashion_small):
        rule = self.make(fashion_small, hidden=[64, 32], options=["attention=topk", "k=100000"]).double()
        x, y = self.batch(fashion_small, n=40)
        assert max(relative_errors(rule, x.double(), y)) < 1e-5

    def test_sparse_attention_is_not_bp_but_the_head_is(self, fashion_small):
        rule = self.make(fashion_small, options=["attention=topk", "k=10"])
        cosines = alignment(rule, *self.batch(fashion_small, n=256))
        assert cosines[-1] > 0.99999
        assert all(c < 0.9 for c in cosines[:-1]), cosines

    def test_concentration_follows_the_options(self, fashion_small):
        def support(options):
            rule = self.make(fashion_small, options=options)
            return [attention_support(kernel) for _, kernel in self.kernels(rule)[1:]]

        sharp, flat = support(["attention=softmax", "tau=0.1"]), support(["attention=softmax", "tau=100"])
        assert all(s < f for s, f in zip(sharp, flat)), (sharp, flat)
        assert all(s <= 10 / 256 for s in support(["attention=topk", "k=10"]))

    @pytest.mark.parametrize("bad", ["tau=0", "k=0", "budget=-1", "attention=lrp"])
    def test_bad_options_are_user_errors(self, bad):
        with pytest.raises(UserError):
            parse_options(BudgetConfig, [bad])
