"""bench/time_split.py: a step's profiled time split into priced arithmetic, unpriced aten work and the
rest. No time is asserted, only which operations land in which part."""

from __future__ import annotations

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from localcredit.bench.time_split import PRICED, mean_split, profile_step, split_events


def _events(fn):
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return prof.events()


def test_the_priced_operations_are_the_flop_counters_and_nested_calls_count_once():
    assert {"aten::mm", "aten::addmm", "aten::convolution", "aten::convolution_backward"} <= PRICED
    assert "aten::relu" not in PRICED and "aten::linear" not in PRICED
    conv = nn.Conv2d(1, 4, 3)
    x = torch.randn(8, 1, 12, 12)
    events = _events(lambda: torch.relu(conv(x)).sum().backward())
    priced, unpriced, by_name = split_events(events)
    # aten::conv2d -> convolution -> _convolution -> the kernel: the outermost priced call, once
    outermost = [e for e in events if e.name == "aten::convolution"]
    backward = [e for e in events if e.name == "aten::convolution_backward"]
    assert priced == sum(e.cpu_time_total for e in outermost + backward)
    assert {"aten::relu", "aten::sum"} <= set(by_name) and not set(by_name) & PRICED
    # conv2d's own time, less the convolution inside it, is unpriced
    conv2d = next(e for e in events if e.name == "aten::conv2d")
    assert abs(by_name["aten::conv2d"] - (conv2d.cpu_time_total - outermost[0].cpu_time_total)) < 1e-6
    assert abs(unpriced - sum(by_name.values())) < 1e-6


class _Step:
    """A stand-in rule: a linear layer's forward and backward, and an SGD step."""

    def __init__(self):
        self.layer = nn.Linear(32, 10)
        self.optimizer = torch.optim.SGD(self.layer.parameters(), lr=0.1)

    def step(self, x, y):
        self.optimizer.zero_grad()
        nn.functional.cross_entropy(self.layer(x), y).backward()
        self.optimizer.step()


def test_a_profiled_step_splits_its_wall_time_and_means_weigh_every_step():
    rule, x, y = _Step(), torch.randn(16, 32), torch.randint(0, 10, (16,))
    before = rule.layer.weight.detach().clone()
    splits = [profile_step(rule, x, y) for _ in range(3)]
    assert not torch.equal(before, rule.layer.weight)  # real steps: the rule moved on
    for split in splits:
        assert split.priced_ms > 0 and "aten::cross_entropy_loss" in split.unpriced_by_op
        assert split.priced_ms + split.unpriced_ms <= 1.05 * split.wall_ms  # the clocks differ a little
    mean = mean_split(splits)
    assert mean.steps == 3
    assert abs(mean.priced_ms - sum(s.priced_ms for s in splits) / 3) < 1e-9
    values = list(mean.unpriced_by_op.values())
    assert values == sorted(values, reverse=True)
