"""Speed and memory of the local-error rules against BP (not a test; figures go to results/local_rules/).

    python benchmarks/local_rules.py speed  --out results/local_rules [--limit-train N] [--repeats R]
    python benchmarks/local_rules.py cpu    --out results/local_rules [--repeats R]
    python benchmarks/local_rules.py memory --out results/local_rules [--batch-sizes 128,2048]

speed: one process, one Trainer per rule; full training epochs are timed rule after rule, round
after round (bp, local-random, ..., bp, local-random, ...), so a slow patch of the shared CPU hits
every rule alike. Reported: median seconds per epoch, and the median over rounds of
(rule's epoch / BP's epoch in the same round).

cpu: process CPU time per step on one thread (10 steps per rule per round, rounds alternate), the
figure a loaded machine disturbs least.

memory: every (rule, batch size) runs in a fresh subprocess, so nothing of one rule's allocations
is left for the next. The child measures the step's memory with localcredit.bench.memory (the same meter
as the bench's probes): step_memory_mb, the most memory of tensors made by training steps alive at
one time during a step (activations, temporaries, what the rule carries between steps; weights,
gradients, optimiser state and the data set left out), and step_gradient_mb beside it.
(results/local_rules/memory.* were written by the RSS and saved-tensor figures this replaced:
rerun `memory` to refresh them.)
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from localcredit.bench.memory import step_memory
from localcredit.data import load
from localcredit.experiment import RunSpec, build_rule
from localcredit.training.config import TrainConfig
from localcredit.training.trainer import Trainer

RULES = ["bp", "local-random", "local-learned", "lfnn-l", "lfnn"]
HIDDEN = [1000, 1000, 1000, 1000]


def make_rule(name: str, data, hidden=HIDDEN, seed: int = 0):
    return build_rule(RunSpec(rule=name, data="fashion-mnist", hidden=list(hidden), seed=seed), data)


# ----- speed ---------------------------------------------------------------------------------
def speed(args) -> dict:
    torch.set_num_threads(args.threads)
    data = load("fashion-mnist")
    trainers = {name: Trainer(make_rule(name, data), data,
                              TrainConfig(epochs=args.repeats, limit_train=args.limit_train, progress=False))
                for name in args.rules}
    for trainer in trainers.values():  # warm-up: first calls allocate optimiser state and pick kernels
        trainer.rule.step(trainer.x_train[:128], trainer.y_train[:128])
    seconds = {name: [] for name in args.rules}
    for round_ in range(args.repeats):
        for name, trainer in trainers.items():
            trainer.rule.start_epoch(round_, args.repeats)
            trainer.train_epoch(round_)
            seconds[name].append(trainer.history["seconds_per_epoch"][-1])
            print(f"round {round_ + 1} {name}: {seconds[name][-1]:.2f} s", file=sys.stderr, flush=True)
    table = {}
    for name in args.rules:
        ratios = [s / b for s, b in zip(seconds[name], seconds["bp"])]
        table[name] = {"seconds_per_epoch": seconds[name], "median_seconds": statistics.median(seconds[name]),
                       "ratio_to_bp_per_round": ratios, "median_ratio_to_bp": statistics.median(ratios),
                       "test_accuracy_after_rounds": trainers[name].evaluate(trainers[name].x_test,
                                                                             trainers[name].y_test)}
    return {"hidden": HIDDEN, "train_samples_per_epoch": len(next(iter(trainers.values())).x_train),
            "batch_size": 128, "threads": args.threads, "repeats": args.repeats, "rules": table}


def cpu_time(args) -> dict:
    """Process CPU time per step on one thread, rules alternated in rounds of 10 steps.

    CPU time (not wall time) is what a busy shared machine disturbs least; one thread, so no
    time is spent spinning in a second one.
    """
    torch.set_num_threads(1)
    data = load("fashion-mnist")
    rules = {name: make_rule(name, data) for name in args.rules}
    batches = [(data.x_train[i * 128:(i + 1) * 128], data.y_train[i * 128:(i + 1) * 128]) for i in range(10)]
    for rule in rules.values():
        rule.step(*batches[0])
    ms = {name: [] for name in rules}
    for _ in range(args.repeats):
        for name, rule in rules.items():
            start = time.process_time()
            for x, y in batches:
                rule.step(x, y)
            ms[name].append((time.process_time() - start) / len(batches) * 1000)
    rows = [{"rule": name, "cpu_ms_per_step": statistics.median(v),
             "median_ratio_to_bp": statistics.median(a / b for a, b in zip(v, ms["bp"])),
             "cpu_ms_per_step_rounds": " ".join(f"{t:.1f}" for t in v)} for name, v in ms.items()]
    return {"hidden": HIDDEN, "batch_size": 128, "threads": 1, "repeats": args.repeats, "rows": rows}


# ----- memory --------------------------------------------------------------------------------
def memory_one(rule_name: str, batch: int, steps: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    data = load("fashion-mnist")
    rule = make_rule(rule_name, data)
    batches = [(data.x_train[i * batch:(i + 1) * batch], data.y_train[i * batch:(i + 1) * batch])
               for i in range(steps)]
    return {"rule": rule_name, "batch_size": batch, **step_memory(rule, batches)}


def memory(args) -> dict:
    rows = []
    for batch in args.batch_sizes:
        for name in args.rules:
            command = [sys.executable, __file__, "memory-one", "--rule", name, "--batch", str(batch),
                       "--steps", str(args.steps), "--threads", str(args.threads)]
            out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            print(rows[-1], file=sys.stderr, flush=True)
    for row in rows:
        bp = next(r for r in rows if r["rule"] == "bp" and r["batch_size"] == row["batch_size"])
        for key in ("step_memory_mb",):
            row[f"{key}_ratio_to_bp"] = row[key] / bp[key] if bp[key] > 0 else None
    return {"hidden": HIDDEN, "steps": args.steps, "threads": args.threads, "rows": rows}


def write(out: Path, name: str, payload: dict, rows: list[dict]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(payload, indent=2) + "\n")
    with open(out / f"{name}.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["speed", "cpu", "memory", "memory-one"])
    parser.add_argument("--out", default="results/local_rules")
    parser.add_argument("--rules", default=",".join(RULES), type=lambda s: s.split(","))
    parser.add_argument("--limit-train", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-sizes", default="128,2048", type=lambda s: [int(b) for b in s.split(",")])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rule")
    parser.add_argument("--batch", type=int)
    args = parser.parse_args()
    if "bp" not in args.rules:
        args.rules = ["bp", *args.rules]
    if args.what == "memory-one":
        print(json.dumps(memory_one(args.rule, args.batch, args.steps, args.threads)))
        return
    started = time.time()
    payload = {"speed": speed, "cpu": cpu_time, "memory": memory}[args.what](args)
    payload["command"] = " ".join(["python", *sys.argv])
    payload["wall_seconds"] = time.time() - started
    if args.what == "speed":
        rows = [{"rule": n, "median_seconds_per_epoch": r["median_seconds"],
                 "median_ratio_to_bp": r["median_ratio_to_bp"],
                 "seconds_per_epoch": " ".join(f"{s:.2f}" for s in r["seconds_per_epoch"])}
                for n, r in payload["rules"].items()]
    else:
        rows = payload["rows"]
    write(Path(args.out), args.what, payload, rows)
    print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
