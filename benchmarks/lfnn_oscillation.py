"""Why does lfnn's test accuracy swing more than BP's from epoch to epoch? (issue 25)

Every variant is the setting a new user met (``train --rule R --data fashion-mnist --hidden 1000
--limit-train 10000``, full 10k test set), run for ``--epochs`` epochs over ``--seeds`` seeds, one
factor changed at a time. Per variant it reports the per-epoch test accuracy of each seed, how many
epoch-to-epoch transitions fall by more than 1 point, and the mean absolute epoch-to-epoch change.

    python benchmarks/lfnn_oscillation.py --out results/lfnn-oscillation            # every variant
    python benchmarks/lfnn_oscillation.py --variants bp,lfnn --seeds 0,1 --out /tmp/osc

Writes OUT/oscillation.json (every run) and OUT/README.md (the table), resuming from the json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import replace
from pathlib import Path

import torch

import localcredit as lc
from localcredit.experiment import RunSpec, fit, prepare
from localcredit.training.config import epoch_order

#: name -> (rule, rule options, extra RunSpec fields); one factor changed from ``lfnn`` at a time
VARIANTS: dict[str, tuple[str, list[str], dict]] = {
    "bp": ("bp", [], {}),
    "lfnn": ("lfnn", [], {}),
    "lfnn-l": ("lfnn-l", [], {}),
    "lfnn lr 5e-4": ("lfnn", [], {"lr": 5e-4}),
    "bp lr 5e-4": ("bp", [], {"lr": 5e-4}),
    "lfnn global_weight=0.5": ("lfnn", ["global_weight=0.5"], {}),
    "lfnn global_weight=2": ("lfnn", ["global_weight=2"], {}),
    "lfnn follower_weight=0": ("lfnn", ["follower_weight=0"], {}),
    "lfnn delta=1 (no followers: no churn)": ("lfnn", ["delta=1"], {}),
    "lfnn workers=1 (one worker = a local CE head)": ("lfnn", ["workers=1"], {}),
    "lfnn grouped head": ("lfnn", ["worker_head=grouped"], {}),
    "lfnn cosine schedule": ("lfnn", [], {"lr_schedule": "cosine"}),
    "bp cosine schedule": ("bp", [], {"lr_schedule": "cosine"}),
    # Weights and data order both follow --seed; these pull them apart (``init_seed`` / ``order_seed``).
    "lfnn: weights of seed 0; data order of the seed": ("lfnn", [], {"init_seed": 0}),
    "lfnn: data order of seed 0; weights of the seed": ("lfnn", [], {"order_seed": 0}),
    "bp: weights of seed 0; data order of the seed": ("bp", [], {"init_seed": 0}),
    "bp: data order of seed 0; weights of the seed": ("bp", [], {"order_seed": 0}),
}


def specs(name: str, seed: int, epochs: int, limit: int) -> tuple[RunSpec, RunSpec]:
    """The variant's run as (the spec its weights are built from, the spec it is trained with)."""
    rule, options, extra = VARIANTS[name]
    extra = dict(extra)
    init_seed, order_seed = extra.pop("init_seed", seed), extra.pop("order_seed", seed)
    spec = RunSpec(rule=rule, data="fashion-mnist", hidden=[1000], epochs=epochs, limit_train=limit, seed=seed,
                   options=options, **extra)
    return replace(spec, seed=init_seed), replace(spec, seed=order_seed)


def run(name: str, seed: int, epochs: int, limit: int) -> list[float]:
    init, train = specs(name, seed, epochs, limit)
    result = fit(train, progress=False, device="cpu", prepared=prepare(init))
    return [round(a, 4) for a in result["test_accuracy_per_epoch"]]


def within_epoch_curve(name: str, seed: int, epochs: int, limit: int, every: int) -> list[float]:
    """Test accuracy every ``every`` steps of each epoch and at its end (the Trainer's batch order, no schedule)."""
    init, train = specs(name, seed, epochs, limit)
    data, rule = prepare(init)
    x, y = data.x_train[:limit], data.y_train[:limit]
    curve = []
    for epoch in range(epochs):
        rule.start_epoch(epoch, epochs)
        batches = epoch_order(limit, train.seed, epoch).split(train.batch_size)
        for step, batch in enumerate(batches, start=1):
            rule.step(x[batch], y[batch])
            if step % every == 0 or step == len(batches):  # the epoch's last is the Trainer's evaluation
                correct = sum(int((rule.predict(xs) == ys).sum()) for xs, ys in
                              zip(data.x_test.split(2000), data.y_test.split(2000)))
                curve.append(round(correct / len(data.y_test), 4))
    return curve


def swings(curves: list[list[float]]) -> dict:
    steps = [b - a for curve in curves for a, b in zip(curve, curve[1:])]
    return {
        "transitions": len(steps),
        "drops_over_1_point": sum(s < -0.01 for s in steps),
        "seeds_with_a_drop_over_1_point": sum(any(b - a < -0.01 for a, b in zip(c, c[1:])) for c in curves),
        "mean_abs_change": round(statistics.fmean(abs(s) for s in steps), 4),
        "largest_drop": round(-min(steps), 4),
        "final_mean": round(statistics.fmean(c[-1] for c in curves), 4),
        "best_mean": round(statistics.fmean(max(c) for c in curves), 4),
    }


#: variants whose test accuracy is also taken every few steps (``--every``), not only at epoch ends
WITHIN = ["bp", "lfnn", "lfnn-l", "lfnn follower_weight=0", "lfnn delta=1 (no followers: no churn)"]


def within_table(curves: dict, seeds: list[int], every: int, steps_per_epoch: int) -> str:
    lines = [f"| variant | std of test accuracy over the last epoch's evaluations (every {every} steps), mean over "
             f"seeds | mean abs change between consecutive evaluations | mean abs change, epoch ends only |",
             "|---|---|---|---|"]
    per_epoch = -(-steps_per_epoch // every)
    for name in WITHIN:
        got = [curves[name][str(s)] for s in seeds if str(s) in curves.get(name, {})]
        if not got:
            continue
        last = [statistics.pstdev(c[-per_epoch:]) for c in got]
        steps = [abs(b - a) for c in got for a, b in zip(c, c[1:])]
        lines.append(f"| {name} | {statistics.fmean(last):.4f} | {statistics.fmean(steps):.4f} | "
                     f"{swings(runs_of(got, per_epoch))['mean_abs_change']:.4f} |")
    return "\n".join(lines)


def runs_of(curves: list[list[float]], per_epoch: int) -> list[list[float]]:
    """The evaluations that fall on epoch ends (where the Trainer evaluates)."""
    return [c[per_epoch - 1::per_epoch] for c in curves]


def table(runs: dict, seeds: list[int]) -> str:
    lines = ["| variant | seeds with a drop > 1 pt | drops > 1 pt / transitions | mean abs change | largest drop "
             "| final acc (mean) | best-epoch acc (mean) |", "|---|---|---|---|---|---|---|"]
    for name in VARIANTS:
        curves = [runs[name][str(s)] for s in seeds if str(s) in runs.get(name, {})]
        if not curves:
            continue
        s = swings(curves)
        lines.append(f"| {name} | {s['seeds_with_a_drop_over_1_point']} / {len(curves)} | "
                     f"{s['drops_over_1_point']} / {s['transitions']} | {s['mean_abs_change']:.4f} | "
                     f"{s['largest_drop']:.3f} | {s['final_mean']:.4f} | {s['best_mean']:.4f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--limit-train", type=int, default=10_000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--every", type=int, default=0,
                        help="also take test accuracy every N steps for the WITHIN variants (0: do not)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    names = args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; known: {list(VARIANTS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    store = out / "oscillation.json"
    runs = json.loads(store.read_text()) if store.exists() else {}
    for name in names:
        for seed in seeds:
            if str(seed) in runs.get(name, {}):
                continue
            curve = run(name, seed, args.epochs, args.limit_train)
            runs.setdefault(name, {})[str(seed)] = curve
            store.write_text(json.dumps(runs, indent=1))
            print(f"{name:48s} seed {seed}: {curve}", flush=True)
    within = ""
    if args.every:
        every_store = out / f"within_every_{args.every}.json"
        curves = json.loads(every_store.read_text()) if every_store.exists() else {}
        for name in WITHIN:
            for seed in seeds:
                if str(seed) not in curves.get(name, {}):
                    curves.setdefault(name, {})[str(seed)] = within_epoch_curve(
                        name, seed, args.epochs, args.limit_train, args.every)
                    every_store.write_text(json.dumps(curves))
                    print(f"{name:48s} seed {seed}: every {args.every} steps done", flush=True)
        steps_per_epoch = -(-args.limit_train // 128)
        within = "\n\n" + within_table(curves, seeds, args.every, steps_per_epoch)
    command = "python benchmarks/lfnn_oscillation.py " + " ".join(sys.argv[1:])
    (out / "README.md").write_text(
        f"# lfnn's epoch-to-epoch swings, one factor at a time\n\n`{command}` (localcredit {lc.__version__}, "
        f"{args.threads} threads): Fashion-MNIST, hidden 1000, {args.limit_train} training images, full test set, "
        f"{args.epochs} epochs, seeds {args.seeds}.\n\n{table(runs, seeds)}{within}\n")
    print(table(runs, seeds) + within)


if __name__ == "__main__":
    main()
