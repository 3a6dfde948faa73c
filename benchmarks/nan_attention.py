"""Choose `nan`'s default attention on a validation split, and time nan / nan-bp against bp.

Validation split: the last 10k of Fashion-MNIST's 60k training images (the test set is never used).
Each candidate trains on the first 50k for ``--epochs`` epochs and is scored by validation accuracy.
Speed: bp, nan-bp and the nan candidates take turns on the same batches in one process (several
rounds, median), because the CPU is shared with other runs and absolute timings drift.

    .venv/bin/python benchmarks/nan_attention.py --out results/nan
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import time
from pathlib import Path

import torch

from localcredit.data import Dataset, load
from localcredit.experiment import RunSpec, build_rule
from localcredit.training.config import TrainConfig
from localcredit.training.trainer import Trainer

CANDIDATES: list[tuple[str, list[str]]] = [
    ("bp", []),
    ("nan-bp", []),
    ("nan", ["attention=softmax", "tau=0.5"]),
    ("nan", ["attention=softmax", "tau=1"]),
    ("nan", ["attention=softmax", "tau=4"]),
    ("nan", ["attention=topk", "k=50"]),
    ("nan", ["attention=topk", "k=200"]),
]


def validation_split(data: Dataset, held_out: int) -> Dataset:
    cut = len(data.x_train) - held_out
    return Dataset(name=data.name, x_train=data.x_train[:cut], y_train=data.y_train[:cut],
                   x_test=data.x_train[cut:], y_test=data.y_train[cut:], num_classes=data.num_classes)


def label(rule: str, options: list[str]) -> str:
    return " ".join([rule, *options])


def select(data: Dataset, hidden: list[int], epochs: int, seeds: list[int]) -> list[dict]:
    rows = []
    for seed in seeds:
        for rule_name, options in CANDIDATES:
            rule = build_rule(RunSpec(rule=rule_name, data=data.name, hidden=hidden, options=options, seed=seed), data)
            result = Trainer(rule, data, TrainConfig(epochs=epochs, seed=seed, progress=False)).fit()
            stats = rule.statistics().get("per_epoch", [{}])[-1]
            row = {"candidate": label(rule_name, options), "seed": seed, "epochs": epochs,
                   "validation_accuracy": result["test_accuracy"],
                   "validation_accuracy_per_epoch": result["test_accuracy_per_epoch"],
                   "seconds_per_epoch": result["seconds_per_epoch"],
                   "attention_support": stats.get("attention_support"), "cosine_with_bp": stats.get("cosine_with_bp")}
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def time_rules(data: Dataset, hidden: list[int], rounds: int, steps: int, batch: int = 128) -> dict[str, float]:
    """Median seconds for ``steps`` training steps, per candidate, candidates alternating every round."""
    rules = {label(name, options): build_rule(RunSpec(rule=name, data=data.name, hidden=hidden, options=options), data)
             for name, options in CANDIDATES}
    times: dict[str, list[float]] = {key: [] for key in rules}
    for _ in range(rounds):
        for key, rule in rules.items():
            start = time.perf_counter()
            for i in range(steps):
                rule.step(data.x_train[i * batch:(i + 1) * batch], data.y_train[i * batch:(i + 1) * batch])
            times[key].append(time.perf_counter() - start)
    return {key: statistics.median(values) for key, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", default="1000,1000")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--timing-rounds", type=int, default=5)
    parser.add_argument("--timing-steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--timing-only", action="store_true", help="skip the selection; write timing.json")
    parser.add_argument("--out", default="results/nan")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    hidden = [int(h) for h in args.hidden.split(",")]
    data = validation_split(load("fashion-mnist"), held_out=10_000)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = [] if args.timing_only else select(data, hidden, args.epochs, [int(s) for s in args.seeds.split(",")])
    medians = time_rules(data, hidden, args.timing_rounds, args.timing_steps)
    speed = {key: {"median_seconds": round(value, 4), "relative_to_bp": round(value / medians["bp"], 3)}
             for key, value in medians.items()}
    print(json.dumps(speed, indent=1))
    if args.timing_only:
        (out / "timing.json").write_text(json.dumps({"args": vars(args), "torch_version": torch.__version__,
                                                     "timing": speed}, indent=2) + "\n")
        return

    payload = {"command": "benchmarks/nan_attention.py", "args": vars(args), "validation": "last 10k of 60k train",
               "torch_version": torch.__version__, "threads": torch.get_num_threads(),
               "selection": rows, "timing": speed}
    (out / "selection.json").write_text(json.dumps(payload, indent=2) + "\n")
    with open(out / "selection.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["candidate", "seed", "epochs", "validation_accuracy", "seconds_per_epoch",
                         "step_time_relative_to_bp"])
        for row in rows:
            writer.writerow([row["candidate"], row["seed"], row["epochs"], row["validation_accuracy"],
                             round(sum(row["seconds_per_epoch"]) / len(row["seconds_per_epoch"]), 2),
                             speed[row["candidate"]]["relative_to_bp"]])


if __name__ == "__main__":
    main()
