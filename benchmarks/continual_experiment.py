"""The continual-learning experiment of results/continual/: every registered rule x scenario x seed.

    python benchmarks/continual_experiment.py --out results/continual [--seeds 3] [--tasks 5] [--rules bp,nan]

Each run is one ``localcredit continual`` call; runs whose result.json exists are skipped, so the
script can be stopped and restarted. It then writes ``table.csv`` and the table part of README.md
(mean ± std over seeds of average accuracy, forgetting and backward transfer).
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from localcredit import rules
from localcredit.cli import main as localcredit

SCENARIOS = ("permuted", "split-class", "split-task")
HIDDEN = "400,400"  # the usual continual-learning MLP size (two hidden layers of 400)


def run_dir(out: Path, scenario: str, rule: str, seed: int) -> Path:
    return out / "runs" / scenario / f"{rule}-seed{seed}"


def arguments(rule: str, scenario: str, seed: int, tasks: int, out: Path) -> list[str]:
    argv = ["continual", "--rule", rule, "--data", "fashion-mnist", "--scenario", scenario,
            "--tasks", str(tasks), "--epochs", "1", "--seed", str(seed), "--out", str(out), "--quiet"]
    if rules.get(rule).default_arch == "mlp":  # rules with their own network (e.g. invertible) keep it
        argv += ["--hidden", HIDDEN]
    return argv


def run_all(out: Path, rule_names: list[str], seeds: int, tasks: int, scenarios=SCENARIOS,
            first_seed: int = 0) -> None:
    for scenario in scenarios:
        for rule in rule_names:
            for seed in range(first_seed, seeds):
                target = run_dir(out, scenario, rule, seed)
                if (target / "result.json").exists():
                    continue
                start = time.perf_counter()
                code = localcredit(arguments(rule, scenario, seed, tasks, target))
                print(f"  {scenario} {rule} seed {seed}: exit {code}, {time.perf_counter() - start:.0f} s",
                      flush=True)


def mean_std(values: list[float]) -> str:
    if not values:
        return "n/a"
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {spread:.3f}"


def summarise(out: Path, rule_names: list[str]) -> list[dict[str, str]]:
    rows = []
    for scenario in SCENARIOS:
        for rule in rule_names:
            results = [json.loads(p.read_text()) for p in sorted((out / "runs" / scenario).glob(f"{rule}-seed*/result.json"))]
            if not results:
                continue
            rows.append({"scenario": scenario, "rule": rule, "seeds": str(len(results)),
                         "average_accuracy": mean_std([r["average_accuracy"] for r in results]),
                         "forgetting": mean_std([r["forgetting"] for r in results]),
                         "backward_transfer": mean_std([r["backward_transfer"] for r in results]),
                         "forgetting_values": " ".join(f"{r['forgetting']:.3f}" for r in results)})
    return rows


def write_table(out: Path, rows: list[dict[str, str]]) -> str:
    with open(out / "table.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| scenario | rule | seeds | average accuracy | forgetting | backward transfer | forgetting per seed |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['scenario']} | {r['rule']} | {r['seeds']} | {r['average_accuracy']} | {r['forgetting']} | "
              f"{r['backward_transfer']} | {r['forgetting_values']} |" for r in rows]
    table = "\n".join(lines) + "\n"
    (out / "table.md").write_text(table)
    return table


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("results/continual"))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--tasks", type=int, default=5)
    parser.add_argument("--first-seed", type=int, default=0, help="skip seeds below this (to split work)")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated subset to run")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 leaves a core free)")
    parser.add_argument("--rules", default=None, help="comma-separated (default: every registered rule)")
    return parser.parse_args()


if __name__ == "__main__":
    args = parse()
    torch.set_num_threads(args.threads)
    names = args.rules.split(",") if args.rules else list(rules.available())
    run_all(args.out, names, args.seeds, args.tasks, args.scenarios.split(","), args.first_seed)
    print(write_table(args.out, summarise(args.out, names)))
    sys.exit(0)
