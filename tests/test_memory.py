"""The step memory meter: hand-made steps whose memory is known, and the issue's check on real rules."""

from __future__ import annotations

import gc
import warnings

import pytest
import torch
from torch import nn

import localcredit as lc
from localcredit.bench.memory import MB, measure_steps, step_memory
from localcredit.experiment import RunSpec, build_rule
from localcredit.rules.base import Rule

HELD = 2**18  # float32 elements: 1 MiB


class HandMadeRule(Rule):
    """A rule whose step allocates what ``work`` says, then writes ones into every gradient."""

    def __init__(self, work):
        torch.manual_seed(0)
        net = lc.blocknet(nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 4)), input_shape=(8,), num_classes=4)
        super().__init__(net)
        self.work = work
        self.kept: list[torch.Tensor] = []

    def assign_credit(self, x, y):
        self.work(self)
        for p in self.parameters():
            p.grad = torch.ones_like(p)
        return {"loss": 0.0}


def batches(n: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(torch.randn(2, 8), torch.zeros(2, dtype=torch.long)) for _ in range(n)]


def peaks(work) -> list[int]:
    return [figure.peak_bytes for figure in measure_steps(HandMadeRule(work), batches())]


def hold_with_views(rule):
    held = torch.empty(HELD)
    views = [held[:10], held.view(512, 512), held.detach()]  # alive with it: the same memory
    return held, views


def allocate_free_allocate(rule):
    first = torch.empty(HELD)
    del first
    second = torch.empty(HELD)
    del second


def keep_across_steps(rule):
    if not rule.kept:  # made once, in the first step, then carried by the rule like a cache
        rule.kept.append(torch.empty(HELD))
    scratch = torch.empty(HELD // 2)
    del scratch


def test_a_held_tensor_is_counted_once_however_many_views_share_it():
    assert peaks(hold_with_views) == [HELD * 4] * 4


def test_weights_gradients_and_optimiser_state_are_not_counted():
    assert peaks(lambda rule: None) == [0] * 4
    rule = HandMadeRule(lambda rule: None)
    parameters = list(rule.parameters())
    figures = measure_steps(rule, batches())
    # The gradients, Adam's two moments and its float32 step counter per parameter: left out of the peak.
    state = 3 * sum(p.numel() * 4 for p in parameters) + 4 * len(parameters)
    assert [f.gradient_bytes for f in figures] == [state] * 4


def test_a_tensor_freed_before_the_next_is_made_does_not_add():
    assert peaks(allocate_free_allocate) == [HELD * 4] * 4


def test_what_a_step_leaves_for_later_steps_counts_in_each_of_them():
    figures = measure_steps(HandMadeRule(keep_across_steps), batches())
    assert [f.peak_bytes for f in figures] == [HELD * 4 + HELD * 2] * 4
    assert [f.kept_bytes for f in figures] == [HELD * 4] * 4


def test_step_memory_needs_steps_beyond_the_warm_up():
    with pytest.raises(ValueError, match="more than 2 batches"):
        step_memory(HandMadeRule(lambda rule: None), batches(2), warmup=2)


def measured(data, rule: str, arch: str) -> float:
    spec = RunSpec(rule=rule, data="fashion-mnist", arch=arch, hidden=[64, 64], seed=0)
    x, y = data.x_train[:32 * 5], data.y_train[:32 * 5]
    steps = [(x[i:i + 32], y[i:i + 32]) for i in range(0, len(x), 32)]
    return step_memory(build_rule(spec, data), steps)["step_memory_mb"]


def test_rules_that_keep_their_own_activations_are_not_below_bp(fashion_small):
    """The issue's check: gaitprop and nan-bp keep every activation for their backward pass, as BP does."""
    bp_invertible, bp_mlp = measured(fashion_small, "bp", "invertible"), measured(fashion_small, "bp", "mlp")
    assert bp_mlp >= 32 * 64 * 4 * 2 / MB  # at least both hidden layers' activations
    assert measured(fashion_small, "gaitprop", "invertible") >= bp_invertible
    assert measured(fashion_small, "nan-bp", "mlp") >= bp_mlp


def test_the_gpu_check_runs_its_cpu_dry_run(tmp_path):
    """benchmarks/gpu.py's own code path on the CPU (CI has no GPU): tiny nets, two steps, every figure written."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.py"
    spec = importlib.util.spec_from_file_location("gpu_check", path)
    gpu = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu)
    chosen = ["bp", "fa", "gaitprop", "nan-bp", "local-random"]  # BP, a custom backward, the twin net, local
    assert gpu.run(["--dry-run", "--out", str(tmp_path), "--rules", ",".join(chosen)]) == 0
    rows = json.loads((tmp_path / "gpu.json").read_text())["rows"]
    assert {(r["rule"], r["network"]) for r in rows} == {(rule, net) for rule in [*chosen, "bp@twin"]
                                                         for net in ("vgg", "resnet-20")}
    assert all(r["ms_per_step"] > 0 and r["step_memory_mb"] > 0 for r in rows)
    assert all(r["ms_per_step_ratio_to_bp"] == 1 for r in rows if r["rule"] in ("bp", "bp@twin"))
    assert "| `gaitprop` | vgg |" in (tmp_path / "README.md").read_text()
    # Only the rules that declare why their step waits for the device are let wait (counted on CUDA).
    assert {r["rule"] for r in rows if r["syncs_by_design"]} == {"gaitprop"}
    assert "by design (not counted on the CPU)" in (tmp_path / "README.md").read_text()


def live_tensor_elements() -> int:
    """Elements of every tensor Python can still reach, after a full collection."""
    gc.collect()
    with warnings.catch_warnings():  # touching some torch module objects warns about deprecated names
        warnings.simplefilter("ignore")
        return sum(o.numel() for o in gc.get_objects() if isinstance(o, torch.Tensor))


@pytest.mark.parametrize("rule_name", sorted(lc.rules.available()))
def test_no_rule_keeps_more_memory_with_every_step(fashion_small, rule_name):
    """What a rule keeps between steps stops growing after the first steps: lfnn once kept every step's
    layer outputs through a reference cycle that autograd's nodes hide from Python's collector."""
    arch = "mlp" if lc.rules.get(rule_name).trains("mlp") else "invertible"
    spec = RunSpec(rule=rule_name, data="fashion-mnist", arch=arch, hidden=[32, 32], seed=0)
    rule = build_rule(spec, fashion_small)
    x, y = fashion_small.x_train[:16], fashion_small.y_train[:16]
    for _ in range(3):
        rule.step(x, y)
    before = live_tensor_elements()
    for _ in range(4):
        rule.step(x, y)
    assert live_tensor_elements() <= before
