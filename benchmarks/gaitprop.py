"""GAIT-prop benchmark: step time against BP on the same invertible network, and alignment over training.

    .venv/bin/python benchmarks/gaitprop.py speed --out results/gaitprop
    .venv/bin/python benchmarks/gaitprop.py alignment --epochs 1 --with-unregularised --out results/gaitprop
    .venv/bin/python benchmarks/gaitprop.py learn --threads 1 bp: gaitprop: gaitprop:3e-4:ortho=1 tp: itp:

``speed`` alternates one BP step and one step of each GAIT-prop variant on the same batches in one
process (the CPU is shared, so only ratios taken this way mean anything) and reports medians.
``learn`` trains each RULE:LR:OPTION:... spec (empty LR: the rule's default) for --epochs on the
invertible network, like ``localcredit train --arch invertible``, and appends one JSON line each
to learning.jsonl. ``alignment`` trains gaitprop and records the per-layer cosine with the BP gradient on a fixed
batch every ``--every`` steps, then plots it.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import time
from pathlib import Path

import torch

from localcredit.align import alignment
from localcredit.data import load
from localcredit.experiment import RunSpec, build_rule
from localcredit.train import epoch_order

BLOCK = 4
VARIANTS = {  # name -> (rule, --set options)
    "bp": ("bp", []),
    "gaitprop (default, ortho_every=4)": ("gaitprop", []),
    "gaitprop ortho_every=1": ("gaitprop", ["ortho_every=1"]),
    "gaitprop ortho=0": ("gaitprop", ["ortho=0"]),
}


def speed(args, data) -> None:
    rules = {name: build_rule(RunSpec(rule=rule, data=args.data, arch="invertible", options=options), data)
             for name, (rule, options) in VARIANTS.items()}
    times: dict[str, list[float]] = {name: [] for name in rules}
    order = epoch_order(len(data.x_train), 0, 0)
    for rep in range(args.reps):
        index = order[rep * args.batch_size:(rep + 1) * args.batch_size]
        x, y = data.x_train[index], data.y_train[index]
        for name, rule in rules.items():
            start = time.perf_counter()
            rule.step(x, y)
            times[name].append(time.perf_counter() - start)
    steps_per_epoch = -(-len(data.x_train) // args.batch_size)
    # Medians over blocks of BLOCK consecutive steps: each block holds exactly one regulariser step
    # of ortho_every=4, so its amortised cost is counted (a per-step median would skip it).
    warm = BLOCK  # the first block builds Adam's state and warms the allocator

    def per_step(samples: list[float]) -> float:
        blocks = [sum(samples[i:i + BLOCK]) / BLOCK for i in range(warm, len(samples) - BLOCK + 1, BLOCK)]
        return statistics.median(blocks)

    bp = per_step(times["bp"])
    rows = []
    for name, samples in times.items():
        median = per_step(samples)
        rows.append({"variant": name, "median_step_ms_over_blocks_of_4": round(1000 * median, 2),
                     "seconds_per_epoch_estimate": round(median * steps_per_epoch, 1),
                     "ratio_to_bp": round(median / bp, 3)})
        print(rows[-1])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "speed.json").write_text(json.dumps({"reps": args.reps, "batch_size": args.batch_size,
                                                "threads": torch.get_num_threads(), "rows": rows}, indent=2))


def alignment_over_training(args, data) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fixed = epoch_order(len(data.x_train), 123, 0)[:256]
    x_fixed, y_fixed = data.x_train[fixed], data.y_train[fixed]
    records = []
    curves = {}
    for label, options in (("gaitprop (ortho=0.1)", []), ("gaitprop ortho=0", ["ortho=0"])):
        if label.endswith("ortho=0") and not args.with_unregularised:
            continue
        rule = build_rule(RunSpec(rule="gaitprop", data=args.data, options=options), data)
        steps, cosines = [], []
        step = 0
        for epoch in range(args.epochs):
            order = epoch_order(len(data.x_train), 0, epoch)
            for start in range(0, len(order), args.batch_size):
                if args.max_steps is not None and step > args.max_steps:
                    break
                if step % args.every == 0:
                    steps.append(step)
                    cosines.append(alignment(rule, x_fixed, y_fixed))
                    records.append({"variant": label, "step": step,
                                    **{f"layer{i + 1}": round(c, 6) for i, c in enumerate(cosines[-1])}})
                    print(records[-1], flush=True)
                index = order[start:start + args.batch_size]
                rule.step(data.x_train[index], data.y_train[index])
                step += 1
        curves[label] = (steps, cosines)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "alignment.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (label, (steps, cosines)), style in zip(curves.items(), ("-", "--")):
        for layer in range(len(cosines[0])):
            ax.plot(steps, [c[layer] for c in cosines], style, color=f"C{layer}",
                    label=f"{label}, layer {layer + 1}")
    ax.set_xlabel("training step (batch 128)")
    ax.set_ylabel("cosine with the BP gradient")
    ax.set_title(f"GAIT-prop per-layer alignment with BP during training ({args.data})")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "alignment.png", dpi=120)


def learn(args, data) -> None:
    from localcredit.train import TrainConfig, Trainer

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for spec in args.specs:
        rule_name, lr, *options = spec.split(":")
        rule = build_rule(RunSpec(rule=rule_name, data=args.data, arch="invertible", options=options,
                                  lr=float(lr) if lr else None), data)
        result = Trainer(rule, data, TrainConfig(epochs=args.epochs, batch_size=args.batch_size,
                                                 progress=False)).fit()
        cosines = alignment(rule, data.x_train[:256], data.y_train[:256]) if rule_name != "bp" else None
        line = {"spec": spec, "epochs": args.epochs, "test_accuracy_per_epoch": result["test_accuracy_per_epoch"],
                "seconds_per_epoch": result["seconds_per_epoch"], "final_alignment": cosines,
                "rule_statistics": result.get("rule_statistics")}
        print(json.dumps(line), flush=True)
        with open(out / "learning.jsonl", "a") as f:
            f.write(json.dumps(line) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["speed", "alignment", "learn"])
    parser.add_argument("specs", nargs="*", help="learn: RULE:LR:OPTION=VALUE:... specs")
    parser.add_argument("--data", default="fashion-mnist")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--reps", type=int, default=40, help="speed: steps per variant (multiple of 4)")
    parser.add_argument("--epochs", type=int, default=None, help="default: 1 (alignment), 3 (learn)")
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--max-steps", type=int, default=None, help="alignment: stop after this many steps")
    parser.add_argument("--with-unregularised", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="results/gaitprop")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = load(args.data)
    torch.manual_seed(0)
    if args.epochs is None:
        args.epochs = 3 if args.what == "learn" else 1
    {"speed": speed, "alignment": alignment_over_training, "learn": learn}[args.what](args, data)


if __name__ == "__main__":
    main()
