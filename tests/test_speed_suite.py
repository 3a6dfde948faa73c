"""bench --suite speed (localcredit/bench/speed_suite.py): the machinery, on tiny networks. No test here
asserts a time: times on a shared machine are not findings, only that they are measured and reported."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch

from localcredit import rules
from localcredit.bench import speed_suite
from localcredit.bench.plan import Suite
from localcredit.bench.speed_suite import QUICK, SpeedOptions, SpeedSuite, interleave, plan_rows, run_speed
from localcredit.cli import main
from localcredit.nets.architectures import NetSpec
from localcredit.rules.backprop import Backprop
from localcredit.rules.base import _REGISTRY, register

TWIN = {"invertible-conv": NetSpec(arch="invertible-conv", patches=[7, 4])}
TINY_NETWORKS = {
    "mlp": Suite("mlp", "mlp 16-16", network=NetSpec(arch="mlp", hidden=[16, 16])),
    "vgg": Suite("vgg", "vgg 4,M + 8", network=NetSpec(arch="vgg", channels="4,M", hidden=[8]),
                 fallback_archs=("invertible-conv",), networks=TWIN),
    "resnet": Suite("resnet", "resnet-8 at width 1/4", network=NetSpec(arch="resnet", depth=8, width=0.25),
                    fallback_archs=("invertible-conv",), networks=TWIN),
}
TINY = SpeedSuite("speed-tiny", "tiny networks", networks=TINY_NETWORKS, batch_size=4, warmup=0, steps=2,
                  flop_steps=1, memory_steps=2, split_steps=1, threads=(1,))
HEADLINE = {"time_ratio", "flop_ratio", "overhead", "memory_ratio"}


def test_every_registered_rule_gets_the_four_columns_on_a_dense_and_a_conv_network(tmp_path):
    # ResNet's path is the same code: the gpu_speed test below runs it (for fewer rules: CPU time is short).
    suite = replace(TINY, networks={name: TINY_NETWORKS[name] for name in ("mlp", "vgg")})
    summary = run_speed(SpeedOptions(suite, tmp_path, data=None, progress=False))
    assert summary["failed"] == [] and summary["files"] == ["RESULTS.md", "speed.json", "speed-details.json"]
    figures = json.loads((tmp_path / "speed.json").read_text())
    assert set(figures) == {"mlp", "vgg"}
    for network, by_rule in figures.items():
        assert set(rules.available()) <= set(by_rule), network
        for key, row in by_rule.items():
            assert set(row) == HEADLINE and all(row[k] > 0 and math.isfinite(row[k]) for k in HEADLINE), (network, key)
            assert math.isclose(row["overhead"], row["time_ratio"] / row["flop_ratio"])
        assert all(by_rule["bp"][k] == 1 for k in HEADLINE)
        assert by_rule["fa"]["flop_ratio"] == 1  # FA's matmuls have BP's shapes
    details = json.loads((tmp_path / "speed-details.json").read_text())
    mlp = details["networks"]["mlp"]["rules"]
    assert mlp["gaitprop"]["arch"] == "invertible" and mlp["gaitprop"]["compared_with"] == "bp [invertible]"
    assert mlp["bp [invertible]"]["compared_with"] == "bp [invertible]"
    assert details["networks"]["vgg"]["rules"]["tp"]["arch"] == "invertible-conv"
    assert mlp["dgl"]["flop_ratio"] > 1  # its auxiliary MLP: more arithmetic than BP
    timing = mlp["dfa"]["by_threads"]["1"]
    assert timing["timed_steps"] == 2 and timing["per_round_ratio_q1"] <= timing["per_round_ratio_q3"]
    for key, row in mlp.items():  # every rule's step profiled once, split three ways
        split = row["time_split"]
        assert split["profiled_steps"] == 1 and split["priced_ms"] > 0 and split["unpriced_ms"] > 0, key
        # the profiled operations ran inside the step: their times fit in its wall time (the clocks differ)
        assert split["priced_ms"] + split["unpriced_ms"] <= 1.05 * split["wall_ms"], key
    assert mlp["bp"]["priced_overhead"] == 1 and mlp["fa"]["priced_overhead"] > 0
    report = (tmp_path / "RESULTS.md").read_text()
    for column in ("| time | FLOPs | overhead | memory | spread (q1-q3) |", "1-minute load average", "## vgg",
                   "| priced ms | priced overhead | unpriced ms | outside ms |", "## Where the time goes"):
        assert column in report
    assert all(f"| `{name}` |" in report for name in rules.available())


class _Stepping:
    """A stand-in for a rule: it notes the order in which the rounds step it."""

    def __init__(self, name: str, log: list[str]):
        self.name, self.log = name, log

    def step(self, x, y):
        self.log.append(self.name)


def test_rounds_step_every_rule_once_starting_from_a_rotating_rule_and_time_after_the_warm_up():
    log: list[str] = []
    rows = plan_rows(TINY_NETWORKS["mlp"], ["bp", "fa", "dfa"])
    for row in rows:
        row.rule = _Stepping(row.key, log)  # type: ignore[assignment]
    batch = (torch.zeros(1), torch.zeros(1))
    interleave(rows, [batch] * 4, warmup=1, threads=1, guard=None)
    assert log == ["bp", "fa", "dfa", "fa", "dfa", "bp", "dfa", "bp", "fa", "bp", "fa", "dfa"]
    assert all(len(row.ms[1]) == 3 for row in rows)


def test_a_rule_that_fails_is_named_in_its_row_and_the_others_are_still_measured(tmp_path):
    @register("speed-test-broken")
    class Broken(Backprop):
        """A rule registered only inside this test; its steps fail."""

        def assign_credit(self, x, y):
            raise RuntimeError("no credit here")

    suite = replace(TINY, networks={"mlp": TINY_NETWORKS["mlp"]})
    try:
        summary = run_speed(SpeedOptions(suite, tmp_path, rule_names=["fa", "speed-test-broken"], data=None,
                                         progress=False))
    finally:
        del _REGISTRY["speed-test-broken"]
    assert summary["failed"] == ["mlp/speed-test-broken"]
    figures = json.loads((tmp_path / "speed.json").read_text())["mlp"]
    assert figures["speed-test-broken"]["time_ratio"] is None and figures["fa"]["flop_ratio"] == 1
    assert "failed: RuntimeError: no credit here" in (tmp_path / "RESULTS.md").read_text()


def test_the_command_line_runs_the_quick_suite_and_refuses_what_does_not_apply(tmp_path, monkeypatch, capsys, fashion):
    monkeypatch.setattr(speed_suite, "QUICK", replace(TINY, name="speed-quick", networks={"mlp": TINY_NETWORKS["mlp"]}))
    monkeypatch.setattr(speed_suite, "load", lambda name: fashion)
    out = tmp_path / "speed"
    argv = ["bench", "--suite", "speed", "--quick", "--rules", "bp,fa", "--out", str(out), "--quiet"]
    assert main(argv) == 0
    assert f"bench speed-quick: {out}/: RESULTS.md, speed.json, speed-details.json" in capsys.readouterr().out
    assert set(json.loads((out / "speed.json").read_text())["mlp"]) == {"bp", "fa"}
    assert "`localcredit bench --suite speed --quick --rules bp,fa" in (out / "RESULTS.md").read_text()
    assert main(argv) == 2  # a finished run is not overwritten without --overwrite
    assert "--overwrite" in capsys.readouterr().err
    assert main([*argv, "--overwrite"]) == 0
    assert main(["bench", "--suite", "speed", "--quick", "--seeds", "2", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert "--seeds" in err and len(err.splitlines()) == 1 and not (tmp_path / "x").exists()


def test_the_quick_suite_keeps_the_real_networks_and_is_short():
    assert set(QUICK.networks) == {"mlp", "vgg", "resnet"} and QUICK.threads == (1,)
    assert QUICK.steps + QUICK.warmup <= 10 and QUICK.batch_size <= 32


@pytest.mark.parametrize("threads", [0, -1])
def test_a_bad_thread_count_is_a_user_error(tmp_path, threads):
    with pytest.raises(rules.base.UserError, match="--threads"):
        run_speed(SpeedOptions(TINY, tmp_path, threads=threads, data=None, progress=False))


def test_the_gpu_speed_script_runs_its_cpu_path(tmp_path):
    """benchmarks/gpu_speed.py on the CPU (CI has no GPU) with tiny settings, so that it cannot rot."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_speed.py"
    spec = importlib.util.spec_from_file_location("gpu_speed", path)
    assert spec is not None and spec.loader is not None
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    argv = ["--device", "cpu", "--tiny", "--rules", "bp,gaitprop", "--tta-rules", "bp", "--data", "synthetic",
            "--out", str(tmp_path)]
    assert script.run(argv) == 0
    figures = json.loads((tmp_path / "speed" / "speed.json").read_text())
    assert set(figures) == {"mlp", "vgg", "resnet"} and set(figures["vgg"]) == {"bp", "gaitprop", "bp [invertible-conv]"}
    (row,) = json.loads((tmp_path / "time_to_accuracy.json").read_text())["rows"]
    assert row["rule"] == "bp" and len(row["seconds"]) == len(row["test_accuracy"]) == 1
    readme = (tmp_path / "README.md").read_text()
    assert "not checked on the CPU" in readme and "| `bp` | 1 |" in readme and "gpu_speed.py --device cpu" in readme
