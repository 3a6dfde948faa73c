"""Throughput of data-parallel and block-parallel training, and a model of K devices (not a test).

    python benchmarks/distributed.py throughput --out results/distributed [--rounds 3] [--epochs 3] [--flush-denormal]
                                                [--configs ddp-bp-conv,...] [--limit-train N]
    python benchmarks/distributed.py model      --out results/distributed [--repeats 60] [--flush-denormal]
    python benchmarks/distributed.py steps      --out results/distributed [--steps 40] [--configs ddp-bp-conv,...]
    python benchmarks/distributed.py rules      --out results/distributed [--limit-train 1024]

throughput: real ``localcredit train`` commands on Fashion-MNIST (60,000 images), one torch
thread per process, K = 1 (one process, ``--threads 1``) and K = 2 (``--procs 2``), for
  ddp:    bp and local-learned, on the mlp (hidden 1000) and on the conv net (``--arch conv``:
          conv3x3 32 + pool, 64 + pool, linear head)   (``--procs 2 --parallel data``)
  blocks: local-random and lfnn-l, hidden 1000,1000     (``--procs 2 --parallel blocks``)
``--configs`` runs some of them only (names below, comma-separated; default all).
Configurations alternate within each round, so a slow patch of the machine hits all alike.
``--flush-denormal`` runs the same commands with ``localcredit train --flush-denormal``, so every
process (K = 1 and K = 2 alike) treats subnormal floats as zero: on this CPU, subnormal floats in the second hidden block's update
slow it down more every epoch, which unbalances the stages (see results/distributed/README.md).
samples/s = 60,000 / seconds of a training epoch as result.json reports it (the first epoch is
left out: it pays one-off costs such as torch's lazy imports). Scaling efficiency =
throughput_K / (K * throughput_1).

model: in one process at one thread, the time of each layer's share of a training step
(forward, local loss, backward, its optimiser step) at batch 128, and the bytes of its output;
in two gloo processes, the one-way time of sending such an output and the time of all-reducing
bp's gradients. From these, the block pipeline on K devices runs at
    batch / max over stages (sum of its layers' step times + time to send its output),
with the layers split into K contiguous stages the way ``--parallel blocks`` splits them
(here by measured time instead of FLOPs).

The model's per-layer times cycle through different training batches (the same batch again and
again would drive the updates into subnormal floats); ``--flush-denormal`` as above.

steps: the data-parallel configurations' training steps, timed in this process (K = 1, one
thread) and in each of two gloo processes (K = 2, ``DataParallel.step``), in wall-clock time and
in CPU time (the process's, gloo's threads included). On a busy machine the wall-clock times
mostly measure the others' load; the CPU times still say how much work K = 2 adds:
CPU efficiency = CPU per step at K = 1 / (2 x CPU per step of a K = 2 process), the scaling
efficiency a machine with a free core per process would approach (less the time a process
waits for its peer's reduction). Also: how many gradient buckets there are, and how many of them
started their all-reduce before the rule's credit assignment returned (the overlap).

rules: every registered rule, one epoch on the first 1,024 training images, in one process
(``--threads 1``) and with ``--procs 2`` (data parallel): test accuracy and training loss side by
side (a correctness record, not a timing).
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch

THROUGHPUT_RUNS = {
    # name: (mode, rule, arch, hidden); hidden None: the architecture's default
    "ddp-bp": ("data", "bp", "mlp", "1000"),
    "ddp-local-learned": ("data", "local-learned", "mlp", "1000"),
    "ddp-bp-conv": ("data", "bp", "conv", None),
    "ddp-local-learned-conv": ("data", "local-learned", "conv", None),
    "blocks-local-random": ("blocks", "local-random", "mlp", "1000,1000"),
    "blocks-lfnn-l": ("blocks", "lfnn-l", "mlp", "1000,1000"),
}
BATCH = 128


def train_command(rule: str, arch: str, hidden: str | None, procs: int, mode: str, epochs: int, out: Path,
                  limit_train: int | None, flush_denormal: bool = False) -> list[str]:
    command = [sys.executable, "-m", "localcredit", "train", "--rule", rule, "--data", "fashion-mnist",
               "--arch", arch, *(["--hidden", hidden] if hidden else []),
               "--epochs", str(epochs), "--batch-size", str(BATCH), "--out", str(out), "--quiet"]
    if limit_train:
        command += ["--limit-train", str(limit_train)]  # for a quick check of this script only
    if flush_denormal:
        command += ["--flush-denormal", "on"]  # every process of the run flushes
    if procs == 1:
        return [*command, "--threads", "1"]
    return [*command, "--procs", str(procs), "--parallel", mode]


def chosen_configs(text: str | None) -> list[str]:
    names = list(THROUGHPUT_RUNS) if not text else [name.strip() for name in text.split(",")]
    unknown = [name for name in names if name not in THROUGHPUT_RUNS]
    if unknown:
        raise SystemExit(f"unknown --configs {', '.join(unknown)}; choose from {', '.join(THROUGHPUT_RUNS)}")
    return names


def throughput(args: argparse.Namespace) -> None:
    rows = []
    configs = chosen_configs(args.configs)
    load_at_start = os.getloadavg()
    with tempfile.TemporaryDirectory() as scratch:
        for round_ in range(args.rounds):
            for name in configs:
                mode, rule, arch, hidden = THROUGHPUT_RUNS[name]
                for procs in (1, 2):
                    out = Path(scratch) / f"{name}-{procs}-{round_}"
                    command = train_command(rule, arch, hidden, procs, mode, args.epochs, out, args.limit_train,
                                            args.flush_denormal)
                    load_before = round(os.getloadavg()[0], 2)  # other work on the machine slows a run down
                    start = time.perf_counter()
                    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
                    wall = time.perf_counter() - start
                    result = json.loads((out / "result.json").read_text())
                    steady = result["seconds_per_epoch"][1:]  # the first epoch pays one-off costs
                    rows.append({"config": name, "rule": rule, "arch": arch, "hidden": hidden,
                                 "mode": mode if procs > 1 else "none",
                                 "procs": procs, "round": round_, "seconds_per_epoch": result["seconds_per_epoch"],
                                 "samples_per_second": result["train_samples"] / statistics.median(steady),
                                 "best_samples_per_second": result["train_samples"] / min(steady),
                                 "test_accuracy": result["test_accuracy"], "wall_seconds": wall,
                                 "load_average_1min_before": load_before,
                                 "stages": result["parallel"].get("stages"),
                                 "command": " ".join(command[1:]).replace(str(out), "OUT")})
                    print(f"round {round_} {name} K={procs}: {rows[-1]['samples_per_second']:.0f} samples/s "
                          f"(epochs {', '.join(f'{s:.2f}' for s in result['seconds_per_epoch'])} s; "
                          f"load {load_before})", flush=True)
    summary = summarise(rows, configs)
    stem = args.stem or ("throughput-flush-denormal" if args.flush_denormal else "throughput")
    write(args.out, stem, rows, summary, load_at_start)
    for line in summary:
        print(line)


def summarise(rows: list[dict], configs: list[str]) -> list[dict]:
    """Per configuration: median and best (fastest steady epoch) throughput over rounds, K = 1 and 2.

    The machine is shared: other work only ever slows a run down, so the best epoch is the least
    disturbed estimate; the median shows how much disturbance there was.
    """
    summary = []
    for name in configs:
        runs = {k: [r for r in rows if r["config"] == name and r["procs"] == k] for k in (1, 2)}
        median = {k: statistics.median(r["samples_per_second"] for r in runs[k]) for k in runs}
        best = {k: max(r["best_samples_per_second"] for r in runs[k]) for k in runs}
        summary.append({"config": name,
                        "median_samples_per_second_k1": round(median[1], 1),
                        "median_samples_per_second_k2": round(median[2], 1),
                        "median_scaling_efficiency": round(median[2] / (2 * median[1]), 3),
                        "best_samples_per_second_k1": round(best[1], 1),
                        "best_samples_per_second_k2": round(best[2], 1),
                        "best_scaling_efficiency": round(best[2] / (2 * best[1]), 3)})
    return summary


def write(out: Path, stem: str, rows: list[dict], summary: list[dict] | dict,
          load_at_start: tuple[float, float, float] | None = None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    machine = {"cpu": _cpu_name(), "cores": os.cpu_count(), "torch": torch.__version__,
               "python": platform.python_version(), "load_average_at_start": load_at_start,
               "load_average_at_end": os.getloadavg(), "command": " ".join(["python", *sys.argv])}
    (out / f"{stem}.json").write_text(json.dumps({"machine": machine, "summary": summary, "runs": rows}, indent=2) + "\n")
    with open(out / f"{stem}.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


# ----- the K-device model --------------------------------------------------------------------
def layer_times(rule_name: str, hidden: list[int], repeats: int) -> list[dict]:
    """Per layer: median seconds of its share of a step at batch 128 (one thread), and its output's bytes."""
    from localcredit.data import load
    from localcredit.experiment import RunSpec, build_rule

    torch.set_num_threads(1)
    data = load("fashion-mnist")
    rule = build_rule(RunSpec(rule=rule_name, data="fashion-mnist", hidden=hidden), data)
    batches = list(torch.arange(BATCH * (repeats + 5)).split(BATCH))
    inputs = [data.x_train[index] for index in batches]  # layer l's input, per batch
    layers = []
    for l in range(len(rule.net.layers)):
        samples, outputs = [], []
        for h, index in zip(inputs, batches):
            start = time.perf_counter()
            rule.zero_grad()
            out, loss = rule.block_step_loss(l, h, data.y_train[index])
            loss.backward()
            rule.optimizers[l].step()
            samples.append(time.perf_counter() - start)
            outputs.append(out)
        layers.append({"layer": l, "seconds": statistics.median(samples[5:]),
                       "output_bytes": outputs[0].numel() * outputs[0].element_size(),
                       "parameters": sum(p.numel() for p in rule.parameter_groups()[l])})
        inputs = outputs
    return layers


# ----- per-step times, wall-clock and CPU ----------------------------------------------------
def _ddp_rule(name: str):
    from localcredit.data import load
    from localcredit.experiment import RunSpec, build_rule

    _, rule, arch, hidden = THROUGHPUT_RUNS[name]
    torch.set_num_threads(1)
    data = load("fashion-mnist")
    spec = RunSpec(rule=rule, data="fashion-mnist", arch=arch, hidden=[int(h) for h in hidden.split(",")] if hidden else None)
    return build_rule(spec, data), data


def _timed_steps(step, data, steps: int) -> dict:
    """Median milliseconds per step of ``step`` on consecutive batches (the first 5 left out)."""
    wall, cpu = [], []
    for i in range(steps + 5):
        x, y = data.x_train[i * BATCH:(i + 1) * BATCH], data.y_train[i * BATCH:(i + 1) * BATCH]
        start_wall, start_cpu = time.perf_counter(), time.process_time()
        step(x, y)
        wall.append(time.perf_counter() - start_wall)
        cpu.append(time.process_time() - start_cpu)
    return {"wall_ms": 1e3 * statistics.median(wall[5:]), "cpu_ms": 1e3 * statistics.median(cpu[5:])}


class _StepsOnly:
    """What DataParallel.step needs of a Trainer: the rule."""

    def __init__(self, rule):
        self.rule = rule


def _steps_rank(place, name: str, steps: int, out: str) -> None:
    from localcredit.training.data_parallel import DataParallel

    rule, data = _ddp_rule(name)
    parallel = DataParallel(place, "gloo")
    trainer = _StepsOnly(rule)
    parallel.attach(trainer)
    started_early = []
    finish = parallel.buckets.finish

    def counting_finish(stats):
        started_early.append(parallel.buckets._next)
        finish(stats)

    parallel.buckets.finish = counting_finish
    timing = _timed_steps(lambda x, y: parallel.step(trainer, x, y), data, steps)
    timing.update(buckets=len(parallel.buckets.buckets), started_early=statistics.median(started_early))
    Path(f"{out}.{place.rank}").write_text(json.dumps(timing))


def step_times(args: argparse.Namespace) -> None:
    from localcredit.training.distributed import plan, spawn

    load_at_start = os.getloadavg()
    rows = []
    for name in chosen_configs(args.configs or "ddp-bp,ddp-local-learned,ddp-bp-conv,ddp-local-learned-conv"):
        rule, data = _ddp_rule(name)
        one = _timed_steps(rule.step, data, args.steps)
        with tempfile.TemporaryDirectory() as scratch:
            out = str(Path(scratch) / "rank")
            spawn(plan(2, "data", "cpu"), _steps_rank, name, args.steps, out)
            ranks = [json.loads(Path(f"{out}.{r}").read_text()) for r in (0, 1)]
        two = {key: max(r[key] for r in ranks) for key in ("wall_ms", "cpu_ms")}  # the slower process sets the pace
        rows.append({"config": name, "k1_wall_ms": one["wall_ms"], "k1_cpu_ms": one["cpu_ms"],
                     "k2_wall_ms": two["wall_ms"], "k2_cpu_ms": two["cpu_ms"],
                     "wall_efficiency": one["wall_ms"] / (2 * two["wall_ms"]),
                     "cpu_efficiency": one["cpu_ms"] / (2 * two["cpu_ms"]),
                     "buckets": ranks[0]["buckets"], "buckets_started_early": ranks[0]["started_early"],
                     "load_average_1min_after": round(os.getloadavg()[0], 2)})
        print({k: round(v, 3) if isinstance(v, float) else v for k, v in rows[-1].items()}, flush=True)
    write(args.out, args.stem, rows, {"steps": args.steps}, load_at_start)


def _link_worker(rank: int, port: int, sizes: list[int], repeats: int, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=60))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=2, timeout=timedelta(seconds=60))
    timings = {}
    for nbytes in sizes:
        buffer = torch.zeros(nbytes // 4)
        samples = []
        for _ in range(repeats + 5):
            dist.barrier()
            start = time.perf_counter()
            if rank == 0:  # ping-pong: one-way time = round trip / 2
                dist.send(buffer, 1)
                dist.recv(buffer, 1)
            else:
                dist.recv(buffer, 0)
                dist.send(buffer, 0)
            samples.append((time.perf_counter() - start) / 2)
        reduce_samples = []
        for _ in range(repeats + 5):
            dist.barrier()
            start = time.perf_counter()
            dist.all_reduce(buffer)
            reduce_samples.append(time.perf_counter() - start)
        timings[nbytes] = {"send_seconds": statistics.median(samples[5:]),
                           "all_reduce_seconds": statistics.median(reduce_samples[5:])}
    if rank == 0:
        Path(out).write_text(json.dumps(timings))
    dist.destroy_process_group()


def link_times(sizes: list[int], repeats: int) -> dict[int, dict]:
    """One-way send time and all-reduce time between two gloo processes on this machine, per message size."""
    import torch.distributed as dist
    import torch.multiprocessing as mp

    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    with tempfile.NamedTemporaryFile(suffix=".json") as handle:
        mp.start_processes(_link_worker, args=(store.port, sizes, repeats, handle.name), nprocs=2,
                           start_method="spawn")
        return {int(k): v for k, v in json.loads(Path(handle.name).read_text()).items()}


def partition_times(seconds: list[float], send: list[float], k: int) -> tuple[list[range], float]:
    """The contiguous split into k stages whose slowest stage (its layers + sending its output) is fastest.

    Like ``--parallel blocks``, but on measured times and counting the send; n is tiny, so enumerate.
    """
    n, best = len(seconds), None
    for cuts in itertools.combinations(range(1, n), k - 1):
        bounds = (0, *cuts, n)
        stages = [range(a, b) for a, b in zip(bounds[:-1], bounds[1:])]
        slowest = max(sum(seconds[l] for l in st) + (send[st[-1]] if st[-1] < n - 1 else 0.0) for st in stages)
        if best is None or slowest < best[1]:
            best = (stages, slowest)
    return best  # type: ignore[return-value]


def model(args: argparse.Namespace) -> None:
    torch.set_flush_denormal(args.flush_denormal)
    nets = {"local-random 1000,1000": ("local-random", [1000, 1000]),
            "lfnn-l 1000,1000": ("lfnn-l", [1000, 1000]),
            "local-random 1000x6": ("local-random", [1000] * 6),
            "lfnn-l 1000x6": ("lfnn-l", [1000] * 6)}
    layers = {name: layer_times(rule, hidden, args.repeats) for name, (rule, hidden) in nets.items()}
    bp_gradient_bytes = 4 * (784 * 1000 + 1000 + 1000 * 10 + 10)
    sizes = sorted({l["output_bytes"] for ls in layers.values() for l in ls} | {bp_gradient_bytes})
    link = link_times(sizes, args.repeats)
    predictions = {}
    for name, ls in layers.items():
        seconds = [l["seconds"] for l in ls]
        send = [link[l["output_bytes"]]["send_seconds"] for l in ls]
        rows = []
        for k in range(1, len(ls) + 1):
            stages, slowest = partition_times(seconds, send, k)
            rows.append({"devices": k, "stages": [list(s) for s in stages], "slowest_stage_seconds": slowest,
                         "samples_per_second": BATCH / slowest,
                         "speedup": sum(seconds) / slowest})
        predictions[name] = {"layers": ls, "predicted": rows}
        print(f"{name}: per-layer ms {[round(1e3 * s, 2) for s in seconds]}; " + "; ".join(
            f"K={r['devices']}: {r['samples_per_second']:.0f}/s (x{r['speedup']:.2f})" for r in rows))
    ddp = {"gradient_bytes": bp_gradient_bytes, **link[bp_gradient_bytes]}
    print(f"bp hidden 1000: all-reduce of {bp_gradient_bytes / 2**20:.2f} MiB of gradients takes "
          f"{1e3 * ddp['all_reduce_seconds']:.2f} ms")
    args.out.mkdir(parents=True, exist_ok=True)
    payload = {"batch": BATCH, "link": {str(k): v for k, v in link.items()}, "pipeline": predictions, "ddp_bp_1000": ddp,
               "machine": {"cpu": _cpu_name(), "cores": os.cpu_count(), "torch": torch.__version__,
                           "load_average_at_end": os.getloadavg()}}
    flush = args.flush_denormal
    payload["flush_denormal"] = flush
    (args.out / ("model-flush-denormal.json" if flush else "model.json")).write_text(json.dumps(payload, indent=2) + "\n")


def every_rule(args: argparse.Namespace) -> None:
    from localcredit import rules

    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for rule in rules.available():
            results = {}
            for procs in (1, 2):
                out = Path(scratch) / f"{rule}-{procs}"
                command = [sys.executable, "-m", "localcredit", "train", "--rule", rule, "--data", "fashion-mnist",
                           "--epochs", "1", "--limit-train", str(args.limit_train), "--quiet", "--out", str(out),
                           *(["--threads", "1"] if procs == 1 else ["--procs", "2"])]
                subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
                results[procs] = json.loads((out / "result.json").read_text())
            rows.append({"rule": rule, "arch": results[1]["arch"], "hidden": results[1]["hidden"],
                         "test_accuracy_k1": results[1]["test_accuracy"], "test_accuracy_k2": results[2]["test_accuracy"],
                         "train_loss_k1": results[1]["train_loss_per_epoch"][0],
                         "train_loss_k2": results[2]["train_loss_per_epoch"][0]})
            print(rows[-1], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "rules.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("throughput")
    p.add_argument("--out", type=Path, default=Path("results/distributed"))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--limit-train", type=int, default=None, help="smoke test only: train on fewer samples")
    p.add_argument("--flush-denormal", action="store_true", help="every process flushes subnormal floats to zero")
    p.add_argument("--configs", default=None, help=f"comma-separated subset of {', '.join(THROUGHPUT_RUNS)}")
    p.add_argument("--stem", default=None, help="output file names (default throughput[-flush-denormal])")
    p.set_defaults(func=throughput)
    p = sub.add_parser("model")
    p.add_argument("--out", type=Path, default=Path("results/distributed"))
    p.add_argument("--repeats", type=int, default=60)
    p.add_argument("--flush-denormal", action="store_true", help="flush subnormal floats to zero while timing layers")
    p.set_defaults(func=model)
    p = sub.add_parser("steps")
    p.add_argument("--out", type=Path, default=Path("results/distributed"))
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--configs", default=None, help="comma-separated subset of the ddp-* configurations")
    p.add_argument("--stem", default="steps")
    p.set_defaults(func=step_times)
    p = sub.add_parser("rules")
    p.add_argument("--out", type=Path, default=Path("results/distributed"))
    p.add_argument("--limit-train", type=int, default=1024)
    p.set_defaults(func=every_rule)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
