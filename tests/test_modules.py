"""--modules: a network's blocks cut into K gradient-isolated modules, one implementation for every local rule.

As many modules as blocks is today's training, bit for bit; one module is end-to-end BP with the rule's
auxiliary network as the classifier; no error crosses a module; the cut balances forward FLOPs. And the
modules suite's plan and report (``bench --suite modules``), without training.
"""

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn

import localcredit as lc
from localcredit.bench.modules_report import write_report
from localcredit.bench.modules_suite import (
    MODULES,
    MODULES_QUICK,
    ModulesBenchOptions,
    ModulesRun,
    Point,
    final_runs,
    spec_of,
    train_arguments,
    tune,
    validate_plan,
)
from localcredit.cli import main
from localcredit.errors import UserError
from localcredit.experiment import RunSpec, build_rule
from localcredit.nets.architectures import NetSpec, build, parse_modules
from localcredit.nets.blocknet import BlockNet
from localcredit.nets.flops import balanced_split, layer_flops

from .conftest import DEEP_NETWORKS

#: Every rule with local losses (the rules --modules applies to).
LOCAL_LOSS_RULES = ["local-random", "local-learned", "lfnn-l", "lfnn", "predsim", "dgl", "infopro"]
RESNET = dict(DEEP_NETWORKS["resnet"], hidden=[])  # stem + 3 residual units (8, 16, 32 channels), head


def make(data, rule, modules=None, seed=0, **network):
    spec = RunSpec(rule=rule, data=data.name, modules=modules, seed=seed, **(network or RESNET))
    return build_rule(spec, data)


def batches(data, steps=2, n=16):
    return [(data.x_train[i * n:(i + 1) * n], data.y_train[i * n:(i + 1) * n]) for i in range(steps)]


@pytest.mark.parametrize("rule", LOCAL_LOSS_RULES)
def test_as_many_modules_as_blocks_is_todays_training_bit_for_bit(fashion_small, rule):
    def trained(modules):
        r = make(fashion_small, rule, modules)
        for x, y in batches(fashion_small):
            r.step(x, y)
        return r.state_dict()  # the network, its statistics and the rule's auxiliary weights

    today = trained(None)
    for modules in ([4], [1, 1, 1, 1]):
        state = trained(modules)
        assert list(state) == list(today)
        assert all(torch.equal(state[k], today[k]) for k in today), (rule, modules)


def auxiliary_classifier(rule):
    """The module's own classifier, as a network head: what its local loss scores."""
    if rule.name == "local-learned":
        return nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten(), rule.classifiers[0])  # block_features
    if rule.name == "dgl":
        return rule.auxiliary["0"]
    return rule.net.head  # infopro: its last module learns through the head, as the paper's does


@pytest.mark.parametrize("rule", ["local-learned", "dgl", "infopro"])
def test_one_module_is_bp_with_the_auxiliary_classifier_as_head(fashion_small, rule):
    """--modules 1: the rule's loss on the one module trains it end to end, as BP would with the module's
    classifier as the network's head (infopro: with the head itself, the paper's K = 1)."""
    local = make(fashion_small, rule, [1])
    (module,) = local.net.blocks
    bp = lc.make_rule("bp", BlockNet([module], auxiliary_classifier(local), local.net.input_shape, 10))
    x, y = batches(fashion_small, steps=1, n=32)[0]
    grads = []
    for r in (local, bp):
        r.zero_grad()
        with r.net.statistics_kept():
            r.assign_credit(x, y)
        grads.append([p.grad.clone() for p in [*module.parameters(), *bp.net.head.parameters()]])
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=0, atol=0)  # the same operations: bit for bit


@pytest.mark.parametrize("rule", LOCAL_LOSS_RULES)
def test_no_error_crosses_a_module(fashion_small, rule):
    """The loss that trains module 1 (its own; infopro's last module: the head's) reaches every block inside it
    and no parameter of module 0."""
    r = make(fashion_small, rule, [1, 3])
    assert [type(b).__name__ for b in r.net.blocks] == ["Sequential", "Sequential"] and len(r.net.blocks[1]) == 3
    losses = dict(r.local_losses(*batches(fashion_small, steps=1, n=32)[0]))
    loss = losses[1] if 1 in losses else losses[2]
    assert all(g is None for g in torch.autograd.grad(loss, list(r.net.blocks[0].parameters()), allow_unused=True,
                                                      retain_graph=True))
    for block in r.net.blocks[1]:
        own = torch.autograd.grad(loss, list(block.parameters()), retain_graph=True)
        assert all(g.abs().sum() > 0 for g in own), f"a block inside module 1 does not learn from its loss ({rule})"


def test_modules_share_the_weights_and_compute_the_same_forward():
    torch.manual_seed(0)
    net = build(NetSpec(arch="resnet", depth=8, width=0.5), (1, 28, 28), 10)
    cut = net.in_modules([1, 3])
    assert cut.description["modules"] == [1, 3] and cut.blocks[0] is net.blocks[0] and cut.head is net.head
    assert {id(p) for p in cut.parameters()} == {id(p) for p in net.parameters()}
    net.eval()
    x = torch.randn(4, 1, 28, 28)
    assert torch.equal(cut(x), net(x)) and cut.hidden_shapes() == [net.hidden_shapes()[0], net.hidden_shapes()[-1]]


def test_k_modules_balance_the_forward_flops():
    assert balanced_split([1, 7, 6, 6], 2) == [2, 2]
    assert balanced_split([1, 1, 1, 1, 1, 1], 4) == [1, 1, 2, 2]  # all as large and as even: the earliest cuts
    conv, linear = nn.Conv2d(1, 2, 3, padding=1), nn.Linear(32, 5)
    assert layer_flops([conv, nn.Sequential(nn.Flatten(), linear)], (1, 4, 4)) == [2 * 9 * 2 * 16, 2 * 32 * 5]
    net = build(NetSpec(arch="resnet", depth=32, width=0.25), (1, 28, 28), 10)  # stem + 15 units
    assert net.in_modules(2).description["modules"] == [8, 8]  # as InfoPro cuts ResNet-32 and -110 (stage 2's middle)
    assert net.in_modules(4).description["modules"] == [4, 4, 4, 4]
    # resnet-8 on 28x28: stem 0.2 MFLOP, units 7.2, 5.6, 5.6: 2 + 2 leaves the smallest largest module
    assert build(NetSpec(arch="resnet", depth=8, modules=[2]), (1, 28, 28), 10).description["modules"] == [2, 2]


@pytest.mark.parametrize("modules,expect", [
    (5, "cannot cut 4 hidden block(s) into 5 modules"), (0, "between 1 and 4"),
    ([1, 2], "add up to the network's 4 hidden block(s)"), ([2, 0, 2], "positive counts"),
])
def test_a_bad_cut_is_a_user_error(modules, expect):
    net = build(NetSpec(arch="resnet", depth=8, width=0.25), (1, 28, 28), 10)
    with pytest.raises(UserError, match=expect.replace("(", r"\(").replace(")", r"\)")):
        net.in_modules(modules)


def test_the_option_reads_k_or_counts():
    assert parse_modules("4") == [4] and parse_modules("1, 3,3,2") == [1, 3, 3, 2]
    for bad in ("0", "2,x", "-1", ""):
        with pytest.raises(UserError, match="--modules"):
            parse_modules(bad)


# ----- the modules suite (bench --suite modules): its plan and its report, without training --------------
def test_the_modules_suite_plans_every_rule_at_every_k_beside_bp():
    points = MODULES.points()
    assert points[0] == Point("bp", None) and len(points) == 1 + 4 * 4
    assert {(p.rule, p.k) for p in points[1:]} == {(r, k) for r in ("local-learned", "predsim", "dgl", "infopro")
                                                   for k in (1, 2, 4, 8)}
    validate_plan(MODULES, points)  # every network and rule builds (resnet-20 has 10 blocks: K = 8 fits)
    run = ModulesRun("final", Point("infopro", 4), 20, "fashion-mnist", 1, 0.003)
    text = " ".join(train_arguments(run, MODULES, Path("OUT"), 1))
    for option in ("--rule infopro", "--arch resnet", "--depth 20", "--modules 4", "--epochs 6", "--lr-schedule step",
                   "--milestones 3,5", "--lr-decay 0.25", "--augment crop:2,flip", "--seed 1", "--lr 0.003"):
        assert option in text, option
    assert "--out OUT/runs/final/fashion-mnist/resnet20/infopro-k4/lr0.003-seed1" in text
    assert "--modules" not in " ".join(train_arguments(replace(run, point=Point("bp", None)), MODULES, Path("O"), 1))
    with pytest.raises(UserError, match="no row 'bp'"):
        MODULES.points(["bp"])


def test_the_modules_suite_tunes_each_point_on_the_validation_split_and_widens_a_winning_edge(tmp_path):
    suite = replace(MODULES, datasets=("fashion-mnist",), depths=(8,), ks=(2,), rules=("dgl",))
    calls = []

    def train(runs):  # the larger the learning rate, the better: the grid's top edge wins, once widened
        calls.append(sorted(run.lr for run in runs))
        for run in runs:
            assert run.stage == "tune" and run.train_data == "val:fashion-mnist" and run.seed == 0
            run.folder(tmp_path).mkdir(parents=True)
            (run.folder(tmp_path) / "result.json").write_text(json.dumps({"status": "ok", "test_accuracy": run.lr}))

    lrs, runs = tune(suite, suite.points(), tmp_path, train)
    assert calls == [[0.000333333, 0.000333333, 0.001, 0.001, 0.003, 0.003], [0.009, 0.009]]  # bp, dgl-k2; +1 step
    assert set(lrs.values()) == {0.009} and len(runs) == 8
    assert spec_of(runs[0], suite).epochs == 1 and spec_of(runs[0], suite).limit_train == 20_000


def test_the_modules_report_reads_the_runs_and_the_probes(tmp_path):
    suite = replace(MODULES_QUICK, ks=(1, 2), seeds=2, rules=("local-learned",))
    points = suite.points()
    final = final_runs(suite, points, {(p, 8, "fashion-mnist"): 0.001 for p in points})
    for i, run in enumerate(final):
        run.folder(tmp_path).mkdir(parents=True)
        (run.folder(tmp_path) / "result.json").write_text(json.dumps(
            {"status": "ok", "epochs": 1, "epochs_completed": 1, "test_accuracy": 0.8 + 0.01 * i,
             "seconds_per_epoch": [1.0]}))
    probes = {(p, 8): {"step_memory_mb": 10.0 * (3 - p.k)} for p in points}
    options = ModulesBenchOptions(suite=suite, out=tmp_path, rule_names=None, command="localcredit bench ...")
    assert write_report(options, points, [], final, probes)["files"] == ["results.csv", "RESULTS.md", "modules.png"]
    text = (tmp_path / "RESULTS.md").read_text()
    assert "| bp (end to end) | 19.50 ± 0.71 |  |" in text  # two seeds: 0.80 and 0.81
    assert "| local-learned | 17.50 ± 0.71 | 15.50 ± 0.71 |" in text
    assert "| local-learned | 20.0 | 10.0 |" in text and "| DGL | - | 7.70 | 10.50 | 12.46 | 13.80 |" in text
    assert (tmp_path / "modules.png").read_bytes().startswith(b"\x89PNG")


def test_the_modules_suite_refuses_options_it_does_not_take(capsys, tmp_path):
    for argv, expect in ((["--cases", "x"], "--cases"), (["--rules", "nope"], "nope")):
        code = main(["bench", "--suite", "modules", "--quick", "--out", str(tmp_path / "b"), *argv])
        assert code == 2 and expect in capsys.readouterr().err
    assert not (tmp_path / "b").exists()
