"""GAIT-prop benchmark: step time against BP on the same invertible network, and alignment over training.

    .venv/bin/python benchmarks/gaitprop.py speed --threads 1 --hidden 1000,1000 --out results/gaitprop
    .venv/bin/python benchmarks/gaitprop.py speed --threads 1 --arch invertible-conv --out results/gaitprop
    .venv/bin/python benchmarks/gaitprop.py deep-alignment --threads 1 --out results/gaitprop
    .venv/bin/python benchmarks/gaitprop.py alignment --epochs 1 --with-unregularised --out results/gaitprop
    .venv/bin/python benchmarks/gaitprop.py learn --threads 1 bp: gaitprop: gaitprop:3e-4:ortho=1 tp: itp:
    .venv/bin/python benchmarks/gaitprop.py stale-solves --threads 1 --arch invertible-conv --out results/gaitprop

``speed`` alternates one BP step and one step of each GAIT-prop variant on the same batches in one
process (the CPU is shared, so only ratios taken this way mean anything) and reports medians and means
(the mean counts the steps that refactorise). ``learn`` trains each RULE:LR:OPTION:... spec (empty LR:
the rule's default) for --epochs on the invertible network, like ``localcredit train --arch invertible``,
and appends one JSON line each to learning.jsonl. ``alignment`` trains gaitprop and records the
per-layer cosine with the BP gradient on a fixed batch every ``--every`` steps, then plots it;
``deep-alignment`` does the same for a 7-layer invertible MLP and an 8-layer invertible conv net.
``stale-solves`` trains gaitprop with each ``solve_tolerance`` and records, every ``--every`` steps, the
per-layer cosine between the update its (older) factors give and the update fresh factors give, and
how many LU factorisations a step costs.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from localcredit.data import load
from localcredit.experiment import RunSpec, build_rule
from localcredit.nets.architectures import parse_hidden, parse_patches
from localcredit.rules.alignment import alignment
from localcredit.training.config import epoch_order

VARIANTS = {  # name -> (rule, --set options)
    "bp": ("bp", []),
    "gaitprop (defaults)": ("gaitprop", []),
    "gaitprop factorise_every=1 (a fresh LU every step)": ("gaitprop", ["factorise_every=1"]),
    "gaitprop ortho=0 (no regulariser)": ("gaitprop", ["ortho=0"]),
}
WARM_STEPS = 8  # Adam's state, the allocator, and the first factorisations


def network(args) -> dict:
    return {"arch": args.arch, "hidden": args.hidden, "patches": args.patches}


def speed(args, data) -> None:
    rules = {name: build_rule(RunSpec(rule=rule, data=args.data, options=options, **network(args)), data)
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
    timed = {name: samples[WARM_STEPS:] for name, samples in times.items()}
    bp_median, bp_mean = statistics.median(timed["bp"]), statistics.fmean(timed["bp"])
    rows = []
    for name, samples in timed.items():
        median, mean = statistics.median(samples), statistics.fmean(samples)
        rows.append({"variant": name, "median_step_ms": round(1000 * median, 2), "mean_step_ms": round(1000 * mean, 2),
                     "median_ratio_to_bp": round(median / bp_median, 3), "mean_ratio_to_bp": round(mean / bp_mean, 3)})
        print(rows[-1])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    arch = build_rule(RunSpec(rule="bp", data=args.data, **network(args)), data).net
    name = f"speed-{arch.arch}-{'-'.join(map(str, arch.hidden or arch.description.get('patches', [])))}.json"
    (out / name).write_text(json.dumps({"reps": args.reps, "warm_steps": WARM_STEPS, "batch_size": args.batch_size,
                                        "threads": torch.get_num_threads(), "network": network(args),
                                        "load_average_1min_after": os.getloadavg()[0], "rows": rows}, indent=2))


def aligned_steps(rule, data, args, epochs: int) -> Iterator[tuple[int, list[float]]]:
    """Train ``rule`` for ``epochs`` (at most ``--max-steps`` steps); every ``--every`` steps, before
    the step, yield (step, its per-layer cosine with BP on 256 fixed training images)."""
    fixed = epoch_order(len(data.x_train), 123, 0)[:256]
    x_fixed, y_fixed = data.x_train[fixed], data.y_train[fixed]
    step = 0
    for epoch in range(epochs):
        order = epoch_order(len(data.x_train), 0, epoch)
        for start in range(0, len(order), args.batch_size):
            if args.max_steps is not None and step > args.max_steps:
                return
            if step % args.every == 0:
                yield step, alignment(rule, x_fixed, y_fixed)
            index = order[start:start + args.batch_size]
            rule.step(data.x_train[index], data.y_train[index])
            step += 1


def alignment_over_training(args, data) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = []
    curves = {}
    for label, options in (("gaitprop (ortho=0.1)", []), ("gaitprop ortho=0", ["ortho=0"])):
        if label.endswith("ortho=0") and not args.with_unregularised:
            continue
        rule = build_rule(RunSpec(rule="gaitprop", data=args.data, options=options), data)
        steps, cosines = [], []
        for step, layer_cosines in aligned_steps(rule, data, args, args.epochs):
            steps.append(step)
            cosines.append(layer_cosines)
            records.append({"variant": label, "step": step,
                            **{f"layer{i + 1}": round(c, 6) for i, c in enumerate(layer_cosines)}})
            print(records[-1], flush=True)
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


DEEP_NETWORKS = {  # label -> network options: 7 and 8 weight layers, 6 and 7 of them inverted
    "invertible MLP 784-6x1024 (7 layers)": dict(arch="invertible", hidden=[1024] * 6),
    "invertible-conv 7,4,1,1,1,1,1 (8 layers)": dict(arch="invertible-conv", patches=[7, 4, 1, 1, 1, 1, 1]),
}


def deep_alignment(args, data) -> None:
    """gaitprop with its defaults on each deep network: per-layer cosine with BP every --every steps."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records, curves = [], {}
    for label, net in DEEP_NETWORKS.items():
        if args.only and args.only not in label:
            continue
        rule = build_rule(RunSpec(rule="gaitprop", data=args.data, options=args.set, lr=args.lr, **net), data)
        steps, cosines = [], []
        for step, layer_cosines in aligned_steps(rule, data, args, epochs=1):
            steps.append(step)
            cosines.append(layer_cosines)
            records.append({"network": label, "step": step,
                            **{f"layer{i + 1}": round(c, 6) for i, c in enumerate(layer_cosines)},
                            "min_cosine": round(min(layer_cosines), 6),
                            "max_orthogonality_error": round(max(rule.orthogonality_errors()), 6)})
            print(records[-1], flush=True)
        curves[label] = (steps, cosines)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    fieldnames = list(dict.fromkeys(key for record in records for key in record))
    with open(out / "alignment_deep.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fieldnames)
        writer.writeheader()
        writer.writerows(records)
    summary = {label: {"layer1_min": min(c[0] for c in cosines[1:]), "layer1_mean": statistics.fmean(c[0] for c in cosines[1:]),
                       "others_min": min(min(c[1:]) for c in cosines[1:]),
                       "others_mean": statistics.fmean(statistics.fmean(c[1:]) for c in cosines[1:])}
               for label, (steps, cosines) in curves.items()}
    print(json.dumps({"after step 0": summary}, indent=1))
    fig, axes = plt.subplots(1, len(curves), figsize=(6 * len(curves), 4.5), sharey=True, squeeze=False)
    axes = axes[0]
    for ax, (label, (steps, cosines)) in zip(axes, curves.items()):
        for layer in range(len(cosines[0])):
            ax.plot(steps, [c[layer] for c in cosines], color=plt.cm.viridis(layer / len(cosines[0])),
                    label=f"layer {layer + 1}")
        ax.set_title(label, fontsize=9)
        ax.set_xlabel(f"training step (batch {args.batch_size}, Adam, gaitprop defaults, float32)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("cosine with the BP gradient (256 fixed images)")
    fig.suptitle(f"GAIT-prop per-layer alignment with BP during training ({args.data})")
    fig.tight_layout()
    fig.savefig(out / "alignment_deep.png", dpi=110)


STALE_SOLVE_VARIANTS = {  # label -> --set options of gaitprop
    "fresh LU every step": ["factorise_every=1"],
    "solve_tolerance=1e-2": ["solve_tolerance=1e-2"],
    "solve_tolerance=2e-2 (default)": ["solve_tolerance=2e-2"],
    "solve_tolerance=5e-2": ["solve_tolerance=5e-2"],
}


def update_with_older_factors(rule, x, y) -> list[torch.Tensor]:
    """The credit assignment a training step applies (its factors, no regulariser), on a copy of the rule."""
    import copy

    trial = copy.deepcopy(rule)
    trial.config.ortho = 0.0
    trial.zero_grad()
    trial.assign_credit(x, y)
    return [torch.cat([p.grad.reshape(-1) for p in layer.parameters()]) for layer in trial.net.layers]


def stale_solves(args, data) -> None:
    from localcredit.nets import invertible

    factorisations = []
    count = invertible.Factorisation.__init__

    def counting(self, *a, **k):
        factorisations.append(1)
        count(self, *a, **k)

    invertible.Factorisation.__init__ = counting
    rows = []
    for label, options in STALE_SOLVE_VARIANTS.items():
        rule = build_rule(RunSpec(rule="gaitprop", data=args.data, options=options, **network(args)), data)
        order = epoch_order(len(data.x_train), 0, 0)
        cosines, counted, steps = [], 0, 0
        for step, start in enumerate(range(0, len(order), args.batch_size)):
            if args.max_steps is not None and step >= args.max_steps:
                break
            index = order[start:start + args.batch_size]
            x, y = data.x_train[index], data.y_train[index]
            if step % args.every == args.every - 1:
                fresh = rule.update_directions(x, y)
                used = update_with_older_factors(rule, x, y)
                cosines.append([torch.nn.functional.cosine_similarity(a.detach().double(), b.double(), dim=0).item()
                                for a, b in zip(fresh, used)])
            factorisations.clear()
            rule.step(x, y)
            counted, steps = counted + len(factorisations), steps + 1
        rows.append({"variant": label, "steps": steps, "lu_per_step": round(counted / steps, 3),
                     "min_cosine_per_layer": [round(min(c[l] for c in cosines), 6) for l in range(len(cosines[0]))],
                     "mean_cosine_per_layer": [round(statistics.fmean(c[l] for c in cosines), 6)
                                               for l in range(len(cosines[0]))],
                     "probes": len(cosines)})
        print(rows[-1], flush=True)
    invertible.Factorisation.__init__ = count
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    arch = build_rule(RunSpec(rule="bp", data=args.data, **network(args)), data).net
    name = f"stale-solves-{arch.arch}-{'-'.join(map(str, arch.hidden or arch.description.get('patches', [])))}.json"
    (out / name).write_text(json.dumps({"batch_size": args.batch_size, "network": network(args),
                                        "every": args.every, "rows": rows}, indent=2))


def learn(args, data) -> None:
    from localcredit.training.config import TrainConfig
    from localcredit.training.trainer import Trainer

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
    parser.add_argument("what", choices=["speed", "alignment", "deep-alignment", "learn", "stale-solves"])
    parser.add_argument("specs", nargs="*", help="learn: RULE:LR:OPTION=VALUE:... specs")
    parser.add_argument("--data", default="fashion-mnist")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--reps", type=int, default=48, help="speed: steps per variant (the first 8 warm up)")
    parser.add_argument("--arch", default="invertible", help="speed: invertible or invertible-conv")
    parser.add_argument("--hidden", type=parse_hidden, default=None, help="speed: --hidden of the network")
    parser.add_argument("--patches", type=parse_patches, default=None, help="speed: --patches of invertible-conv")
    parser.add_argument("--epochs", type=int, default=None, help="default: 1 (alignment), 3 (learn)")
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--max-steps", type=int, default=None, help="alignment: stop after this many steps")
    parser.add_argument("--with-unregularised", action="store_true")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="deep-alignment: gaitprop option")
    parser.add_argument("--lr", type=float, default=None, help="deep-alignment: Adam learning rate (default: the rule's)")
    parser.add_argument("--only", default=None, help="deep-alignment: only the networks whose label contains this")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="results/gaitprop")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = load(args.data)
    torch.manual_seed(0)
    if args.epochs is None:
        args.epochs = 3 if args.what == "learn" else 1
    {"speed": speed, "alignment": alignment_over_training, "deep-alignment": deep_alignment,
     "learn": learn, "stale-solves": stale_solves}[args.what](args, data)


if __name__ == "__main__":
    main()
