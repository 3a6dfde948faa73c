"""gaitprop, tp, itp and the invertible network: BP-exact where theory says so, and not otherwise."""

import math

import pytest
import torch

from localcredit.data import Dataset
from localcredit.errors import UserError
from localcredit.experiment import RunSpec, build_rule
from localcredit.nets.architectures import NetSpec
from localcredit.nets.blocknet import BlockNet
from localcredit.nets.invertible import (
    Factorisation,
    InvertibleBlock,
    InvertibleIdentity,
    InvertibleLeakyReLU,
    SpaceToDepth,
    check_invertible,
    default_width,
    invertible,
    invertible_op,
    orthogonal_linear,
    orthogonal_patch_conv,
)
from localcredit.rules.alignment import alignment
from localcredit.rules.gaitprop import DEFAULT_ADAM_LR, DEFAULT_ADAM_LR_BY_ARCH
from localcredit.training.config import TrainConfig
from localcredit.training.trainer import Trainer

from .conftest import fashion_data
from .learning import Breakage, break_rule, fit, learning_case
from .rule_contract import RuleContract


def perturb_weights(rule, scale=0.05, seed=1):
    """Move every inverted layer away from orthogonality (W^{-1} != W^T)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in rule.inverted_blocks():
            weight = block.layer.weight
            weight.add_(scale * torch.randn(weight.shape, generator=generator) / math.sqrt(len(weight)))


class TestGaitProp(RuleContract):
    rule = "gaitprop"
    supports_conv = False
    hidden = [128, 128]
    # 784-wide layers learn the same but cost 4x more; 3 seeds gave 0.784-0.7925 here.
    learn_hidden = [256, 256]
    learn_epochs = 2
    accuracy_floor = 0.75  # seeds 0-4 x 1, 2 threads: min 0.785, median 0.792
    # The orthogonality regulariser moves rows of every inverted layer, the output layer's included, whatever
    # the classes: it is no class loss, so the output-masking tests leave it out.
    mask_options = ["ortho=0"]

    def test_equals_bp_for_orthogonal_weights_float64(self, fashion_small):
        rule = self.make(fashion_small, hidden=[128] * 4, options=["dtype=float64"])
        cosines = alignment(rule, *self.batch(fashion_small, n=32))
        assert len(cosines) == 5
        assert min(cosines) >= 0.999, cosines

    def test_deep_float32_with_adaptive_gamma_follows_bp(self, fashion_small):
        rule = self.make(fashion_small, hidden=[256] * 8, options=[])
        assert rule.config.dtype == "float32" and rule.config.gamma == "adaptive"
        cosines = alignment(rule, *self.batch(fashion_small, n=64))
        assert min(cosines) >= 0.99, cosines

    def test_large_nudges_cross_kinks_and_leave_bp(self, fashion_small):
        # The nonlinear path is real: a nudge of the size of the activities is no longer BP.
        rule = self.make(fashion_small, hidden=[128] * 3, options=["gamma0=1.0", "dtype=float64"])
        cosines = alignment(rule, *self.batch(fashion_small, n=64))
        assert min(cosines[:-2]) < 0.99, cosines

    def test_head_update_is_bp_even_off_orthogonal(self, fashion_small):
        rule = self.make(fashion_small)
        perturb_weights(rule, scale=0.5)
        cosines = alignment(rule, *self.batch(fashion_small, n=64))
        assert cosines[-1] > 0.99999

    def test_update_directions_leave_out_the_regulariser(self, fashion_small):
        x, y = self.batch(fashion_small, n=32)
        with_reg = self.make(fashion_small, options=["ortho=10"])
        without = self.make(fashion_small, options=["ortho=0"])
        for rule in (with_reg, without):
            perturb_weights(rule)
        for a, b in zip(with_reg.update_directions(x, y), without.update_directions(x, y)):
            torch.testing.assert_close(a, b)

    @pytest.mark.parametrize("every", [1, 3])
    def test_regulariser_gradient_matches_autograd(self, fashion_small, every):
        # Step s regularises the rows r with r % every == s % every, with weight every * lambda: over
        # `every` steps each row gets every * lambda times its exact gradient once.
        x, y = self.batch(fashion_small, n=16)
        rule = self.make(fashion_small, hidden=[64, 64], options=["ortho=0.3", f"ortho_every={every}"])
        perturb_weights(rule, scale=0.3)
        plain = [g.clone() for g in rule.update_directions(x, y)]
        for step in range(every):
            rule.steps = step
            rule.zero_grad()
            rule.assign_credit(x, y)
            for block, block_plain in zip(rule.inverted_blocks(), plain[1:]):
                weight = block.layer.weight
                w = weight.detach().clone().requires_grad_()
                penalty = 0.3 * every * (w @ w.t() - torch.eye(len(w))).square().sum()
                (expected,) = torch.autograd.grad(penalty, w)
                expected[[r for r in range(len(w)) if r % every != step % every]] = 0
                got = weight.grad - block_plain[:weight.numel()].view_as(weight)
                torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
                assert got.abs().sum() > 0

    def test_regulariser_keeps_weights_orthogonal(self, fashion_small):
        def drift(ortho):
            rule = self.make(fashion_small, hidden=[64, 64], options=[f"ortho={ortho}"])
            rule.optim.lr = 3e-3
            for i in range(20):
                rule.step(*self.batch(fashion_small, n=64, offset=64 * i))
            return max(rule.statistics()["orthogonality_error"])

        assert drift(1.0) < 0.5 * drift(0.0)

    def test_default_lr_and_explicit_lr(self, fashion_small):
        assert self.make(fashion_small).optimizers[0].param_groups[0]["lr"] == DEFAULT_ADAM_LR
        spec = RunSpec(rule="gaitprop", data=fashion_small.name, hidden=[64], lr=0.01)
        assert build_rule(spec, fashion_small).optimizers[0].param_groups[0]["lr"] == 0.01
        conv = build_rule(RunSpec(rule="tp", data=fashion_small.name, arch="invertible-conv"), fashion_small)
        assert conv.optimizers[0].param_groups[0]["lr"] == DEFAULT_ADAM_LR_BY_ARCH["invertible-conv"]

    def test_checkpoint_keeps_step_count(self, fashion_small):
        rule = self.make(fashion_small, hidden=[64])
        rule.step(*self.batch(fashion_small))
        other = self.make(fashion_small, hidden=[64])
        other.load_checkpoint_state(rule.checkpoint_state())
        assert other.steps == rule.steps == 1

    def test_refuses_other_networks_and_bad_options(self, fashion_small):
        with pytest.raises(UserError, match="invertible"):
            self.make(fashion_small, arch="mlp")
        for bad in (["gamma0=0"], ["ortho=-1"], ["ortho_every=0"], ["gamma=sometimes"]):
            with pytest.raises(UserError):
                self.make(fashion_small, options=bad)


class TestTargetPropBaselines:
    def make(self, data, rule, hidden=(128, 128, 128), options=()):
        return build_rule(RunSpec(rule=rule, data=data.name, hidden=list(hidden), options=list(options)), data)

    @pytest.mark.parametrize("rule", ["tp", "itp"])
    def test_clearly_less_aligned_than_gaitprop(self, fashion_small, rule):
        x, y = fashion_small.x_train[:128], fashion_small.y_train[:128]
        gait = alignment(self.make(fashion_small, "gaitprop"), x, y)
        other = alignment(self.make(fashion_small, rule), x, y)
        # The last hidden block sits under the linear head (f' = 1 there): all three agree on it.
        assert other[-1] > 0.99999 and other[-2] > 0.999
        assert max(other[:-2]) < 0.8 < min(gait), (other, gait)

    @pytest.mark.parametrize("rule", ["tp", "itp"])
    def test_steps_and_is_deterministic(self, fashion_small, rule):
        def run(seed):
            torch.manual_seed(seed)
            r = build_rule(RunSpec(rule=rule, data=fashion_small.name, hidden=[64, 64], seed=seed), fashion_small)
            losses = [r.step(fashion_small.x_train[64 * i:64 * i + 64], fashion_small.y_train[64 * i:64 * i + 64])["loss"]
                      for i in range(3)]
            assert all(math.isfinite(loss) for loss in losses)
            return torch.cat([p.detach().reshape(-1) for p in r.net.parameters()])

        assert torch.equal(run(0), run(0))
        assert not torch.equal(run(0), run(1))

    def test_tp_targets_are_exact_inverses(self, fashion_small):
        # TP's e_{l-1} = g_l^{-1}(y_l + e_l) - y_{l-1}: check one layer against the explicit inverse.
        rule = self.make(fashion_small, "tp", hidden=[32, 32], options=["dtype=float64"])
        perturb_weights(rule, scale=0.5)
        block = rule.net.layers[1]
        w, b = block.layer.weight.double().detach(), block.layer.bias.double().detach()
        h = torch.randn(8, 32, dtype=torch.float64)
        a = h @ w.t() + b
        out = block.activation(a)
        error = 0.3 * torch.randn_like(out)
        delta_u, _ = rule.nudge(error, block.activation.derivative(a))
        delta_a = rule._pre_activation_change(block.activation, a, out, delta_u, block.activation.derivative(a))
        got = Factorisation(w).solve(delta_a)[0]
        target_below = (block.activation.inverse(out + error) - b) @ torch.linalg.inv(w).t()
        torch.testing.assert_close(h + got, target_below)


class TestInvertibleNetwork:
    def test_leaky_relu_inverse_round_trips(self):
        f = InvertibleLeakyReLU()
        a = torch.randn(1000, dtype=torch.float64) * 3
        torch.testing.assert_close(f.inverse(f(a)), a)
        torch.testing.assert_close(f(f.inverse(a)), a)
        assert f(torch.tensor(-1.0)).item() == pytest.approx(-0.1)
        a32 = a.float().requires_grad_()
        f(a32).sum().backward()
        torch.testing.assert_close(f.derivative(a32.detach()), a32.grad)

    def test_solve_is_a_linear_solve(self):
        w = torch.randn(50, 50, dtype=torch.float64)
        delta_a = torch.randn(7, 50, dtype=torch.float64)
        e = Factorisation(w).solve(delta_a)[0]
        torch.testing.assert_close(e @ w.t(), delta_a)

    def test_shape_square_orthogonal_and_head_keeps_the_logits(self):
        torch.manual_seed(0)
        net = invertible(NetSpec(), (1, 28, 28), 10)
        assert net.hidden == [784] * 3 and len(net.layers) == 4
        for block in net.layers:
            w = block.layer.weight.detach()
            assert w.shape == (784, 784)
            torch.testing.assert_close(w @ w.t(), torch.eye(784), atol=1e-4, rtol=0)
        assert net(torch.randn(5, 1, 28, 28)).shape == (5, 10)

    def test_width_rules(self):
        assert default_width(3 * 32 * 32, 10) == 1024  # capped: N^3 work per step
        assert default_width(784, 10) == 784 and default_width(20, 100) == 100
        assert invertible(NetSpec(), (4,), 3).hidden == [32] * 3
        net = invertible(NetSpec(hidden=[40, 40]), (20,), 5)
        assert net.layers[0].layer.weight.shape == (40, 20)  # the first layer may be non-square
        assert invertible(NetSpec(hidden=[]), (20,), 5).head.layer.weight.shape == (5, 20)
        with pytest.raises(UserError, match="square"):
            invertible(NetSpec(hidden=[40, 30]), (20,), 5)
        with pytest.raises(UserError, match="classes"):
            invertible(NetSpec(hidden=[40]), (20,), 50)
        with pytest.raises(UserError, match="leaky"):
            invertible(NetSpec(activation="tanh"), (20,), 5)

    @pytest.mark.parametrize("rule", ["gaitprop", "tp", "itp", "bp"])
    def test_unseen_shapes_train(self, rule):
        generator = torch.Generator().manual_seed(0)
        for shape, classes, arch in (((3, 8, 8), 5, "invertible"), ((20,), 3, "invertible"),
                                     ((3, 8, 8), 5, "invertible-conv"), ((2, 6, 10), 4, "invertible-conv")):
            x = torch.randn(64, *shape, generator=generator)
            y = torch.randint(classes, (64,), generator=generator)
            data = Dataset(name="synthetic", x_train=x, y_train=y, x_test=x, y_test=y, num_classes=classes)
            default = arch == "invertible" and rule != "bp"
            r = build_rule(RunSpec(rule=rule, data="synthetic", arch=None if default else arch), data)
            assert r.net.arch == arch
            assert math.isfinite(r.step(x, y)["loss"])
            assert r.logits(x).shape == (64, classes)


# ----- the invertible-layer protocol, invertible convs, deep nets ---------------------------------------
def fashion_14_data() -> Dataset:
    """3k training and 1k test images, 2x2-averaged to 14 x 14: conv nets small enough for a test."""
    fashion = fashion_data()

    def shrink(x):
        return torch.nn.functional.avg_pool2d(x, 2)

    return Dataset(name=fashion.name, x_train=shrink(fashion.x_train[:3000]), y_train=fashion.y_train[:3000],
                   x_test=shrink(fashion.x_test[:1000]), y_test=fashion.y_test[:1000], num_classes=10)


@pytest.fixture(scope="module")
def fashion_14():
    return fashion_14_data()


#: 94 steps on 14 x 14 images (benchmarks/learning_floors.py: min / median of 5 seeds x 1, 2 threads)
# min / median, seeds 0-4 x 1, 2 threads: gaitprop 0.694 / 0.715, tp 0.649 / 0.686, itp 0.670 / 0.694
CONV_FLOORS = {"gaitprop": 0.66, "tp": 0.61, "itp": 0.64}


def learn_on_the_conv_net(data: Dataset, rule: str, seed: int = 0, broken: Breakage | None = None) -> dict:
    r = build_rule(RunSpec(rule=rule, data=data.name, arch="invertible-conv", lr=1e-3, seed=seed), data)
    assert [type(block.layer).__name__ for block in r.net.layers] == ["PatchConv2d"] * 3 + ["Linear"]
    return fit(Trainer(break_rule(r, broken), data, TrainConfig(epochs=2, batch_size=64, seed=seed, progress=False)),
               broken)


for _rule, _floor in CONV_FLOORS.items():
    learning_case(f"test_gaitprop::conv-net[{_rule}]", _floor)(
        lambda seed, broken=None, rule=_rule: learn_on_the_conv_net(fashion_14_data(), rule, seed, broken)["test_accuracy"])


def dense_jacobian(block, input_shape):
    """The block's linear part (without bias) as a dense matrix on the flattened input, column by column."""
    n = math.prod(input_shape)
    basis = torch.eye(n, dtype=torch.float64).view(n, *input_shape)
    with torch.no_grad():
        zero = block.trace(torch.zeros(1, *input_shape, dtype=torch.float64), torch.float64).pre_activation
        return (block.trace(basis, torch.float64).pre_activation - zero).reshape(n, -1).t()


def conv_block(in_channels=2, patch=2):
    torch.manual_seed(0)
    return InvertibleBlock(orthogonal_patch_conv(in_channels, patch), InvertibleLeakyReLU())


def dense_block(n=24):
    torch.manual_seed(0)
    return InvertibleBlock(orthogonal_linear(n, n), InvertibleLeakyReLU())


class TestInvertibleLayers:
    def test_space_to_depth_round_trips_exactly(self):
        s2d = SpaceToDepth(2)
        x = torch.randn(3, 5, 8, 6)
        assert s2d(x).shape == (3, 20, 4, 3)
        assert torch.equal(s2d.inverse(s2d(x)), x)
        y = torch.randn(3, 20, 4, 3)
        assert torch.equal(s2d(s2d.inverse(y)), y)

    def test_patch_conv_is_space_to_depth_then_one_matrix_per_position(self):
        conv = orthogonal_patch_conv(3, 2)
        with torch.no_grad():
            conv.weight.add_(0.1 * torch.randn_like(conv.weight))
            conv.bias.normal_()
        op = invertible_op(conv)
        x = torch.randn(4, 3, 6, 8)
        rows = op.input_rows(conv, x) @ op.matrix(conv, torch.float32).t() + conv.bias
        torch.testing.assert_close(rows, op.output_rows(conv, conv(x)))
        pointwise = torch.nn.Conv2d(12, 12, 1)
        with torch.no_grad():
            pointwise.weight.copy_(conv.weight.reshape(12, 12, 1, 1))
            pointwise.bias.copy_(conv.bias)
        torch.testing.assert_close(pointwise(SpaceToDepth(2)(x)), conv(x))
        assert torch.equal(op.rows_to_input(conv, op.input_rows(conv, x), x.shape), x)

    @pytest.mark.parametrize("kind", ["dense", "conv", "space-to-depth+conv"])
    def test_solve_matches_a_dense_reference_inverse(self, kind):
        if kind == "dense":
            block, shape = dense_block(), (24,)
        elif kind == "conv":
            block, shape = conv_block(), (2, 4, 6)
        else:
            torch.manual_seed(0)
            block, shape = InvertibleBlock(orthogonal_patch_conv(8, 1), InvertibleLeakyReLU(),
                                           rearrange=[SpaceToDepth(2)]), (2, 4, 6)
        n = len(block.matrix(torch.float64))
        with torch.no_grad():  # far from orthogonal: W^{-1} is not W^T
            block.layer.weight.add_(0.5 * torch.randn_like(block.layer.weight) / math.sqrt(n))
        reference_inverse = torch.linalg.inv(dense_jacobian(block, shape))
        x = torch.randn(5, *shape, dtype=torch.float64)
        trace = block.trace(x, torch.float64)
        delta_a = torch.randn_like(trace.pre_activation)
        expected = (delta_a.reshape(5, -1) @ reference_inverse.t()).view(5, *shape)
        matrix = block.matrix(torch.float64)
        got, _ = block.solve(trace, delta_a, Factorisation(matrix))
        torch.testing.assert_close(got, expected)
        # Factors of a matrix that has moved since: the solve is off, and says by about how much.
        stale = Factorisation(matrix + 1e-2 * torch.randn_like(matrix) / math.sqrt(n))
        off, estimate = block.solve(trace, delta_a, stale, matrix)
        actual = ((off - expected).norm() / expected.norm()).item()
        assert 1e-4 < actual < 0.1
        assert actual / 3 < estimate < 3 * actual, (estimate, actual)

    def test_a_stale_solve_of_few_rows_is_refined(self):
        # Rows at most n/8 (the output layer's unit vectors): one refinement step against the current M,
        # whose error is about the square of the stale one; it reports that square.
        torch.manual_seed(0)
        n = 64
        matrix = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64))[0]
        stale = Factorisation(matrix + 1e-2 * torch.randn_like(matrix) / math.sqrt(n))
        rhs = torch.randn(n // 8, n, dtype=torch.float64)
        exact = torch.linalg.solve(matrix, rhs.t()).t()
        unrefined = stale.solve(rhs)[0]
        refined, error = stale.solve(rhs, matrix)
        stale_error = ((unrefined - exact).norm() / exact.norm()).item()
        refined_error = ((refined - exact).norm() / exact.norm()).item()
        assert refined_error < stale_error ** 2 * 3 and stale_error > 1e-3
        assert stale_error ** 2 / 3 < error < stale_error ** 2 * 3

    def test_solve_on_a_few_units_matches_the_full_solve(self):
        # The output layer's error lives on its logits only: the solve uses their unit vectors.
        w = torch.randn(40, 40, dtype=torch.float64)
        rhs = torch.zeros(7, 40, dtype=torch.float64)
        rhs[:, :5] = torch.randn(7, 5, dtype=torch.float64)
        got, _ = Factorisation(w).solve(rhs)
        torch.testing.assert_close(got @ w.t(), rhs)

    def test_unregistered_and_non_invertible_layouts_are_refused(self, fashion_small):
        with pytest.raises(UserError, match="Conv2d is not an invertible layer type"):
            InvertibleBlock(torch.nn.Conv2d(2, 8, 3), InvertibleLeakyReLU())
        with pytest.raises(UserError, match="not an invertible activation"):
            InvertibleBlock(orthogonal_linear(4, 4), torch.nn.ReLU())
        first = InvertibleBlock(orthogonal_linear(784, 32), InvertibleLeakyReLU(), rearrange=[torch.nn.Flatten()])
        net = BlockNet([first,
                        InvertibleBlock(orthogonal_linear(32, 16), InvertibleLeakyReLU())],
                       InvertibleBlock(orthogonal_linear(16, 10), InvertibleIdentity()), (1, 28, 28), 10)
        with pytest.raises(UserError, match="block 1 is not square"):
            check_invertible(net, "gaitprop")


class TestDeepAndConvNetworks:
    @pytest.mark.parametrize("network", [dict(arch="invertible-conv", patches=[7, 2, 1, 1, 1]),
                                         dict(arch="invertible", hidden=[128] * 7)])
    def test_gaitprop_equals_bp_for_orthogonal_weights_float32(self, fashion_14, network):
        rule = build_rule(RunSpec(rule="gaitprop", data=fashion_14.name, **network), fashion_14)
        assert rule.config.dtype == "float32"
        cosines = alignment(rule, fashion_14.x_train[:64], fashion_14.y_train[:64])
        assert len(cosines) == len(network.get("patches", network.get("hidden"))) + 1
        assert min(cosines) >= 0.999, cosines

    @pytest.mark.parametrize("rule", CONV_FLOORS)
    def test_learns_on_the_conv_net(self, fashion_14, rule):
        result = learn_on_the_conv_net(fashion_14, rule)
        assert result["test_accuracy"] >= CONV_FLOORS[rule], result["test_accuracy_per_epoch"]

    def test_factors_within_the_tolerance_give_the_fresh_update(self, fashion_14):
        rule = build_rule(RunSpec(rule="gaitprop", data=fashion_14.name, arch="invertible-conv",
                                  options=["ortho=0", "factorise_every=100", "solve_tolerance=1"]), fashion_14)
        for i in range(4):
            rule.step(fashion_14.x_train[64 * i:64 * i + 64], fashion_14.y_train[64 * i:64 * i + 64])
        assert {f.step for f in rule._factorisations.values()} == {0}  # nothing forced a refactorisation
        x, y = fashion_14.x_train[:64], fashion_14.y_train[:64]
        fresh = rule.update_directions(x, y)  # measuring: fresh factors
        rule.zero_grad()
        rule.assign_credit(x, y)  # training: the factors of step 0
        stale = [torch.cat([p.grad.reshape(-1) for p in layer.parameters()]) for layer in rule.net.layers]
        cosines = [torch.nn.functional.cosine_similarity(a, b, dim=0).item() for a, b in zip(fresh, stale)]
        assert min(cosines) > 0.999 and min(cosines) < 1 - 1e-9, cosines  # close, but the factors are old

    def test_a_stale_solve_beyond_the_tolerance_refactorises(self, fashion_14):
        rule = build_rule(RunSpec(rule="gaitprop", data=fashion_14.name, arch="invertible-conv",
                                  options=["ortho=0", "factorise_every=100", "solve_tolerance=1e-9"]), fashion_14)
        for i in range(3):
            rule.step(fashion_14.x_train[64 * i:64 * i + 64], fashion_14.y_train[64 * i:64 * i + 64])
        assert {f.step for f in rule._factorisations.values()} == {2}  # every solve was beyond the tolerance

    def test_weights_that_moved_far_are_refactorised(self, fashion_14):
        rule = build_rule(RunSpec(rule="gaitprop", data=fashion_14.name, arch="invertible-conv"), fashion_14)
        rule.step(fashion_14.x_train[:64], fashion_14.y_train[:64])
        perturb_weights(rule, scale=0.5)
        rule.step(fashion_14.x_train[64:128], fashion_14.y_train[64:128])
        assert {f.step for f in rule._factorisations.values()} == {1}
