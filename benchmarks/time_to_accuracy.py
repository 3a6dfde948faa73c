"""Time to accuracy on the conv suite's VGG: one process against two, data- and block-parallel (not a test).

    PYTHONPATH=. .venv/bin/python benchmarks/time_to_accuracy.py --out results/time-to-accuracy
        [--rules bp,local-learned,dgl,predsim] [--epochs 4] [--target 0.88] [--limit-train N]

The seeds' promise is that local learning trains faster in wall-clock time because its blocks can run
on separate devices at once. Each rule trains the conv suite's VGG (``--arch vgg --channels
16,M,32,M,64,M --hidden 128``, batch norm) on Fashion-MNIST with the conv suite's recipe (2-pixel jitter
and flips, Adam at the learning rate that suite tuned for the rule, ``LEARNING_RATES``; no schedule, so
that every epoch of a short run learns at the same rate), seed 0, twice, as real ``localcredit train``
commands, one torch thread per process:

* **1 process** (``--threads 1``);
* **2 processes** (``--procs 2``): BP with ``--parallel data`` (each process half of every batch,
  gradients all-reduced), the local rules with ``--parallel blocks`` (a pipeline of two stages).

Per run, the test accuracy after every epoch against the training seconds so far (result.json's
``seconds_per_epoch``: training only, evaluation left out, as the epochs of either layout evaluate
alike), the seconds to reach ``--target`` (the first epoch at or above it; ``-`` if none did), and per
rule and layout the **speed-up** (median steady epoch of 1 process / of 2; the first epoch pays
one-off costs) and the **efficiency** = speed-up / 2. The two layouts of a rule run one after the other
and the rules in turn, so that drift of a shared machine falls on all alike: read the load averages.
Writes ``OUT/README.md``, ``OUT/time_to_accuracy.json`` and ``OUT/time_to_accuracy.png``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

#: Adam learning rates the conv suite tuned on Fashion-MNIST (results/bench-conv/RESULTS.md, the
#: "lr (fashion-mnist)" column): the same net and data, tuned on a validation split.
LEARNING_RATES = {"bp": 0.003, "local-learned": 0.009, "dgl": 0.003, "predsim": 0.001, "local-random": 0.003,
                  "lfnn-l": 0.003}
#: rules that ``--parallel blocks`` takes (docs/distributed.md); every other rule runs data-parallel
BLOCK_PARALLEL = {"local-random", "local-learned", "lfnn-l", "predsim", "dgl"}
NETWORK = ["--arch", "vgg", "--channels", "16,M,32,M,64,M", "--hidden", "128"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rules", default="bp,local-learned,dgl,predsim")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--target", type=float, default=0.88, help="test accuracy to reach (default 0.88)")
    parser.add_argument("--limit-train", type=int, default=None, help="fewer training images (a check of the script)")
    args = parser.parse_args(argv)
    args.rules = [name.strip() for name in args.rules.split(",") if name.strip()]
    unknown = [name for name in args.rules if name not in LEARNING_RATES]
    if unknown:
        parser.error(f"no tuned learning rate for {', '.join(unknown)}; choose from {', '.join(LEARNING_RATES)}")
    if args.epochs < 2:
        parser.error("--epochs must be at least 2 (the first epoch is left out of the speed-up)")
    return args


def train_command(rule: str, procs: int, args: argparse.Namespace, out: Path) -> list[str]:
    command = [sys.executable, "-m", "localcredit", "train", "--rule", rule, "--data", "fashion-mnist", *NETWORK,
               "--lr", str(LEARNING_RATES[rule]), "--augment", "crop:2,flip", "--epochs", str(args.epochs),
               "--batch-size", "128", "--seed", "0", "--out", str(out), "--quiet"]
    if args.limit_train:
        command += ["--limit-train", str(args.limit_train)]
    if procs == 1:
        return [*command, "--threads", "1"]
    return [*command, "--procs", str(procs), "--parallel", "blocks" if rule in BLOCK_PARALLEL else "data"]


def seconds_to(target: float, seconds: list[float], accuracy: list[float]) -> float | None:
    """Training seconds until the first epoch whose test accuracy is at least ``target``."""
    elapsed = 0.0
    for s, a in zip(seconds, accuracy):
        elapsed += s
        if a >= target:
            return elapsed
    return None


def run_one(rule: str, procs: int, args: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    out = scratch / f"{rule}-{procs}"
    command = train_command(rule, procs, args, out)
    load = round(os.getloadavg()[0], 2)
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    result = json.loads((out / "result.json").read_text())
    seconds, accuracy = result["seconds_per_epoch"], result["test_accuracy_per_epoch"]
    row = {"rule": rule, "procs": procs, "layout": result["parallel"]["mode"], "seconds_per_epoch": seconds,
           "test_accuracy_per_epoch": accuracy, "seconds_to_target": seconds_to(args.target, seconds, accuracy),
           "steady_seconds_per_epoch": statistics.median(seconds[1:]), "process_wall_seconds": wall,
           "load_average_1min_before": load, "stages": result["parallel"].get("stages"),
           "command": " ".join(["localcredit", *command[3:]]).replace(str(out), "OUT")}
    print(json.dumps({k: row[k] for k in ("rule", "procs", "layout", "seconds_per_epoch", "test_accuracy_per_epoch")}),
          flush=True)
    return row


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    by_key = {(row["rule"], row["procs"]): row for row in rows}
    summary = []
    for rule in dict.fromkeys(row["rule"] for row in rows):
        one, two = by_key[(rule, 1)], by_key[(rule, 2)]
        speedup = one["steady_seconds_per_epoch"] / two["steady_seconds_per_epoch"]
        summary.append({"rule": rule, "layout": two["layout"], "speedup": speedup, "efficiency": speedup / 2,
                        "seconds_to_target_1": one["seconds_to_target"], "seconds_to_target_2": two["seconds_to_target"]})
    return summary


def plot(rows: list[dict[str, Any]], target: float, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, rule in enumerate(dict.fromkeys(row["rule"] for row in rows)):
        for row in (r for r in rows if r["rule"] == rule):
            elapsed = [sum(row["seconds_per_epoch"][:e + 1]) for e in range(len(row["seconds_per_epoch"]))]
            ax.plot(elapsed, row["test_accuracy_per_epoch"], marker="o", color=f"C{i}",
                    linestyle="-" if row["procs"] == 2 else "--",
                    label=f"{rule}, {'2 processes (' + row['layout'] + ')' if row['procs'] == 2 else '1 process'}")
    ax.axhline(target, color="grey", linewidth=0.8)
    ax.set_xlabel("training seconds (evaluation left out)")
    ax.set_ylabel("test accuracy")
    ax.set_title("Fashion-MNIST, the conv suite's VGG: accuracy against wall-clock time")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _cell(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def write(args: argparse.Namespace, command: str, rows: list[dict[str, Any]], summary: list[dict[str, Any]],
          started: str, loads: tuple[float, float]) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "time_to_accuracy.json").write_text(json.dumps(
        {"command": command, "date": started, "target": args.target, "rows": rows, "summary": summary}, indent=1) + "\n")
    plot(rows, args.target, args.out / "time_to_accuracy.png")
    lines = ["# Time to accuracy: 1 process against 2 (benchmarks/time_to_accuracy.py)", "",
             f"Command: `{command}`  ",
             f"Date: {started}; {platform.machine()}, {os.cpu_count()} cores, {platform.system()}; one torch thread "
             f"per process; 1-minute load average {loads[0]:.2f} at the start, {loads[1]:.2f} at the end.", "",
             f"Target: test accuracy {args.target}. Speed-up = median steady epoch (epochs 2-{args.epochs}) of 1 "
             "process / of 2; efficiency = speed-up / 2.", "",
             "| rule | layout with 2 processes | s/epoch, 1 process | s/epoch, 2 processes | speed-up | efficiency "
             f"| s to {args.target}, 1 process | s to {args.target}, 2 processes |", "|---|---|---|---|---|---|---|---|"]
    by_key = {(row["rule"], row["procs"]): row for row in rows}
    for item in summary:
        one, two = by_key[(item["rule"], 1)], by_key[(item["rule"], 2)]
        lines.append(f"| `{item['rule']}` | {item['layout']} | {_cell(one['steady_seconds_per_epoch'])} | "
                     f"{_cell(two['steady_seconds_per_epoch'])} | {item['speedup']:.2f} | {item['efficiency']:.2f} | "
                     f"{_cell(item['seconds_to_target_1'])} | {_cell(item['seconds_to_target_2'])} |")
    lines += ["", "Test accuracy after each epoch (training seconds so far):", "",
              "| rule | processes | " + " | ".join(f"epoch {e + 1}" for e in range(args.epochs)) + " |",
              "|---|---|" + "---|" * args.epochs]
    for row in rows:
        cells, elapsed = [], 0.0
        for s, a in zip(row["seconds_per_epoch"], row["test_accuracy_per_epoch"]):
            elapsed += s
            cells.append(f"{a:.4f} ({elapsed:.0f} s)")
        lines.append(f"| `{row['rule']}` | {row['procs']} | " + " | ".join(cells) + " |")
    lines += ["", "![accuracy against seconds](time_to_accuracy.png)", "", "Commands (OUT: a scratch folder):", ""]
    lines += [f"    {row['command']}" for row in rows]
    lines += ["", (__doc__ or "").split("\n\n", 2)[2]]
    (args.out / "README.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = "PYTHONPATH=. .venv/bin/python benchmarks/time_to_accuracy.py " + " ".join(
        sys.argv[1:] if argv is None else argv)
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    load_start = os.getloadavg()[0]
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for rule in args.rules:
            for procs in (1, 2):
                rows.append(run_one(rule, procs, args, Path(scratch)))
    write(args, command, rows, summarise(rows), started, (load_start, os.getloadavg()[0]))
    print(f"time_to_accuracy: {args.out}/: README.md, time_to_accuracy.json, time_to_accuracy.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
