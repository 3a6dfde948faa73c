"""The fixed cost of each rule's step: its time on an MLP too narrow for the arithmetic to matter (not a test).

    PYTHONPATH=. .venv/bin/python benchmarks/fixed_step_cost.py --out results/speed/fixed-step-cost.json
        [--rules bp,dfa,local-random,local-learned,predsim,lfnn-l,lfnn,dgl] [--hidden 8,8] [--rounds 300]

On the speed suite's MLP 784-1000-1000-10 a step takes ~17 ms, nearly all of it matmuls. With hidden
layers of 8 units the matmuls take microseconds, and what is left of a step is what a rule pays however
wide its network: Python, the autograd engine, one optimiser call per parameter group, the launch of
every small operation of its losses. That cost, added to a wide network's step, is what raises a rule's
overhead (time ratio / FLOP ratio) above its arithmetic. Every rule steps the same Fashion-MNIST batches
(batch 128) in interleaved rounds, the starting rule rotating, one thread; median milliseconds per step.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from gradient_layout import write_report  # the same report (this script's folder is on sys.path)

from localcredit.bench.speed_suite import images
from localcredit.experiment import RunSpec, build_rule


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--rules", default="bp,dfa,local-random,local-learned,predsim,lfnn-l,lfnn,dgl")
    parser.add_argument("--hidden", default="8,8")
    parser.add_argument("--rounds", type=int, default=300)
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.rules.split(",") if n.strip()]
    hidden = [int(h) for h in args.hidden.split(",")]
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    batch, warmup = 128, 30
    data = images("fashion-mnist", 50 * batch)
    rules = {}
    for name in names:
        rules[name] = build_rule(RunSpec(rule=name, data="fashion-mnist", arch="mlp", hidden=hidden,
                                         batch_size=batch, seed=0), data)
        rules[name].start_epoch(0, 1)
    times: dict[str, list[float]] = {name: [] for name in names}
    load_before = os.getloadavg()[0]
    for r in range(warmup + args.rounds):
        i = r % 50
        x, y = data.x_train[i * batch:(i + 1) * batch], data.y_train[i * batch:(i + 1) * batch]
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            start = time.perf_counter()
            rules[name].step(x, y)
            if r >= warmup:
                times[name].append(1000 * (time.perf_counter() - start))
    median = {name: statistics.median(t) for name, t in times.items()}
    print(f"| rule | ms per step, MLP {args.hidden} | more than BP (ms) |")
    print("|---|---|---|")
    for name in names:
        print(f"| `{name}` | {median[name]:.2f} | {median[name] - median.get('bp', 0.0):+.2f} |")
    if args.out:
        write_report(args.out, argv, load_before, {"threads": 1, "batch": batch, "hidden": hidden,
                                                   "rounds": args.rounds, "ms_per_step": median})
    return 0


if __name__ == "__main__":
    sys.exit(main())
