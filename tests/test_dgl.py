"""dgl: each module (--modules) learns through its own auxiliary network; no error crosses a module; modules stay
whole in a pipeline."""

import pytest
import torch

from localcredit.errors import UserError
from localcredit.rules.base import parse_options
from localcredit.rules.dgl import DGLConfig
from localcredit.training.block_parallel import grouped_partition

from .conftest import DEEP_NETWORKS
from .rule_contract import RuleContract


def assert_module_local(rule, x, y):
    """A module's loss reaches every block of that module and no parameter below it."""
    groups = rule.layer_groups()
    losses = dict(rule.local_losses(x, y))
    assert sorted(losses) == [group[-1] for group in groups]
    for group in groups:
        loss = losses[group[-1]]
        below = [p for layer in rule.net.layers[:group[0]] for p in layer.parameters()]
        if below:
            assert all(g is None for g in torch.autograd.grad(loss, below, allow_unused=True, retain_graph=True))
        for l in group:
            own = torch.autograd.grad(loss, list(rule.net.layers[l].parameters()), retain_graph=True)
            assert all(g.abs().sum() > 0 for g in own), f"layer {l} does not learn from its module's loss"


class TestDecoupledGreedy(RuleContract):
    rule = "dgl"
    accuracy_floor = 0.79  # seeds 0-4 x 1, 2 threads: min 0.822, median 0.830
    # On resnet-8 at this budget dgl's test accuracy is near chance for some seeds (0.107 at seed 3) and a
    # sign-flipped dgl scores 0.192: no accuracy floor can tell them apart there; the falling training loss
    # (checked for every deep network) does (seed 3: 10.7 -> 8.5; broken: 21.9 -> 851). Issue 29 (modules)
    # is the remedy for local rules on residual nets.
    # min / median, seeds 0-4 x 1, 2 threads:
    # vgg 0.753 / 0.780, resnet 0.107 / 0.262, user 0.769 / 0.790
    deep_floors = {"vgg": 0.72, "resnet": 0.05, "user": 0.73}

    def class_rows(self, rule):
        return [*super().class_rows(rule), *(p for aux in rule.auxiliary.values() for p in aux[-1].parameters())]

    @pytest.mark.parametrize("network,modules,sizes", [
        (dict(arch="mlp", hidden=[64, 32, 32]), None, None),  # every block a module of its own
        (dict(DEEP_NETWORKS["resnet"], hidden=[]), [2], [2, 2]),  # K = 2: stem + unit 1 | units 2-3 (then the head)
        (DEEP_NETWORKS["vgg"], [2, 1], [2, 1]),
    ])
    def test_no_error_crosses_a_module(self, fashion_small, network, modules, sizes):
        rule = self.make(fashion_small, modules=modules, **network)
        assert rule.net.description.get("modules") == sizes
        assert sorted(rule.auxiliary) == [str(m) for m in range(len(rule.net.blocks))]  # one per module
        assert_module_local(rule, *self.batch(fashion_small, n=32))

    def test_the_group_option_points_to_modules(self):
        with pytest.raises(UserError, match="--modules"):
            parse_options(DGLConfig, ["group=2"])

    def test_auxiliary_network_is_mlp_sr(self, fashion_small):
        rule = self.make(fashion_small, options=["convs=2", "mlp=3"], **DEEP_NETWORKS["vgg"])
        aux = rule.auxiliary["0"]  # on a 16-channel 14x14 output
        kinds = [type(m).__name__ for m in aux]
        assert kinds == ["Conv2d", "BatchNorm2d", "ReLU"] * 2 + ["AdaptiveAvgPool2d", "Flatten", "Linear", "ReLU",
                                                                 "Linear", "ReLU", "Linear"]
        assert aux[0].out_channels == 16 and aux[-1].out_features == 10
        groups = rule.parameter_groups()
        assert {id(p) for p in aux.parameters()} <= {id(p) for p in groups[0]}

    def test_a_pipeline_never_cuts_a_module(self):
        modules = [range(0, 2), range(2, 4), range(4, 5)]
        assert grouped_partition([1, 1, 1, 1, 1], modules, 2) == [range(0, 2), range(2, 5)]
        assert grouped_partition([5, 5, 1, 1, 1], modules, 2) == [range(0, 2), range(2, 5)]
        assert grouped_partition([1, 1, 1, 1, 1], modules, 3) == modules

    @pytest.mark.parametrize("bad", ["group=0", "mlp=0", "convs=-1", "width=-2"])
    def test_bad_options_are_user_errors(self, bad):
        with pytest.raises(UserError):
            parse_options(DGLConfig, [bad])
