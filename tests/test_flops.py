"""FLOPs per training step (localcredit/bench/flops.py): every registered rule is counted, and the
counts match formulas written from each method's arithmetic on small networks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from localcredit import rules
from localcredit.bench.flops import NO_FORMULA, FlopCounter, count_flops, forward_flops, step_flops
from localcredit.nets.architectures import NetSpec
from localcredit.rules.base import make_config

B, C = 8, 10  # batch, classes
IN = 28 * 28
H1, H2 = 24, 16  # two hidden blocks of different widths, so that a wrong pairing of sizes shows
MLP = NetSpec(arch="mlp", hidden=[H1, H2])
#: the forward's matmuls on the MLP: input -> H1 -> H2 -> C
FORWARD = 2 * B * (IN * H1 + H1 * H2 + H2 * C)
#: the first layer's input gradient: never computed (the data needs none), so never counted
FIRST_INPUT_GRADIENT = 2 * B * IN * H1
HIDDEN = (H1, H2)


def _rule(name: str, spec: NetSpec | None = None, **options):
    cls = rules.get(name)
    torch.manual_seed(0)
    net = cls.build_network(spec or NetSpec(arch=cls.default_arch if not cls.trains("mlp") else "mlp",
                                            hidden=[H1, H2] if cls.trains("mlp") else [32, 32]), (1, 28, 28), C)
    rule = cls(net, make_config(cls.Config, options)) if options else cls(net)
    rule.start_epoch(0, 1)
    return rule


def _batches(count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    return [(torch.randn(B, 1, 28, 28, generator=generator), torch.randint(0, C, (B,), generator=generator))
            for _ in range(count)]


def _lfnn_workers(rule) -> int:
    return rule.config.workers


#: Per rule, its step's FLOPs on the MLP from the method's arithmetic (2 FLOPs per multiply-add).
#: 2 * FORWARD is every rule's forward plus every layer's weight gradient; the rest is what the rule adds.
MLP_FORMULAS = {
    # forward, weight gradients, input gradients of every layer but the first
    "bp": lambda rule: 3 * FORWARD - FIRST_INPUT_GRADIENT,
    # the same shapes: the fixed matrix B_l replaces W_l^T in the input gradient
    "fa": lambda rule: 3 * FORWARD - FIRST_INPUT_GRADIENT,
    # attention is elementwise (not counted); the matmuls are BP's
    "nan": lambda rule: 3 * FORWARD - FIRST_INPUT_GRADIENT,
    "nan-bp": lambda rule: 3 * FORWARD - FIRST_INPUT_GRADIENT,
    # the output error e (B x C) through each block's fixed feedback matrix (C x h_l)
    "dfa": lambda rule: 2 * FORWARD + sum(2 * B * C * h for h in HIDDEN),
    # per block a fixed classifier h_l -> C: its forward and input gradient (no weight gradient)
    "local-random": lambda rule: 2 * FORWARD + sum(4 * B * h * C for h in HIDDEN),
    # ... and a learned one: its weight gradient too
    "local-learned": lambda rule: 2 * FORWARD + sum(6 * B * h * C for h in HIDDEN),
    # per block: the pred decoder h_l -> C (forward, weight and input gradients), the similarity
    # matrix h h^T (B x h_l by h_l x B) and its backward (one product of the same size: the matrix is
    # symmetric); once per step the labels' similarity (B x C by C x B)
    "predsim": lambda rule: 2 * FORWARD + sum(6 * B * h * C + 4 * B * B * h for h in HIDDEN) + 2 * B * B * C,
    # per block the auxiliary MLP h -> h -> h -> C (mlp=3; hidden as wide as its input): forward,
    # weight and input gradients
    "dgl": lambda rule: 2 * FORWARD + sum(6 * B * (2 * h * h + h * C) for h in HIDDEN),
    # per block the dense worker head h_l -> N*C: forward, weight and input gradients
    "lfnn-l": lambda rule: 2 * FORWARD + sum(6 * B * h * _lfnn_workers(rule) * C for h in HIDDEN),
    # lfnn-l's, plus the global loss backpropagated: input gradients of the head and the second
    # block, and the head's weight gradient a second time (its own loss's pass and the global one)
    "lfnn": lambda rule: (2 * FORWARD + sum(6 * B * h * _lfnn_workers(rule) * C for h in HIDDEN)
                          + 2 * B * H2 * C + 2 * B * H1 * H2 + 2 * B * H2 * C),
}


@pytest.mark.parametrize("name", sorted(rules.available()))
def test_every_registered_rule_is_counted(name):
    """Any rule, known here or not: its step is counted (forward and every weight gradient at least),
    repeatably, and runs no heavy operation the counter cannot price."""
    rule = _rule(name)
    counted = step_flops(rule, _batches(3))
    forward = forward_flops(rule.net, (1, 28, 28)) * B
    assert all(flops >= 2 * forward for flops in counted.per_step), (counted.per_step, forward)
    assert not set(counted.count.uncounted) & NO_FORMULA, "a step runs an operation without a FLOP formula"
    assert counted.count.calls > 0 and counted.median <= max(counted.per_step)
    if name in MLP_FORMULAS:
        assert counted.per_step == [MLP_FORMULAS[name](rule)] * 3


def test_a_formula_is_known_for_most_rules_on_the_mlp():
    # A guard against the table above silently shrinking; new rules get the generic checks only.
    assert len(set(MLP_FORMULAS) & set(rules.available())) >= 11


@pytest.mark.parametrize("name", ["tp", "gaitprop", "itp"])
def test_the_target_propagation_rules_count_their_solves(name):
    """Invertible 784 -> n -> n -> n (first C units = logits), factors renewed every step: forward,
    local updates, an LU and a solve per inverted layer, and the orthogonality term's row share."""
    n, every = 32, 16
    rule = _rule(name, NetSpec(arch="invertible", hidden=[n, n]), factorise_every=1, ortho_every=every)
    forward = 2 * B * (IN * n + n * n + n * n)
    lu = 2 * n ** 3 // 3  # LU of an n x n matrix
    solve = 2 * n * n * B  # two triangular solves per row
    rows = len(range(0, n, every))
    orthogonality = 2 * (2 * rows * n * n)  # (M_r M^T) then (... ) M, on two inverted layers
    expected = 2 * forward + 2 * (lu + solve) + 2 * orthogonality
    assert step_flops(rule, _batches(2)).per_step == [expected] * 2


def test_gaitprop_s_periodic_factorisation_shows_in_the_mean_not_the_median():
    rule = _rule("gaitprop", NetSpec(arch="invertible", hidden=[32, 32]), factorise_every=4)
    counted = step_flops(rule, _batches(8))
    assert counted.per_step[0] == counted.per_step[4] > counted.per_step[1] == counted.median
    assert counted.count.by_op["aten.linalg_lu_factor_ex"] == 4 * (2 * 32 ** 3 // 3)  # 2 layers x 2 factorisations
    assert counted.mean > counted.median


def test_bp_on_a_conv_net_is_three_forwards_less_the_first_input_gradient():
    rule = _rule("bp", NetSpec(arch="vgg", channels="4,M", hidden=[16]))
    conv = 2 * B * (1 * 9 * 4) * 28 * 28  # 3x3 conv 1 -> 4 channels, padded: 28x28 outputs
    dense = 2 * B * (4 * 14 * 14 * 16 + 16 * C)
    assert forward_flops(rule.net, (1, 28, 28)) * B == conv + dense
    assert step_flops(rule, _batches(1)).per_step == [3 * (conv + dense) - conv]


def test_dfa_on_a_conv_net_sends_the_error_through_one_matrix_per_block():
    rule = _rule("dfa", NetSpec(arch="vgg", channels="4,M", hidden=[16]))
    conv = 2 * B * 36 * 28 * 28
    dense = 2 * B * (784 * 16 + 16 * C)
    feedback = 2 * B * C * (4 * 14 * 14 + 16)  # e (B x C) onto each hidden block's output
    assert step_flops(rule, _batches(1)).per_step == [2 * (conv + dense) + feedback]


def test_the_operations_torch_does_not_price_are_priced_by_formula():
    a, v = torch.randn(6, 6), torch.randn(6)
    rhs = torch.randn(4, 6)
    lu, pivots = torch.linalg.lu_factor(a)
    cases = [
        (lambda: a @ v, 2 * 36), (lambda: v @ v, 12), (lambda: torch.addmv(v, a, v), 72),
        (lambda: torch.linalg.lu_factor(a), 144),  # 2/3 n^3
        (lambda: torch.linalg.lu_factor(torch.randn(3, 6, 6)), 3 * 144),
        (lambda: torch.linalg.lu_solve(lu, pivots, rhs, left=False), 2 * 36 * 4),  # 2 n^2 per row
        (lambda: torch.linalg.solve_triangular(a.triu(), rhs.T, upper=True), 36 * 4),
        (lambda: torch.linalg.solve(a, rhs.T), 144 + 2 * 36 * 4),
        (lambda: torch.linalg.inv(a), 2 * 216),
        (lambda: torch.linalg.cholesky(torch.eye(6)), 216 // 3),
    ]
    for fn, expected in cases:
        assert count_flops(fn).total == expected


def test_what_is_not_priced_is_listed_and_views_write_nothing():
    x = torch.randn(5, 4)
    with FlopCounter() as counter:
        y = torch.relu(x).t()
        torch.mm(y, x)
    count = counter.count
    assert count.by_op == {"aten.mm": 2 * 4 * 5 * 4}
    assert count.uncounted == {"aten.relu": 1, "aten.t": 1} and count.uncounted_elements == 20
    assert count.calls == 3


def test_forward_flops_counts_conv_and_linear_layers_and_leaves_the_mode():
    net = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(2 * 4 * 4, 3))
    net.train()
    assert forward_flops(net, (1, 4, 4)) == 2 * 9 * 2 * 16 + 2 * 32 * 3
    assert net.training and int(net[1].num_batches_tracked) == 0
