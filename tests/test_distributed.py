"""Several processes (CPU, gloo, 2 processes): data parallel equals one process, the block pipeline
equals the sequential local rule, a failing rank ends the run, bad combinations are refused.

The multi-process runs are real ``localcredit train`` commands on a small .npz of real Fashion-MNIST;
the single-process references run in this process at one thread, like each rank. Independent
commands run side by side to keep the file fast.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from localcredit.cli import main
from localcredit.data import load
from localcredit.experiment import RunSpec, build_rule
from localcredit.nets.architectures import NetSpec
from localcredit.spec import to_argv
from localcredit.training import data_parallel
from localcredit.training.block_parallel import partition
from localcredit.training.config import TrainConfig
from localcredit.training.data_parallel import DataParallel, GradientBuckets
from localcredit.training.distributed import plan, spawn
from localcredit.training.parallel import rank_seed
from localcredit.training.runfiles import CHECKPOINT, RESULT
from localcredit.training.trainer import Parallelism, Trainer

#: Every test here starts processes (torch.distributed): `pytest -m "not distributed"` leaves them out.
pytestmark = pytest.mark.distributed

TIMEOUT_S = 120


@pytest.fixture(scope="module")
def npz(fashion_3k_npz) -> str:
    return fashion_3k_npz


def train_command(*options: str) -> list[str]:
    return [sys.executable, "-m", "localcredit", "train", "--quiet", *options]


def run_all(*commands: list[str], cwd: Path) -> list[subprocess.CompletedProcess]:
    """Run independent commands side by side; wait for all of them."""
    procs = [subprocess.Popen(c, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for c in commands]
    done = []
    for command, proc in zip(commands, procs):
        out, err = proc.communicate(timeout=TIMEOUT_S)
        done.append(subprocess.CompletedProcess(command, proc.returncode, out, err))
    return done


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stderr
    return proc


def single_process_run(data_name: str, out: Path, rule: str, hidden: list[int], epochs: int, batch_size: int,
                       limit: int | None = None, optimizer: str = "adam", **network) -> dict:
    """The reference: the same run in this process, at one thread like each rank."""
    torch.set_num_threads(1)
    data = load(data_name)
    spec = RunSpec(rule=rule, data=data_name, hidden=hidden, optimizer=optimizer, **network)
    config = TrainConfig(epochs=epochs, batch_size=batch_size, limit_train=limit, progress=False)
    return Trainer(build_rule(spec, data), data, config, out_dir=out, run_info={"rule": rule}).fit()


def checkpoint(out: Path) -> dict:
    return torch.load(out / CHECKPOINT, weights_only=True)


def assert_same_state(a: Path, b: Path, atol: float) -> None:
    """Weights and optimiser states of two runs' checkpoints agree to ``atol``."""
    first, second = checkpoint(a)["rule"], checkpoint(b)["rule"]
    for key, value in first["rule"].items():
        torch.testing.assert_close(value, second["rule"][key], atol=atol, rtol=0, msg=key)
    for opt_a, opt_b in zip(first["optimizers"], second["optimizers"], strict=True):
        for state_a, state_b in zip(opt_a["state"].values(), opt_b["state"].values(), strict=True):
            for name in state_a:
                torch.testing.assert_close(state_a[name], state_b[name], atol=atol, rtol=0, msg=name)


def result(out: Path) -> dict:
    return json.loads((out / RESULT).read_text())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----- data parallel ---------------------------------------------------------------------------
def test_data_parallel_equals_one_process_after_one_step(npz, tmp_path):
    # One step of 101 samples: shares of 51 and 50, so the average must be weighted to be exact.
    # SGD, because Adam's first step is lr * sign(g) and would hide a wrongly scaled average.
    options = ["--rule", "bp", "--data", npz, "--hidden", "32", "--epochs", "1", "--batch-size", "101",
               "--limit-train", "101", "--optimizer", "sgd"]
    spawned, torchrun = run_all(
        train_command(*options, "--procs", "2", "--out", "spawned"),
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
         "-m", "localcredit", "train", "--quiet", *options, "--out", "torchrun"],
        cwd=tmp_path)
    single = single_process_run(npz, tmp_path / "single", "bp", [32], epochs=1, batch_size=101, limit=101,
                                optimizer="sgd")
    for out, proc in (("spawned", spawned), ("torchrun", torchrun)):
        ok(proc)
        assert_same_state(tmp_path / out, tmp_path / "single", atol=1e-6)
        written = result(tmp_path / out)
        assert written["parallel"] == {"mode": "data", "procs": 2, "backend": "gloo"}
        assert written["train_loss_per_epoch"] == pytest.approx(single["train_loss_per_epoch"], rel=1e-5)
        assert sorted(p.name for p in (tmp_path / out).iterdir()) == [CHECKPOINT, "config.yaml", RESULT]
    assert spawned.stdout.count("test_accuracy") == 1, "only rank 0 prints the summary"


def test_averaged_gradients_keep_their_parameters_layout():
    # torch's fused Adam (CPU) reads a gradient's memory as if laid out as its parameter's: a
    # default-layout gradient of a channels-last weight would update the wrong entries.
    params = [torch.nn.Parameter(torch.randn(4, 2, 3, 3).contiguous(memory_format=torch.channels_last)),
              torch.nn.Parameter(torch.randn(4))]
    want = [torch.randn_like(p) for p in params]
    bucket = data_parallel._Bucket(params)
    bucket.flat = torch.cat([g.reshape(-1) for g in want])  # as the all-reduce leaves it
    bucket.had_grad, bucket.in_place, bucket.work = [True, True], False, object()
    for p, g in zip(params, want):
        p.grad = g
    GradientBuckets._settle(bucket)
    for p, g in zip(params, want):
        assert p.grad.stride() == p.stride()
        torch.testing.assert_close(p.grad, g, rtol=0, atol=0)


def test_data_parallel_adam_on_a_channels_last_net_equals_one_process(npz, tmp_path):
    # Adam as trained by default, on a net with channels-last weights (no batch norm: each process
    # would normalise its own half). Adam's first step is lr * sign(g): an entry whose gradient is
    # near zero may take the other sign from the other summation order, so a few may differ by 2 lr;
    # updates applied to the wrong entries (above) differ in about half of every conv weight.
    network = dict(arch="vgg", channels="4,M,8,M", norm="none")
    options = ["--rule", "bp", "--data", npz, *to_argv(NetSpec(**network, hidden=[16])),
               "--epochs", "1", "--batch-size", "101", "--limit-train", "101"]
    (spawned,) = run_all(train_command(*options, "--procs", "2", "--out", "spawned"), cwd=tmp_path)
    ok(spawned)
    single_process_run(npz, tmp_path / "single", "bp", [16], epochs=1, batch_size=101, limit=101, **network)
    got, want = checkpoint(tmp_path / "spawned")["rule"]["rule"], checkpoint(tmp_path / "single")["rule"]["rule"]
    assert any(v.dim() == 4 for v in want.values())
    for key, value in want.items():
        differing = ((got[key] - value).abs() > 1e-4).float().mean().item()
        assert differing < 0.05, f"{key}: {differing:.0%} of the entries differ"


BN_NET = dict(arch="vgg", channels="4,M,8,M", hidden=[16])  # BatchNorm2d and BatchNorm1d in every block


def _data_parallel_epoch(place, npz: str, out: Path) -> None:
    """One rank of a 2-process data-parallel epoch of bp on a BN net; saves its batch-norm buffers."""
    torch.set_num_threads(1)
    data = load(npz)
    rule = build_rule(RunSpec(rule="bp", data=npz, **BN_NET), data)
    Trainer(rule, data, TrainConfig(epochs=1, batch_size=64, limit_train=640, progress=False),
            parallel=DataParallel(place, "gloo")).fit()
    torch.save(dict(rule.net.named_buffers()), out / f"buffers-{place.rank}.pt")


def test_batch_norm_statistics_are_the_same_on_every_process_after_a_data_parallel_epoch(npz, tmp_path):
    launch = plan(2, "data", "cpu", timeout_s=TIMEOUT_S)
    assert spawn(launch, _data_parallel_epoch, npz, tmp_path) == 0
    first, second = (torch.load(tmp_path / f"buffers-{r}.pt", weights_only=True) for r in (0, 1))
    initial = dict(build_rule(RunSpec(rule="bp", data=npz, **BN_NET), load(npz)).net.named_buffers())
    running = [name for name in first if "running" in name]
    assert len(running) == 2 * 3  # mean and var of the two BatchNorm2d and the BatchNorm1d
    for name in first:
        assert torch.equal(first[name], second[name]), name
    assert all(not torch.equal(first[name], initial[name]) for name in running), "the statistics were trained"


def _dropout_masks(place, npz: str, out: Path) -> None:
    """One rank of a data-parallel run on a net with dropout: its weights, and the masks of its next draws."""
    torch.set_num_threads(1)
    data = load(npz)
    rule = build_rule(RunSpec(rule="bp", data=npz, hidden=[16], dropout=0.5), data)
    parallel = DataParallel(place, "gloo")
    parallel.attach(Trainer(rule, data, TrainConfig(epochs=1, limit_train=200, progress=False), parallel=parallel))
    rule.net.train()
    masks = rule.net.blocks[0](torch.ones(4, 784)) != 0  # dropout after the first layer's ReLU
    torch.save({"state": rule.state_dict(), "masks": masks}, out / f"dropout-{place.rank}.pt")


def test_processes_draw_their_own_dropout_masks_from_the_same_weights(npz, tmp_path):
    assert spawn(plan(2, "data", "cpu", timeout_s=TIMEOUT_S), _dropout_masks, npz, tmp_path) == 0
    first, second = (torch.load(tmp_path / f"dropout-{r}.pt", weights_only=True) for r in (0, 1))
    for key, value in first["state"].items():
        assert torch.equal(value, second["state"][key]), key
    assert not torch.equal(first["masks"], second["masks"]), "both shares of a batch drew the same dropout masks"
    assert rank_seed(torch.get_rng_state(), 1) != rank_seed(torch.get_rng_state(), 2)


def _overlap_rule(npz: str, rule_name: str):
    """A rule on a 784-32-32-10 MLP whose first block holds one more parameter that no loss reaches."""
    rule = build_rule(RunSpec(rule=rule_name, data=npz, hidden=[32, 32], optimizer="sgd"), load(npz))
    rule.net.blocks[0].register_parameter("unused", torch.nn.Parameter(torch.ones(5)))
    return rule


def _overlapped_run(place, npz: str, rule_name: str, out: Path) -> None:
    """One rank: two uneven data-parallel steps with a bucket per parameter; saves the weights, which
    parameters kept no gradient, and how many buckets each step started before the rule returned."""
    torch.set_num_threads(1)
    data_parallel.GRADIENT_BUCKET_BYTES = 1  # every parameter its own bucket: the most interleaving
    started_early = []
    finish = GradientBuckets.finish

    def counting_finish(self, stats):
        started_early.append(self._next)
        finish(self, stats)

    GradientBuckets.finish = counting_finish
    data = load(npz)
    rule = _overlap_rule(npz, rule_name)
    Trainer(rule, data, TrainConfig(epochs=1, batch_size=101, limit_train=202, progress=False),
            parallel=DataParallel(place, "gloo")).fit()
    without = [name for name, p in rule.named_parameters() if p.grad is None]
    torch.save({"state": rule.state_dict(), "without_grad": without, "started_early": started_early,
                "buckets": len(GradientBuckets(rule, place).buckets)}, out / f"{rule_name}-{place.rank}.pt")


@pytest.mark.parametrize("rule_name", ["bp", "local-learned"])
def test_overlapped_buckets_equal_one_process_with_uneven_shares_and_a_parameter_without_gradient(
        rule_name, npz, tmp_path):
    # 101 samples per step: shares of 51 and 50. bp announces each gradient as autograd writes it, so
    # the unused parameter holds back its own bucket and every later one (buckets start in order)
    # until the rule returns; local-learned announces each layer's parameters after its local loss,
    # the unused one among them (as a gradient that stays None), so every bucket starts early.
    assert spawn(plan(2, "data", "cpu", timeout_s=TIMEOUT_S), _overlapped_run, npz, rule_name, tmp_path) == 0
    ranks = [torch.load(tmp_path / f"{rule_name}-{r}.pt", weights_only=True) for r in (0, 1)]
    torch.set_num_threads(1)
    data = load(npz)
    single = _overlap_rule(npz, rule_name)
    Trainer(single, data, TrainConfig(epochs=1, batch_size=101, limit_train=202, progress=False)).fit()
    for rank in ranks:
        for key, value in single.state_dict().items():
            torch.testing.assert_close(rank["state"][key], value, atol=1e-6, rtol=0, msg=key)
        assert rank["without_grad"] == ["net.blocks.0.unused"]
        early = [rank["buckets"]] if rule_name == "local-learned" else range(1, rank["buckets"])
        assert all(started in early for started in rank["started_early"]), rank["started_early"]
    assert ranks[0]["started_early"] == ranks[1]["started_early"] == [ranks[0]["started_early"][0]] * 2


def _announced_then_rewritten(place, npz: str) -> None:
    """One rank of bp whose credit assignment replaces a gradient after the backward announced it final."""
    torch.set_num_threads(1)
    data_parallel.GRADIENT_BUCKET_BYTES = 1
    data = load(npz)
    rule = build_rule(RunSpec(rule="bp", data=npz, hidden=[16]), data)
    assign_credit = rule.assign_credit

    def rewriting(x, y):
        stats = assign_credit(x, y)
        head = next(rule.net.head.parameters())
        head.grad = head.grad.clone()  # the reduction in flight works on the old tensor
        return stats

    rule.assign_credit = rewriting
    Trainer(rule, data, TrainConfig(epochs=1, batch_size=50, limit_train=100, progress=False),
            parallel=DataParallel(place, "gloo")).fit()


def test_a_gradient_changed_after_it_was_announced_final_fails_the_run(npz, capfd):
    assert spawn(plan(2, "data", "cpu", timeout_s=TIMEOUT_S), _announced_then_rewritten, npz) == 1
    assert "changed after the rule announced it final" in capfd.readouterr().err


# ----- block pipeline --------------------------------------------------------------------------
LOCAL_RULES = ["lfnn-l", "local-random"]


def test_block_pipeline_first_step_equals_the_sequential_rule(npz, tmp_path):
    options = lambda rule: ["--rule", rule, "--data", npz, "--hidden", "64,64", "--epochs", "1",  # noqa: E731
                            "--batch-size", "100", "--limit-train", "100", "--parallel", "blocks", "--procs", "2",
                            "--out", rule]
    # Each stage owns its blocks' batch norm: two steps of local-learned on a BN conv net.
    bn_options = ["--rule", "local-learned", "--data", npz, "--arch", "vgg", "--channels", "4,M,8,M", "--hidden", "16",
                  "--epochs", "1", "--batch-size", "50", "--limit-train", "100", "--parallel", "blocks", "--procs", "2",
                  "--out", "bn"]
    # predsim, and dgl on 3 hidden blocks cut into modules of 2 + 1 (--modules: a stage holds whole modules) + head.
    module_options = lambda rule, *opts: ["--rule", rule, "--data", npz, "--hidden", "32,32,32", "--epochs", "1",  # noqa: E731
                                          "--batch-size", "50", "--limit-train", "100", "--parallel", "blocks",
                                          "--procs", "2", "--out", rule, *opts]
    # lfnn-l only: local-random's pipeline is compared with one process over two whole epochs in the next test.
    for proc in run_all(train_command(*options("lfnn-l")), train_command(*bn_options),
                        train_command(*module_options("predsim")),
                        train_command(*module_options("dgl", "--modules", "2,1")), cwd=tmp_path):
        ok(proc)
    single_process_run(npz, tmp_path / "single-lfnn-l", "lfnn-l", [64, 64], epochs=1, batch_size=100, limit=100)
    assert_same_state(tmp_path / "lfnn-l", tmp_path / "single-lfnn-l", atol=1e-7)
    parallel = result(tmp_path / "lfnn-l")["parallel"]
    assert parallel["mode"] == "blocks" and parallel["stages"] == [[0], [1, 2]]  # 784x64 | 64x64 + head
    single_process_run(npz, tmp_path / "single-bn", "local-learned", [16], epochs=1, batch_size=50, limit=100,
                       arch="vgg", channels="4,M,8,M")
    assert_same_state(tmp_path / "bn", tmp_path / "single-bn", atol=1e-6)  # the state holds the BN statistics
    assert any("running_mean" in key for key in checkpoint(tmp_path / "bn")["rule"]["rule"])
    for rule, modules in (("predsim", None), ("dgl", [2, 1])):
        torch.set_num_threads(1)
        data = load(npz)
        spec = RunSpec(rule=rule, data=npz, hidden=[32, 32, 32], modules=modules)
        Trainer(build_rule(spec, data), data, TrainConfig(epochs=1, batch_size=50, limit_train=100, progress=False),
                out_dir=tmp_path / f"single-{rule}", run_info={"rule": rule}).fit()
        assert_same_state(tmp_path / rule, tmp_path / f"single-{rule}", atol=1e-6)
    assert result(tmp_path / "dgl")["parallel"]["stages"] in ([[0], [1, 2]], [[0, 1], [2]])  # module, block, head


def test_block_pipeline_learns_and_resumes_to_the_sequential_run(npz, tmp_path):
    """Two epochs (for lfnn-l: one, then --resume for the second) reach an accuracy floor and the
    same weights, optimiser states and rule statistics as two sequential epochs in one process."""
    options = lambda rule, epochs: ["--rule", rule, "--data", npz, "--hidden", "256,256", "--batch-size", "50",  # noqa: E731
                                    "--epochs", str(epochs), "--parallel", "blocks", "--procs", "2", "--out", rule]
    for proc in run_all(train_command(*options("lfnn-l", 1)), train_command(*options("local-random", 2)),
                        cwd=tmp_path):
        ok(proc)
    ok(run_all(train_command(*options("lfnn-l", 2), "--resume"), cwd=tmp_path)[0])
    for rule in LOCAL_RULES:
        single = single_process_run(npz, tmp_path / f"single-{rule}", rule, [256, 256], epochs=2, batch_size=50)
        blocks = result(tmp_path / rule)
        assert blocks["test_accuracy"] >= 0.65, (rule, blocks["test_accuracy_per_epoch"])  # measured 0.73-0.74
        assert blocks["test_accuracy_per_epoch"] == single["test_accuracy_per_epoch"]
        assert blocks["train_loss_per_epoch"] == pytest.approx(single["train_loss_per_epoch"], rel=1e-5)
        assert blocks["rule_statistics"] == single["rule_statistics"]
        assert_same_state(tmp_path / rule, tmp_path / f"single-{rule}", atol=1e-6)


def two_node_commands(*options: str) -> list[list[str]]:
    """Two torchrun agents of one process each, joined by a c10d rendezvous: two nodes as a cluster sees them
    (this machine stands in for both). Node 0 hosts the rendezvous store; which agent's process becomes rank 0
    is the rendezvous's choice."""
    endpoint = f"127.0.0.1:{free_port()}"
    return [[sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
             "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", "two-nodes",
             "--rdzv-conf", f"is_host={int(node == 0)}", "-m", "localcredit", "train", "--quiet", *options]
            for node in (0, 1)]


@pytest.mark.parametrize("rule,mode", [("bp", "data"), ("local-learned", "blocks")])
def test_two_nodes_under_torchrun_end_as_one_node_with_as_many_processes(npz, tmp_path, rule, mode):
    options = ["--rule", rule, "--data", npz, "--hidden", "32,32", "--epochs", "1", "--batch-size", "50",
               "--limit-train", "100", "--parallel", mode]
    *nodes, one_node = run_all(*two_node_commands(*options, "--out", "two-nodes"),
                               train_command(*options, "--procs", "2", "--out", "one-node"), cwd=tmp_path)
    for proc in (*nodes, one_node):
        ok(proc)
    assert_same_state(tmp_path / "two-nodes", tmp_path / "one-node", atol=0)
    two, one = result(tmp_path / "two-nodes"), result(tmp_path / "one-node")
    assert two["parallel"] == one["parallel"] and two["parallel"]["procs"] == 2
    assert two["train_loss_per_epoch"] == one["train_loss_per_epoch"]
    assert two["test_accuracy"] == one["test_accuracy"]


def test_partition_balances_contiguous_groups():
    assert partition([4, 1, 1, 1, 1], 2) == [range(0, 1), range(1, 5)]
    assert partition([1, 1, 1, 1], 2) == [range(0, 2), range(2, 4)]
    assert partition([5, 3, 3, 1], 3) == [range(0, 1), range(1, 2), range(2, 4)]
    assert partition([1, 2, 3], 3) == [range(0, 1), range(1, 2), range(2, 3)]


# ----- failures --------------------------------------------------------------------------------
FAULTY_RULE = '''
import os, signal, sys, time
import torch.distributed as dist
from localcredit.cli import main
from localcredit.rules.backprop import Backprop
from localcredit.rules.base import register

@register("bp-faulty")
class FaultyBackprop(Backprop):
    """bp that fails on rank 1 at its third step, as FAULT says: raise, kill or hang."""
    steps = 0

    def assign_credit(self, x, y):
        type(self).steps += 1
        if dist.is_initialized() and dist.get_rank() == 1 and self.steps == 3:
            fault = os.environ["FAULT"]
            if fault == "raise":
                raise ValueError("injected failure")
            if fault == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(600)  # hang
        return super().assign_credit(x, y)

if __name__ == "__main__":  # spawned ranks import this file too, and so know the rule
    sys.exit(main(sys.argv[1:]))
'''


def test_a_failing_rank_ends_the_run_with_one_line_naming_it(npz, tmp_path):
    script = tmp_path / "faulty.py"
    script.write_text(FAULTY_RULE)
    faults = {"raise": "rank 1 failed: ValueError: injected failure",
              "kill": "rank 1 was ended by SIGKILL",
              "hang": "rank 0 lost contact with the other processes: Timed out"}
    start = time.monotonic()
    procs = []
    for fault in faults:
        command = [sys.executable, str(script), "train", "--rule", "bp-faulty", "--data", npz, "--hidden", "16",
                   "--epochs", "1", "--procs", "2", "--quiet", "--dist-timeout", "5", "--out", fault]
        procs.append(subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True, env={**os.environ, "FAULT": fault}))
    for (fault, expected), proc in zip(faults.items(), procs):
        _, err = proc.communicate(timeout=TIMEOUT_S)
        lines = err.strip().splitlines()
        assert proc.returncode == 1, (fault, err)
        assert len(lines) == 1 and expected in lines[0], (fault, err)
        assert not (tmp_path / fault / RESULT).exists()
    assert time.monotonic() - start < 60, "a failure must end the run within the timeout, not hang"


# ----- refusals: one line, exit 2, nothing written ---------------------------------------------
REFUSED = {
    "blocks with bp": (["--rule", "bp", "--parallel", "blocks", "--procs", "2"], "not local"),
    "blocks with lfnn": (["--rule", "lfnn", "--parallel", "blocks", "--procs", "2"], "not local"),
    "blocks with one process, bp": (["--rule", "bp", "--parallel", "blocks"], "not local"),
    "more procs than layers": (["--rule", "lfnn-l", "--parallel", "blocks", "--procs", "3"], "--procs 2 or fewer"),
    "zero procs": (["--rule", "bp", "--procs", "0"], "--procs"),
    "unknown layout": (["--rule", "bp", "--procs", "2", "--parallel", "pipes"], "--parallel"),
    "step smaller than procs": (["--rule", "bp", "--procs", "2", "--batch-size", "50", "--limit-train", "101"],
                                "step of 1 samples"),
    "batch norm share of one sample": (["--rule", "bp", "--norm", "batch", "--procs", "2", "--batch-size", "50",
                                        "--limit-train", "103"], "(2 each for batch norm)"),
    "cuda without GPUs": (["--rule", "bp", "--procs", "2", "--device", "cuda"], "cuda"),
    "bad timeout": (["--rule", "bp", "--procs", "2", "--dist-timeout", "0"], "--dist-timeout"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_bad_process_options_exit_2_with_one_line(case, npz, tmp_path, monkeypatch, capsys):
    if case == "cuda without GPUs" and torch.cuda.device_count() >= 2:
        pytest.skip("this machine has the GPUs")
    monkeypatch.chdir(tmp_path)
    options, expect = REFUSED[case]
    code = main(["train", "--data", npz, "--hidden", "16", *options])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and expect in err[0], err
    assert not (tmp_path / "runs").exists(), "nothing may be written"


def test_a_process_that_is_not_the_writer_writes_nothing(npz, tmp_path):
    class Follower(Parallelism):
        writer = False

    data = load(npz)
    rule = build_rule(RunSpec(rule="bp", data=npz, hidden=[16]), data)
    Trainer(rule, data, TrainConfig(epochs=1, limit_train=200, progress=False), out_dir=tmp_path / "out",
            parallel=Follower()).fit()
    assert not (tmp_path / "out").exists()
