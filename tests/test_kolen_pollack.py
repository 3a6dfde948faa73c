"""kp: BP once B = W; B gets W's update and decays with it, so B - W shrinks and the alignment with BP rises."""

import pytest
import torch
from torch import nn

import localcredit as lc
from localcredit.experiment import RunSpec, build_rule
from localcredit.nets.layers import weight_layers
from localcredit.rules.alignment import alignment, bp_gradients
from localcredit.training.config import TrainConfig
from localcredit.training.trainer import Trainer

from .rule_contract import RuleContract
from .test_cli import one_line_error, write_npz


class TestKolenPollack(RuleContract):
    rule = "kp"
    learn_hidden = [256]  # the MLP case on 784-256-10: a third of 784-1000-10's time (the suite's budget)
    accuracy_floor = 0.77  # seeds 0-4 x 1, 2 threads: min 0.804, median 0.816
    # min / median, seeds 0-4 x 1, 2 threads:
    # vgg 0.793 / 0.819, resnet 0.207 / 0.319, user 0.786 / 0.808
    deep_floors = {"vgg": 0.76, "resnet": 0.13, "user": 0.75}

    # The suite's time budget: one deep network, a user's own from the Python API (usf learns on vgg and resnet
    # through the same layer registry); measured on all three by benchmarks/learning_floors.py.
    @pytest.mark.parametrize("network", ["user"])
    def test_learns_fashion_mnist_on_deep_networks(self, fashion_deep, network):
        super().test_learns_fashion_mnist_on_deep_networks(fashion_deep, network)

    def differences(self, rule) -> list[torch.Tensor]:
        return [rule.difference(i) for i in range(len(weight_layers(rule.net)))]

    @pytest.mark.parametrize("network", [
        dict(arch="mlp", hidden=[64, 32]),
        dict(arch="vgg", channels="6,M,8,M", hidden=[16]),  # BN after every conv and dense layer, bias-free
        dict(arch="resnet", depth=8, width=0.5),  # residual units, strided convs, 1x1 shortcuts
    ], ids=["mlp", "vgg", "resnet"])
    def test_equals_bp_once_the_feedback_is_the_weight(self, fashion_small, network):
        rule = self.make(fashion_small, **network)
        for d in self.differences(rule):
            d.zero_()
        x, y = self.batch(fashion_small, n=40)
        for got, want in zip(rule.update_directions(x, y), bp_gradients(rule, x, y)):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)

    @pytest.mark.parametrize("optimizer", ["sgd", "adam"])
    def test_the_feedback_gets_the_weights_update_and_both_decay_alike(self, fashion_small, optimizer):
        # Akrout et al. eqs. 16-17: W <- W - eta dW - lambda W, B <- B - eta dW - lambda B.
        decay = 0.05
        spec = RunSpec(rule="kp", data=fashion_small.name, hidden=[32], options=[f"decay={decay}"],
                       optimizer=optimizer, momentum=0.0, lr=0.1 if optimizer == "sgd" else 1e-3)
        rule = build_rule(spec, fashion_small)
        layers = weight_layers(rule.net)
        before = [(rule.feedback(name, layer).clone(), layer.weight.detach().clone()) for name, layer in layers]
        x, y = self.batch(fashion_small)
        rule.zero_grad()
        rule.assign_credit(x, y)
        gradients = [layer.weight.grad.clone() for _, layer in layers]
        rule.step(x, y)
        for (name, layer), (b, w), g in zip(layers, before, gradients):
            # The optimiser's own step, the same for W and B whatever it is (plain SGD: -lr g).
            moved = layer.weight.detach() - (1 - decay) * w
            if optimizer == "sgd":
                torch.testing.assert_close(moved, -0.1 * g)
            torch.testing.assert_close(rule.feedback(name, layer), (1 - decay) * b + moved)

    def test_the_feedback_is_no_parameter_and_a_checkpoint_restores_it(self, fashion_small):
        rule = self.make(fashion_small, hidden=[32])
        feedback = set(map(id, self.differences(rule)))
        assert not feedback & {id(p) for p in rule.parameters()}, "B is not trained by an optimiser"
        assert not feedback & {id(p) for group in rule.optimizers for g in group.param_groups for p in g["params"]}
        rule.step(*self.batch(fashion_small))
        state = rule.checkpoint_state()
        fresh = self.make(fashion_small, hidden=[32], seed=1)
        fresh.load_checkpoint_state(state)
        for a, b in zip(self.differences(rule), self.differences(fresh)):
            assert torch.equal(a, b)

    def test_alignment_with_bp_rises_as_the_feedback_converges(self, fashion_small):
        # 200 steps with lambda = 0.01: B - W falls to (0.99)^200 = 13 % of its start (the default 1e-3 takes
        # 10x the steps; docs/sign-feedback.md traces it on the VGG).
        rule = self.make(fashion_small, hidden=[256, 256], options=["decay=0.01"])
        x, y = self.batch(fashion_small, n=256)
        start = alignment(rule, x, y)
        Trainer(rule, fashion_small, TrainConfig(epochs=1, batch_size=32, seed=0, progress=False, limit_train=6400)).fit()
        end = alignment(rule, x, y)
        assert all(c < 0.2 for c in start[:-1]) and all(c > 0.9 for c in end[:-1]), (start, end)
        cosine = rule.statistics()["feedback_weight_cosine"]
        assert all(c > 0.8 for c in cosine.values()), cosine


def test_an_unregistered_layer_type_is_refused_in_one_line_naming_it():
    class Gate(nn.Module):  # a module whose backward nobody registered
        def forward(self, x):
            return x * torch.sigmoid(x)

    net = lc.blocknet(nn.Sequential(nn.Flatten(), nn.Linear(784, 32), Gate(), nn.Linear(32, 10)),
                      input_shape=(1, 28, 28), num_classes=10, group=[3, 1])
    with pytest.raises(lc.UserError) as error:
        lc.make_rule("kp", net)
    assert "Gate" in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("option,named", [("decay=-0.1", "decay"), ("decay=1", "decay"), ("init=cauchy", "init")])
def test_a_bad_option_exits_2_with_one_line_naming_it(option, named, capsys, tmp_path):
    data = write_npz(tmp_path / "small.npz")
    out = tmp_path / "out"
    one_line_error(capsys, ["train", "--rule", "kp", "--data", data, "--set", option, "--out", str(out)], named)
    assert not out.exists()
