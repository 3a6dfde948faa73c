"""usf, frsf, brsf: the feedback shares W's signs; uSF is BP where a layer's weights share one magnitude."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import localcredit as lc
from localcredit.nets.layers import weight_layers
from localcredit.rules.alignment import bp_gradients

from .rule_contract import RuleContract
from .test_cli import one_line_error, write_npz

NETWORKS = [
    dict(arch="mlp", hidden=[64, 32]),
    dict(arch="vgg", channels="6,M,8,M", hidden=[16]),  # BN after every conv and dense layer, bias-free
    dict(arch="resnet", depth=8, width=0.5),  # residual units, strided convs, 1x1 shortcuts
]


def one_magnitude_per_layer(rule) -> list[float]:
    """Every weight layer's W set to a_l sign(W), a different a_l per layer; the a_l."""
    magnitudes = []
    with torch.no_grad():
        for l, (_, layer) in enumerate(weight_layers(rule.net)):
            magnitudes.append(2.0 ** -(4 + l % 3))  # a power of 2: the mean of |W| is a_l exactly
            layer.weight.copy_(layer.weight.sign() * magnitudes[-1])
    return magnitudes


def assert_sign_concordant(rule) -> None:
    """Every weight layer's feedback has its weight's signs (and its size: mean |V| = mean |W| within 10 %)."""
    for name, layer in weight_layers(rule.net):
        feedback, weight = rule.feedback(name, layer), layer.weight.detach()
        assert torch.equal(feedback.sign(), weight.sign()), name
        assert feedback.abs().mean() == pytest.approx(weight.abs().mean().item(), rel=0.1), name


class TestUniformSignFeedback(RuleContract):
    rule = "usf"
    learn_hidden = [256]  # the MLP case on 784-256-10: a third of 784-1000-10's time (the suite's budget)
    accuracy_floor = 0.78  # seeds 0-4 x 1, 2 threads: min 0.815, median 0.822
    # min / median, seeds 0-4 x 1, 2 threads:
    # vgg 0.837 / 0.844, resnet 0.571 / 0.644, user 0.786 / 0.813
    deep_floors = {"vgg": 0.80, "resnet": 0.52, "user": 0.75}

    # The suite's time budget: the user's net (conv-BN, as vgg) learns under kp; measured here all the same.
    @pytest.mark.parametrize("network", ["vgg", "resnet"])
    def test_learns_fashion_mnist_on_deep_networks(self, fashion_deep, network):
        super().test_learns_fashion_mnist_on_deep_networks(fashion_deep, network)

    @pytest.mark.parametrize("network", NETWORKS, ids=[n["arch"] for n in NETWORKS])
    def test_equals_bp_when_a_layer_has_one_weight_magnitude(self, fashion_small, network):
        # mean |W| sign(W) = W when every |W| of a layer is the same: the feedback is W itself.
        rule = self.make(fashion_small, **network)
        one_magnitude_per_layer(rule)
        x, y = self.batch(fashion_small, n=40)
        for got, want in zip(rule.update_directions(x, y), bp_gradients(rule, x, y)):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)

    def test_a_fixed_scale_gives_bp_up_to_one_factor_per_block(self, fashion_small):
        # With c = 1 the feedback is W / a_l: each block's update is BP's times the product of 1/a_k above it.
        rule = self.make(fashion_small, hidden=[64, 32], options=["scale=1"])
        magnitudes = one_magnitude_per_layer(rule)
        x, y = self.batch(fashion_small, n=40)
        got, want = rule.update_directions(x, y), bp_gradients(rule, x, y)
        for l, (g, w) in enumerate(zip(got, want)):
            factor = torch.tensor(magnitudes[l + 1:]).reciprocal().prod().item()
            torch.testing.assert_close(g, w * factor, rtol=1e-4, atol=1e-6 * factor)

    def test_feedback_follows_the_signs_of_the_weights(self, fashion_small):
        rule = self.make(fashion_small)
        assert_sign_concordant(rule)
        rule.step(*self.batch(fashion_small))
        assert_sign_concordant(rule)
        assert len(list(rule.buffers())) == 0, "uSF keeps nothing of its own"


class TestFixedRandomSignFeedback(RuleContract):
    rule = "frsf"
    learn_hidden = [256]
    accuracy_floor = 0.77  # seeds 0-4 x 1, 2 threads: min 0.804, median 0.821
    # min / median, seeds 0-4 x 1, 2 threads:
    # vgg 0.837 / 0.839, resnet 0.562 / 0.599, user 0.782 / 0.815
    deep_floors = {"vgg": 0.80, "resnet": 0.52, "user": 0.75}

    @pytest.mark.skip(reason="the suite's time budget: usf learns on vgg and resnet through the same sign machinery; "
                             "this rule's deep cases are measured by benchmarks/learning_floors.py")
    def test_learns_fashion_mnist_on_deep_networks(self):
        pass

    def test_magnitudes_are_drawn_once_and_the_signs_follow_the_weights(self, fashion_small):
        rule = self.make(fashion_small)
        magnitudes = [m.clone() for m in rule.buffers()]
        assert len(magnitudes) == len(weight_layers(rule.net)) and all(not m.requires_grad for m in magnitudes)
        assert all((m >= 0).all() and m.mean().item() == pytest.approx(1, abs=0.05) for m in magnitudes)
        assert_sign_concordant(rule)
        for i in range(2):
            rule.step(*self.batch(fashion_small, offset=64 * i))
            assert all(torch.equal(b, a) for b, a in zip(magnitudes, rule.buffers()))
            assert_sign_concordant(rule)
        for m, (name, layer) in zip(magnitudes, weight_layers(rule.net)):
            weight = layer.weight.detach()
            torch.testing.assert_close(rule.feedback(name, layer), weight.abs().mean() * m * weight.sign())


class TestBatchRandomSignFeedback(RuleContract):
    rule = "brsf"
    learn_hidden = [256]
    accuracy_floor = 0.76  # seeds 0-4 x 1, 2 threads: min 0.797, median 0.815
    # min / median, seeds 0-4 x 1, 2 threads:
    # vgg 0.827 / 0.833, resnet 0.562 / 0.612, user 0.782 / 0.812
    deep_floors = {"vgg": 0.79, "resnet": 0.50, "user": 0.75}

    @pytest.mark.skip(reason="the suite's time budget: usf learns on vgg and resnet through the same sign machinery; "
                             "this rule's deep cases are measured by benchmarks/learning_floors.py")
    def test_learns_fashion_mnist_on_deep_networks(self):
        pass

    def test_magnitudes_are_redrawn_for_every_batch(self, fashion_small):
        rule = self.make(fashion_small, options=["init=gaussian"])
        x, y = self.batch(fashion_small)
        directions = rule.update_directions(x, y)
        for d, again in zip(directions, rule.update_directions(x, y)):
            assert torch.equal(d, again), "between two steps the update is measured with the last draw, as often as asked"
        for i in range(2):
            before = [m.clone() for m in rule.buffers()]
            rule.step(*self.batch(fashion_small, offset=64 * i))
            after = list(rule.buffers())
            assert len(after) == len(weight_layers(rule.net)) and all(not m.requires_grad for m in after)
            assert all(not torch.equal(b, a) for b, a in zip(before, after)), "every step draws anew"
            assert all((m >= 0).all() and m.mean().item() == pytest.approx(1, abs=0.05) for m in after)
            assert_sign_concordant(rule)


@pytest.mark.parametrize("rule", ["usf", "frsf", "brsf"])
def test_an_unregistered_layer_type_is_refused_in_one_line_naming_it(rule):
    class Gate(nn.Module):  # a module whose backward nobody registered
        def forward(self, x):
            return x * torch.sigmoid(x)

    net = lc.blocknet(nn.Sequential(nn.Flatten(), nn.Linear(784, 32), Gate(), nn.Linear(32, 10)),
                      input_shape=(1, 28, 28), num_classes=10, group=[3, 1])
    with pytest.raises(lc.UserError) as error:
        lc.make_rule(rule, net)
    assert "Gate" in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("rule,option,named", [
    ("usf", "scale=-0.5", "scale"), ("frsf", "scale=-1", "scale"), ("brsf", "scale=nan", "scale"),
    ("frsf", "init=cauchy", "init"), ("brsf", "init=cauchy", "init"), ("usf", "init=uniform", "init"),
])
def test_a_bad_option_exits_2_with_one_line_naming_it(rule, option, named, capsys, tmp_path):
    data = write_npz(tmp_path / "small.npz")
    out = tmp_path / "out"
    one_line_error(capsys, ["train", "--rule", rule, "--data", data, "--set", option, "--out", str(out)], named)
    assert not out.exists()


def test_feedback_cosine_with_the_weights_orders_the_rules(fashion_small):
    # uSF's feedback is the closest c sign(W) to W; random magnitudes take it further away (frSF, brSF alike).
    torch.manual_seed(0)
    net = lc.blocknet(nn.Sequential(nn.Flatten(), nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 10)),
                      input_shape=(1, 28, 28), num_classes=10, group=[3, 1])
    name, layer = weight_layers(net)[-1]
    cosine = {r: F.cosine_similarity(lc.make_rule(r, net).feedback(name, layer).flatten(),
                                     layer.weight.detach().flatten(), dim=0).item() for r in ("usf", "frsf", "brsf")}
    assert 0.8 < cosine["usf"] < 0.9  # E|w| / sqrt(E w^2) = sqrt(3)/2 for uniform weights
    assert 0.5 < cosine["frsf"] < cosine["usf"] and 0.5 < cosine["brsf"] < cosine["usf"]
