"""Networks: the architectures' shapes, your own model as a BlockNet, the network's forward, and batch norm
statistics that change only in training forwards of blocks that train."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import localcredit as lc
from localcredit import rules
from localcredit.errors import UserError
from localcredit.experiment import RunSpec, build_rule
from localcredit.nets.architectures import NetSpec, ResidualUnit, build, parse_layer_string
from localcredit.nets.layout import AdaptiveAvgPool2d, Flatten, flatten_features, in_layout_of, in_memory_order
from localcredit.spec import to_argv

from .conftest import DEEP_NETWORKS, user_conv_net

SHAPES = [(1, 28, 28), (3, 32, 32), (1, 8, 8)]


def blocks_of(net):
    return [type(block).__name__ for block in net.blocks]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("spec", [
    NetSpec(arch="mlp"), NetSpec(arch="conv", channels="8,M,8,M"), NetSpec(arch="lenet", width=0.25),
    NetSpec(arch="vgg", channels="8,16,M,16,M", width=0.5, hidden=[32]), NetSpec(arch="resnet", depth=8, width=0.5),
    NetSpec(arch="vgg", channels="8,M,8,M", hidden=[16], norm="none", dropout=0.2, activation="tanh"),
], ids=lambda s: " ".join(to_argv(s)))
def test_every_architecture_takes_mnist_cifar_and_small_images(spec, shape):
    torch.manual_seed(0)
    net = build(spec, shape, num_classes=7)
    assert net(torch.randn(5, *shape)).shape == (5, 7)
    assert net.output_shapes[-1] == (7,) and len(net.output_shapes) == len(net.layers)


def test_layouts():
    torch.manual_seed(0)
    vgg8b = build(NetSpec(arch="vgg"), (3, 32, 32), 10)
    convs = [m.out_channels for m in vgg8b.modules() if isinstance(m, nn.Conv2d)]
    assert convs == [128, 256, 256, 512, 512, 512] and vgg8b.hidden == [1024]  # 6 conv + 1 dense + output: 8
    assert len(vgg8b.blocks) == 7 and vgg8b.output_shapes[5] == (512, 2, 2)  # 4 max-pools: 32 -> 2
    assert sum(isinstance(m, nn.BatchNorm2d) for m in vgg8b.modules()) == 6
    assert any(isinstance(m, nn.BatchNorm1d) for m in vgg8b.blocks[6].modules())

    resnet20 = build(NetSpec(arch="resnet"), (3, 32, 32), 10)
    assert blocks_of(resnet20) == ["Sequential"] + ["ResidualUnit"] * 9  # stem + 3 stages x 3 units
    assert resnet20.output_shapes[:-1][-1] == (64, 8, 8)
    # He et al.'s ResNet-20 has 0.27M parameters; the two 1x1 projection shortcuts add 2.6k.
    assert 0.269e6 < sum(p.numel() for p in resnet20.parameters()) < 0.275e6
    assert len(build(NetSpec(arch="resnet", depth=110), (3, 32, 32), 10).blocks) == 1 + 54

    lenet = build(NetSpec(arch="lenet"), (1, 28, 28), 10)
    assert lenet.output_shapes == [(32, 14, 14), (64, 7, 7), (128,), (256,), (10,)]
    assert build(NetSpec(arch="resnet", depth=8, width=2), (1, 28, 28), 10).output_shapes[-2] == (128, 7, 7)


def test_layer_strings():
    assert parse_layer_string("128,256,M,256") == [128, 256, "M", 256]
    for bad in ("M,32", "32,,M", "32,x", "0,M", ""):
        with pytest.raises(UserError, match="--channels"):
            parse_layer_string(bad)


@pytest.mark.parametrize("spec,shape,expect", [
    (NetSpec(arch="vgg", channels="8,M,8,M,8,M,8,M"), (1, 8, 8), "too small"),
    (NetSpec(arch="lenet"), (1, 3, 3), "too small"),
    (NetSpec(arch="resnet", depth=8), (20,), "image data"),
    (NetSpec(arch="vgg", depth=8), (1, 28, 28), "--depth does not apply to --arch vgg"),
    (NetSpec(arch="mlp", channels="8"), (1, 28, 28), "--channels does not apply"),
    (NetSpec(arch="resnet", depth=10), (1, 28, 28), r"6k\+2"),
    (NetSpec(arch="resnet", norm="group"), (1, 28, 28), "--norm"),
])
def test_layouts_that_cannot_work_are_one_line_errors(spec, shape, expect):
    with pytest.raises(UserError, match=expect) as refused:
        build(spec, shape, 10)
    assert "\n" not in str(refused.value)


# ----- your own model ------------------------------------------------------------------------------
def test_blocknet_uses_your_modules_and_groups_them():
    torch.manual_seed(0)
    net = user_conv_net()
    assert [len(block) for block in net.blocks] == [4, 4] and isinstance(net.head, nn.Sequential)
    assert net.output_shapes == [(16, 14, 14), (32, 7, 7), (10,)]
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 3))
    single = lc.blocknet(model, (4,), 3)
    assert single.blocks[0] is model[0] and single.head is model[1]  # shared, not copied
    # Without group, children without parameters join the block before them (leading ones the next).
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 8), nn.ReLU(), nn.Dropout(), nn.Linear(8, 3), nn.LogSoftmax(1))
    joined = lc.blocknet(model, (4,), 3)
    assert joined.description["blocks"] == [["Flatten", "Linear", "ReLU", "Dropout"], ["Linear", "LogSoftmax"]]


@pytest.mark.parametrize("model,kwargs,expect", [
    (nn.Linear(4, 3), {}, "nn.Sequential"),
    (nn.Sequential(nn.ReLU(), nn.Flatten()), {}, r"the head \(ReLU, Flatten\) has no trainable parameters"),
    (nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)), {"group": [1, 1, 1]},
     r"block 1 \(ReLU\) has no trainable parameters"),
    (nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)), {"group": [2, 2]}, "add up to the model's 3"),
    (nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 5)), {"group": [2, 1]}, r"must be \(3,\)"),
    (nn.Sequential(nn.Linear(5, 3)), {}, "cannot take an input of per-sample shape"),
])
def test_blocknet_refuses_what_it_cannot_train(model, kwargs, expect):
    with pytest.raises(UserError, match=expect) as refused:
        lc.blocknet(model, (4,), 3, **kwargs)
    assert "\n" not in str(refused.value)


def test_make_rule_checks_its_options(fashion_small):
    net = user_conv_net()
    with pytest.raises(UserError, match="unknown option 'colour'"):
        lc.make_rule("local-learned", net, colour="red")
    with pytest.raises(UserError, match="loss='l1' is not one of"):
        lc.make_rule("local-learned", net, loss="l1")
    with pytest.raises(UserError, match="workers=2.5 is not a valid int"):
        lc.make_rule("lfnn-l", net, workers=2.5)
    with pytest.raises(UserError, match="unknown rule"):
        lc.make_rule("sgd", net)
    with pytest.raises(UserError, match="lr must be positive"):
        lc.make_rule("bp", net, lr=0)
    with pytest.raises(UserError, match="--arch invertible"):
        lc.make_rule("gaitprop", net)
    assert lc.make_rule("lfnn", net, workers=4, delta=0.5, global_weight=2).config.global_weight == 2.0


# ----- the network's forward -----------------------------------------------------------------------
def test_walk_yields_every_output_and_detaches_inputs_on_request(fashion_small):
    torch.manual_seed(0)
    net = build(NetSpec(**DEEP_NETWORKS["resnet"]), (1, 28, 28), 10).eval()
    x = fashion_small.x_train[:8]
    steps = list(net.walk(x, detach_inputs=True))
    assert [l for l, _, _ in steps] == list(range(len(net.layers)))
    torch.testing.assert_close(steps[-1][2], net(x))
    assert all(h_in.grad_fn is None for _, h_in, _ in steps)
    assert all(h.grad_fn is not None for _, _, h in net.walk(x))


def batch_norm_state(net):
    return {k: v.clone() for k, v in net.state_dict().items() if "running" in k or "num_batches" in k}


def assert_same(a, b):
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]


@pytest.mark.parametrize("network", ["vgg", "resnet"])
def test_building_any_rule_leaves_batch_norm_statistics_bit_identical(fashion_small, network):
    for name in rules.available():
        if not rules.get(name).trains(DEEP_NETWORKS[network]["arch"]):
            continue
        torch.manual_seed(0)
        net = build(NetSpec(**DEEP_NETWORKS[network]), (1, 28, 28), 10)
        before = batch_norm_state(net)
        assert before and all(v.sum() == 0 for k, v in before.items() if "mean" in k or "num_batches" in k)
        rule = rules.get(name)(net)
        assert_same(before, batch_norm_state(rule.net))


def test_measuring_alignment_changes_no_statistic(fashion_small):
    from localcredit.rules.alignment import alignment

    for name in ("bp", "fa", "nan", "local-learned", "lfnn"):
        rule = build_rule(RunSpec(rule=name, data="fashion-mnist", **DEEP_NETWORKS["vgg"], dropout=0.3), fashion_small)
        rule.step(fashion_small.x_train[:32], fashion_small.y_train[:32])
        before, rng = batch_norm_state(rule.net), torch.get_rng_state()
        cosines = alignment(rule, fashion_small.x_train[:64], fashion_small.y_train[:64])
        assert_same(before, batch_norm_state(rule.net))
        assert torch.equal(rng, torch.get_rng_state())
        if name in ("bp",):  # the same dropout masks for both: exactly BP's gradient
            assert min(cosines) > 0.99999, cosines


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_alignment_on_cuda_gives_both_measurements_the_same_dropout_masks(fashion_small):
    from localcredit.rules.alignment import alignment

    rule = build_rule(RunSpec(rule="bp", data="fashion-mnist", hidden=[64, 64], dropout=0.5), fashion_small).to("cuda")
    x, y = fashion_small.x_train[:64].cuda(), fashion_small.y_train[:64].cuda()
    cpu, cuda = torch.get_rng_state(), torch.cuda.get_rng_state()
    assert min(alignment(rule, x, y)) > 0.99999  # dropout on CUDA draws from the CUDA generator
    assert torch.equal(cpu, torch.get_rng_state()) and torch.equal(cuda, torch.cuda.get_rng_state())


def full_state(rule):
    """Everything a measurement could change: every tensor (non-persistent buffers too), the gradients,
    the checkpointed bookkeeping, the statistics result.json reports and the modules' training flags."""
    tensors = {f"{kind}:{name}": t.detach().clone() for kind, named in (("p", rule.named_parameters()),
                                                                         ("b", rule.named_buffers()))
               for name, t in named}
    grads = {name: None if p.grad is None else p.grad.clone() for name, p in rule.named_parameters()}
    return tensors, grads, repr(rule.extra_state()), repr(rule.statistics()), [m.training for m in rule.modules()]


@pytest.mark.parametrize("name,options,network", [
    ("dgl", [], dict(**DEEP_NETWORKS["vgg"], dropout=0.2)),  # its auxiliary networks' own batch norm
    ("lfnn", [], dict(**DEEP_NETWORKS["vgg"], dropout=0.2)),  # leader counts (a non-persistent buffer), samples
    ("lfnn-l", [], dict(hidden=[32, 32])),
    ("gaitprop", [], dict(arch="invertible", hidden=[784])),  # its step counter and factorisations
])
def test_measuring_alignment_changes_nothing_in_the_rule(fashion_small, name, options, network):
    from localcredit.rules.alignment import alignment

    rule = build_rule(RunSpec(rule=name, data="fashion-mnist", options=options, **network), fashion_small)
    x, y = fashion_small.x_train[:32], fashion_small.y_train[:32]
    rule.step(x, y)
    rule.net.eval()  # a flag the measurement must give back too
    before = full_state(rule)
    alignment(rule, fashion_small.x_train[32:96], fashion_small.y_train[32:96])
    after = full_state(rule)
    for part_before, part_after in zip(before[:2], after[:2]):
        assert part_before.keys() == part_after.keys()
        changed = [k for k, v in part_before.items()
                   if (v is None) != (part_after[k] is None) or (v is not None and not torch.equal(v, part_after[k]))]
        assert not changed, changed
    assert before[2:] == after[2:]


def test_frozen_layerwise_blocks_keep_their_statistics(fashion_small):
    rule = build_rule(RunSpec(rule="local-random", data="fashion-mnist", options=["schedule=layerwise"],
                              **DEEP_NETWORKS["vgg"]), fashion_small)  # 3 hidden blocks + head over 3 epochs
    rule.start_epoch(0, 3)
    rule.step(fashion_small.x_train[:32], fashion_small.y_train[:32])
    trained = batch_norm_state(rule.net.blocks[0])
    assert trained["1.num_batches_tracked"] == 1
    rule.start_epoch(1, 3)
    for i in range(3):
        rule.step(fashion_small.x_train[32 * i:32 * (i + 1)], fashion_small.y_train[32 * i:32 * (i + 1)])
    assert_same(trained, batch_norm_state(rule.net.blocks[0]))  # frozen: ran in eval mode
    assert batch_norm_state(rule.net.blocks[1])["1.num_batches_tracked"] == 3


def test_residual_unit_is_a_block_with_both_paths():
    unit = ResidualUnit(4, 8, stride=2, norm="batch", activation="relu")
    assert isinstance(unit.shortcut, nn.Sequential)  # a projection where the shape changes
    assert isinstance(ResidualUnit(8, 8, 1, "batch", None).shortcut, nn.Identity)
    assert unit(torch.randn(2, 4, 9, 9)).shape == (2, 8, 5, 5)
    assert math.prod(unit.residual[0].weight.shape) == 8 * 4 * 9


def _four_d(module):
    return [t for t in [*module.parameters(), *module.buffers()] if t.dim() == 4]


def _strided_pointwise_convs(module):
    # torch 2.13's CPU weight gradient of a 1x1 stride-2 conv on channels-last maps with < 8 input
    # channels writes out of bounds (heap corruption, wrong gradients): no channels-last net may hold one
    return [m for m in module.modules()
            if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and max(m.stride) > 1]


def test_channels_last_nets_hold_no_conv_whose_gradient_torch_gets_wrong_in_that_layout():
    from localcredit.nets.architectures import ARCHITECTURES
    channels_last = [name for name, a in ARCHITECTURES.items() if a.memory_format == torch.channels_last]
    assert {"conv", "lenet", "vgg"} <= set(channels_last)
    for name in channels_last:
        net = build(NetSpec(arch=name, width=0.125), (1, 28, 28), 10)
        assert not _strided_pointwise_convs(net), name
    # the one built-in net with such convs (its shortcuts) keeps the default layout
    resnet = build(NetSpec(arch="resnet", depth=8, width=0.125), (1, 28, 28), 10)
    assert _strided_pointwise_convs(resnet) and resnet.memory_format == torch.contiguous_format


@pytest.mark.parametrize("name", ["bp", "fa", "dfa", "nan", "predsim", "dgl", "lfnn-l", "infopro"])
def test_built_in_conv_nets_keep_their_maps_channels_last_and_compute_the_same(fashion_small, name):
    # SGD: Adam's first step, lr x g / |g|, would turn rounding in a near-zero gradient into a whole step
    spec = RunSpec(rule=name, data="fashion-mnist", seed=0, optimizer="sgd", **DEEP_NETWORKS["vgg"])
    rule = build_rule(spec, fashion_small)
    # the net's and the rule's own 4-d weights (auxiliary convs, feedback kernels) alike
    assert rule.net.memory_format == torch.channels_last
    assert build(NetSpec(**DEEP_NETWORKS["vgg"], modules=2), (1, 28, 28), 10).memory_format == torch.channels_last
    assert not _strided_pointwise_convs(rule)
    assert _four_d(rule) and all(t.is_contiguous(memory_format=torch.channels_last) for t in _four_d(rule))
    reference = build_rule(spec, fashion_small).to(memory_format=torch.contiguous_format)
    assert all(t.is_contiguous() for t in _four_d(reference))
    x, y = fashion_small.x_train[:32], fashion_small.y_train[:32]
    # a layout is only strides: one step from the same weights lands on the same weights (float rounding)
    rule.step(x, y)
    reference.step(x, y)
    for (key, got), want in zip(rule.state_dict().items(), reference.state_dict().values()):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=key)
    torch.testing.assert_close(rule.predict(x), reference.predict(x))


def test_other_nets_keep_the_default_layout(fashion_small):
    for network in [dict(arch="mlp", hidden=[32]), dict(arch="invertible-conv", patches=[7, 4, 1]),
                    dict(arch="resnet", depth=8, width=0.25)]:
        rule = build_rule(RunSpec(rule="bp", data="fashion-mnist", seed=0, **network), fashion_small)
        assert rule.net.memory_format == torch.contiguous_format
        assert all(t.is_contiguous() for t in rule.parameters())
    user = lc.make_rule("bp", user_conv_net())
    assert all(t.is_contiguous() for t in user.parameters())


class _MixedLayouts(TorchDispatchMode):
    """Records the backward kernels of pooling, batch norm, ReLU and convolution that get 4-d maps in both layouts
    (a gradient in the default layout beside a channels-last map: torch's slow path, nets/layout.py)."""

    WATCHED = ("max_pool2d_with_indices_backward", "native_batch_norm_backward", "_adaptive_avg_pool2d_backward",
               "avg_pool2d_backward", "threshold_backward", "convolution_backward")

    def __init__(self):
        super().__init__()
        self.mixed: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.__name__.split(".")[0] in self.WATCHED:
            maps = [a for a in args if isinstance(a, torch.Tensor) and a.dim() == 4]
            # a map that both layouts describe (one channel, 1x1) is neither
            layouts = {a.is_contiguous(memory_format=torch.channels_last) for a in maps
                       if a.is_contiguous() != a.is_contiguous(memory_format=torch.channels_last)}
            if len(layouts) > 1:
                self.mixed.append(f"{func.__name__} {[tuple(a.shape) for a in maps]}")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name", [n for n in sorted(rules.available()) if rules.get(n).trains("vgg")])
def test_every_rules_gradients_keep_the_channels_last_layout_of_their_maps(fashion_small, name):
    rule = build_rule(RunSpec(rule=name, data="fashion-mnist", seed=0, **DEEP_NETWORKS["vgg"]), fashion_small)
    rule.start_epoch(0, 1)
    recorder = _MixedLayouts()
    with recorder:
        rule.step(fashion_small.x_train[:16], fashion_small.y_train[:16])
    assert recorder.mixed == []


def _channels_last_map(*shape):
    return torch.randn(*shape).contiguous(memory_format=torch.channels_last).requires_grad_()


def test_the_layout_check_sees_a_gradient_in_the_other_layout():
    h = _channels_last_map(2, 3, 4, 4)
    pooled = F.max_pool2d(h, 2)
    recorder = _MixedLayouts()
    with recorder:
        pooled.backward(torch.ones(2, 3, 2, 2).contiguous())  # made in the default layout
    assert recorder.mixed and recorder.mixed[0].startswith("max_pool2d_with_indices_backward")


def test_flattened_features_send_their_gradient_back_in_the_maps_layout():
    h = _channels_last_map(4, 3, 5, 5)
    grad_out = torch.randn(4, 75)
    for flatten in (flatten_features, Flatten()):
        h.grad = None
        flat = flatten(h)
        torch.testing.assert_close(flat, h.detach().flatten(1), rtol=0, atol=0)  # the default C, H, W order
        flat.backward(grad_out)
        assert h.grad.is_contiguous(memory_format=torch.channels_last) and not h.grad.is_contiguous()
        torch.testing.assert_close(h.grad, grad_out.view(4, 3, 5, 5), rtol=0, atol=0)
    pooled = AdaptiveAvgPool2d(1)(h).flatten(1)
    h.grad = None
    pooled.sum().backward()
    assert h.grad.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(h.grad, torch.full_like(h, 1 / 25))


def test_in_memory_order_is_a_view_and_in_layout_of_copies_only_when_strides_differ():
    h = _channels_last_map(2, 3, 4, 4)
    vector = in_memory_order(h)
    assert vector.shape == (2, 48) and vector.data_ptr() == h.data_ptr()
    torch.testing.assert_close(vector, h.detach().permute(0, 2, 3, 1).reshape(2, -1), rtol=0, atol=0)
    plain = torch.randn(2, 3, 4, 4)
    assert in_memory_order(plain).data_ptr() == plain.data_ptr()
    values = torch.randn(2, 3, 4, 4)
    moved = in_layout_of(values, h)
    assert moved.stride() == h.stride() and torch.equal(moved, values)
    assert in_layout_of(values, plain) is values
