"""The per-layer-type registry: every weight layer's swapped backward is autograd's when the kernel is W,
uses the kernel (and only for the input gradient) otherwise, and unknown layer types are refused."""

import pytest
import torch
from torch import nn

import localcredit as lc
from localcredit.errors import UserError
from localcredit.nets.blocknet import blocknet
from localcredit.nets.layers import (
    ReplacedWeightLayers,
    check_layer_math,
    layer_kind,
    swapped_input_gradients,
    weight_layers,
    weight_op,
)

WEIGHT_LAYERS = {
    "linear": (lambda: nn.Linear(12, 7), (5, 12)),
    "linear without bias, 3-d input": (lambda: nn.Linear(12, 7, bias=False), (5, 3, 12)),
    "conv": (lambda: nn.Conv2d(4, 6, 3, padding=1), (3, 4, 9, 9)),
    "strided conv without bias": (lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1, bias=False), (3, 4, 9, 9)),
    "dilated conv": (lambda: nn.Conv2d(4, 6, 3, dilation=2, padding=2), (3, 4, 9, 9)),
    "grouped conv": (lambda: nn.Conv2d(4, 6, 3, groups=2, padding=(1, 0)), (3, 4, 9, 9)),
    "depthwise conv, stride 3": (lambda: nn.Conv2d(4, 8, 5, stride=3, groups=4), (3, 4, 11, 11)),
    "'same' padding, even kernel": (lambda: nn.Conv2d(4, 6, 4, padding="same", dilation=2), (3, 4, 9, 9)),
    "reflect padding": (lambda: nn.Conv2d(4, 6, 3, padding=2, padding_mode="reflect"), (3, 4, 9, 9)),
    "circular padding": (lambda: nn.Conv2d(4, 6, 3, padding=1, padding_mode="circular"), (3, 4, 9, 9)),
    "conv1d": (lambda: nn.Conv1d(4, 6, 3, stride=2, padding=1), (3, 4, 10)),
    "conv3d": (lambda: nn.Conv3d(2, 3, 3, padding=1, bias=False), (2, 2, 5, 5, 5)),
}


def gradients(layer, x, grad_out, kernel=None):
    """(dL/dx, dL/dW, dL/db) for L = <layer(x), grad_out>, through the swapped backward when ``kernel`` is given."""
    x = x.clone().requires_grad_()
    params = [p for p in (layer.weight, layer.bias) if p is not None]
    if kernel is None:
        out = layer(x)
    else:
        with swapped_input_gradients(layer, lambda name, module: kernel):
            out = layer(x)
    return out, torch.autograd.grad(out, [x, *params], grad_out)


@pytest.mark.parametrize("case", sorted(WEIGHT_LAYERS))
def test_swapped_backward_with_the_weight_is_autograd(case):
    make, shape = WEIGHT_LAYERS[case]
    torch.manual_seed(0)
    layer = make().double()
    x = torch.randn(shape, dtype=torch.float64)
    grad_out = torch.randn_like(layer(x))
    want_out, want = gradients(layer, x, grad_out)
    got_out, got = gradients(layer, x, grad_out, kernel=layer.weight.detach())
    torch.testing.assert_close(got_out, want_out, rtol=0, atol=1e-12)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
    assert "forward" not in layer.__dict__, "the layer's own forward is back after the context"


@pytest.mark.parametrize("case", sorted(WEIGHT_LAYERS))
def test_the_kernel_replaces_the_weight_in_the_input_gradient_only(case):
    make, shape = WEIGHT_LAYERS[case]
    torch.manual_seed(1)
    layer = make().double()
    kernel_layer = make().double()  # the same kind of layer, other weights: the reference for the kernel
    x = torch.randn(shape, dtype=torch.float64)
    grad_out = torch.randn_like(layer(x))
    _, (grad_x, *own) = gradients(layer, x, grad_out, kernel=kernel_layer.weight.detach())
    _, (want_x, *_) = gradients(kernel_layer, x, grad_out)
    _, (_, *want_own) = gradients(layer, x, grad_out)
    torch.testing.assert_close(grad_x, want_x, rtol=1e-10, atol=1e-12)
    for g, w in zip(own, want_own):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def test_feedback_fan_in_counts_the_outputs_that_reach_one_input():
    assert weight_op(nn.Linear(5, 7)).feedback_fan_in(nn.Linear(5, 7)) == 7
    conv = nn.Conv2d(4, 8, 3, groups=2)
    assert weight_op(conv).feedback_fan_in(conv) == 4 * 9  # 8 / 2 output channels, 3x3 each


def test_lookup_follows_the_class_hierarchy():
    class MyReLU(nn.ReLU):
        pass

    assert layer_kind(MyReLU()) == "local" and layer_kind(nn.BatchNorm2d(3)) == "local"
    assert layer_kind(nn.Sequential()) == "container" and layer_kind(nn.Conv2d(1, 1, 1)) == "weight"
    assert [name for name, _ in weight_layers(nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 2)))] == ["0", "2"]


class Scale(nn.Module):
    """A layer type nothing registered: a learned per-feature scale."""

    def __init__(self, n):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(n))

    def forward(self, x):
        return x * self.scale


def test_an_unregistered_layer_type_is_refused_in_one_line_then_one_registration_admits_it():
    from localcredit.nets.layers import _KINDS

    net = blocknet(nn.Sequential(nn.Linear(6, 5), Scale(5), nn.Linear(5, 3)), (6,), 3, group=[2, 1])
    with pytest.raises(UserError, match=r"block 0 \(1\) is a Scale") as refused:
        lc.make_rule("fa", net)
    assert "\n" not in str(refused.value)
    with pytest.raises(UserError, match="Scale"):
        lc.make_rule("nan", net)
    lc.make_rule("dfa", net)  # rules that need no per-layer math take any module
    try:
        lc.register_layer(Scale, "local")  # elementwise: its own backward is local
        rule = lc.make_rule("fa", net)
        rule.step(torch.randn(4, 6), torch.tensor([0, 1, 2, 0]))
    finally:
        del _KINDS[Scale]


def test_a_container_with_its_own_forward_must_be_registered():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = nn.Linear(4, 4)

        def forward(self, x):
            return self.inner(self.inner(x))  # could do anything with its children

    with pytest.raises(UserError, match="Twice"):
        check_layer_math([Twice()], "fa", "needs the math")
    check_layer_math([nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.BatchNorm1d(4), nn.Tanh()))], "fa", "x")


def no_module_patched(net):
    return all("forward" not in module.__dict__ for module in net.modules())


def test_replacements_nest_innermost_first_and_patch_no_module():
    torch.manual_seed(2)
    net = nn.Sequential(nn.Linear(5, 4), nn.Unflatten(1, (1, 4)), nn.Conv1d(1, 1, 1), nn.Flatten(), nn.Linear(4, 3))
    layers = dict(weight_layers(net))
    seen = []

    def record(tag):
        def replacement(name, module, op, x):
            seen.append((tag, name))
            return op.forward(module, x, module.weight)
        return replacement

    x = torch.randn(2, 5)
    want = net(x)
    with ReplacedWeightLayers(net.named_modules(), record("outer")):
        inner_only = [("4", layers["4"]), ("2", layers["2"])]
        with ReplacedWeightLayers(inner_only, record("inner")):
            assert no_module_patched(net)
            torch.testing.assert_close(net(x), want, rtol=0, atol=0)
        assert seen == [("outer", "0"), ("inner", "2"), ("inner", "4")], "the innermost mode holding a layer replaces it, once"
        seen.clear()
        net(x)
        assert seen == [("outer", "0"), ("outer", "2"), ("outer", "4")], "the outer mode is back for every layer"
    seen.clear()
    net(x)
    assert seen == [] and no_module_patched(net)


def test_swapped_input_gradients_nest_and_restore_on_the_way_out():
    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    first, last = net[0], net[2]
    outer = {"0": torch.randn(4, 5, dtype=torch.float64), "2": torch.randn(3, 4, dtype=torch.float64)}
    inner = torch.randn(3, 4, dtype=torch.float64)
    x, grad_out = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)

    def input_gradient(kernel_first, kernel_last):
        """dL/dx of L = <net(x), grad_out> written out, with each layer's kernel in place of its weight."""
        a = torch.tanh(first(x))
        return ((grad_out @ kernel_last) * (1 - a.square())) @ kernel_first

    def autograd_input_gradient():
        x_ = x.clone().requires_grad_()
        return torch.autograd.grad(net(x_), x_, grad_out)[0]

    with swapped_input_gradients(net, lambda name, module: outer[name]):
        with swapped_input_gradients(nn.Sequential(last), lambda name, module: inner):
            torch.testing.assert_close(autograd_input_gradient(), input_gradient(outer["0"], inner))
            assert no_module_patched(net)
        torch.testing.assert_close(autograd_input_gradient(), input_gradient(outer["0"], outer["2"]))
    weights = first.weight.detach(), last.weight.detach()
    torch.testing.assert_close(autograd_input_gradient(), input_gradient(*weights))
    assert no_module_patched(net)
