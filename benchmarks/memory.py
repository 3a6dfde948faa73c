"""Step memory of every rule against BP on the same network, and how it grows with depth (results/memory/).

    PYTHONPATH=. .venv/bin/python benchmarks/memory.py --out results/memory --steps 4 --warmup 2
    PYTHONPATH=. .venv/bin/python benchmarks/memory.py report --out results/memory   # files from memory.json
    PYTHONPATH=. .venv/bin/python benchmarks/memory.py --out results/memory --steps 4 --warmup 2 --rules lfnn
        # measures lfnn again on every network, its rows replaced in memory.json

Every network and batch size is measured in its own process (``benchmarks/memory.py one NET B``),
every rule there with a fresh rule and a meter of its own (the meter counts only what that rule's
steps create, so rules measured one after the other in a process cannot disturb each other's figure):
``--steps`` training steps on Fashion-MNIST, the largest step after the warm-up reported. The meter
counts every tensor made by training steps that is alive at one time during a step, whoever holds
it (autograd, a rule's own lists, a cache it keeps between steps), and leaves out weights, buffers
(fixed feedback matrices), gradients, optimiser state and the data set; so the figures are
activations, temporaries and carried state, counted alike for every rule. Memory figures do not depend on how busy the CPU is.

Networks (rules that invert their layers, gaitprop/tp/itp, train the invertible twin, and their
ratios are taken against BP on that twin):

* ``mlp-D``: D hidden layers of 1000 (twin: ``--arch invertible`` with the same hidden sizes);
* ``vgg``: vgg8b at width 0.125 (16,32,M,32,64,M,64,M,64,M, then a dense 1024), batch norm;
* ``resnet-D``: the CIFAR ResNet-D at width 0.25 (4, 8, 16 channels);
  twin of both conv nets: ``--arch invertible-conv`` (patches 7,4,1 and deeper: 7,4,1,...,1).

Table: mlp-2, mlp-4, vgg, resnet-20 at batch 128 and 512. Depth: mlp-1/2/4/8 and resnet-8/14/20
(invertible-conv with 3/5/7 layers) at batch 128. The conv nets are narrow so that the whole run
takes minutes on a shared 2-core CPU; the activations of every rule grow with the width, so the
ratios to BP should carry over to wider nets, but they were measured at these widths only.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers or in CI
import matplotlib.pyplot as plt  # noqa: E402

from localcredit.bench.report import write_csv  # noqa: E402

INVERTING = ("gaitprop", "itp", "tp")  # rules that train invertible networks only
BATCHES = (128, 512)
TABLE_NETWORKS = ("mlp-2", "mlp-4", "vgg", "resnet-20")
MLP_DEPTHS = (1, 2, 4, 8)
RESNET_DEPTHS = (8, 14, 20)
#: resnet depth -> the invertible conv net beside it in the depth plot (patches, one layer each)
INVERTIBLE_CONV = {8: [7, 4, 1], 14: [7, 4, 1, 1, 1], 20: [7, 4, 1, 1, 1, 1, 1]}


@dataclass(frozen=True)
class Network:
    """One network of the benchmark: its name, depth and the RunSpec options of it and its invertible twin."""

    name: str
    family: str  # "mlp" or "conv": the panel of the depth plot
    depth: int
    options: dict = field(hash=False)
    twin: dict = field(hash=False)

    def spec_options(self, rule: str) -> dict:
        return self.twin if rule in INVERTING else self.options

    def arch(self, rule: str) -> str:
        return self.spec_options(rule)["arch"]


def networks() -> dict[str, Network]:
    nets = {f"mlp-{d}": Network(f"mlp-{d}", "mlp", d, dict(arch="mlp", hidden=[1000] * d),
                                dict(arch="invertible", hidden=[1000] * d)) for d in MLP_DEPTHS}
    conv_twin = dict(arch="invertible-conv", patches=INVERTIBLE_CONV[20])
    nets["vgg"] = Network("vgg", "conv", 8, dict(arch="vgg", width=0.125), conv_twin)
    for d in RESNET_DEPTHS:
        nets[f"resnet-{d}"] = Network(f"resnet-{d}", "conv", d, dict(arch="resnet", depth=d, width=0.25),
                                      dict(arch="invertible-conv", patches=INVERTIBLE_CONV[d]))
    return nets


def rule_names() -> list[str]:
    from localcredit import rules

    return sorted(rules.available())


def plan() -> list[tuple[str, int]]:
    """(network, batch) of every child process: the table, then the depth sweeps at batch 128."""
    groups = [(net, batch) for net in TABLE_NETWORKS for batch in BATCHES]
    groups += [(net, 128) for net in [*(f"mlp-{d}" for d in MLP_DEPTHS), *(f"resnet-{d}" for d in RESNET_DEPTHS)]]
    return list(dict.fromkeys(groups))


# ----- one network (a child process) ------------------------------------------------------------
def measure_one(rule: str, network: str, batch: int, steps: int, warmup: int, data) -> dict:
    """One rule's step memory on one network (``bp@twin``: BP on the invertible twin)."""
    from localcredit.bench.memory import step_memory
    from localcredit.experiment import RunSpec, build_rule

    net = networks()[network]
    name = rule.removesuffix("@twin")
    options = net.twin if rule.endswith("@twin") else net.spec_options(name)
    built = build_rule(RunSpec(rule=name, data="fashion-mnist", seed=0, **options), data)
    batches = [(data.x_train[i * batch:(i + 1) * batch], data.y_train[i * batch:(i + 1) * batch])
               for i in range(steps)]
    return {"rule": rule, "network": network, "arch": options["arch"], "family": net.family, "depth": net.depth,
            "batch_size": batch, **step_memory(built, batches, warmup=warmup),
            "parameters": sum(p.numel() for p in built.parameters() if p.requires_grad)}


def measure_network(network: str, batch: int, steps: int, warmup: int, only: list[str] | None = None) -> None:
    """Every rule (or those in ``only``) on one network: one JSON line each on stdout (an error line for a
    rule that fails)."""
    import gc

    import torch

    from localcredit.data import load

    torch.set_num_threads(1)
    data = load("fashion-mnist")
    for rule in only or [*rule_names(), "bp@twin"]:
        try:
            row = measure_one(rule, network, batch, steps, warmup, data)
        except Exception as exc:  # noqa: BLE001 -- the report names it; the other rules still run
            row = {"rule": rule, "network": network, "batch_size": batch, "error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps(row), flush=True)
        gc.collect()


def run_child(network: str, batch: int, args) -> list[dict]:
    command = [sys.executable, __file__, "one", network, str(batch), "--steps", str(args.steps),
               "--warmup", str(args.warmup), *(["--rules", args.rules] if args.rules else [])]
    done = subprocess.run(command, capture_output=True, text=True)
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        rows.append({"rule": "?", "network": network, "batch_size": batch, "error": last})
    return rows


# ----- ratios, files, plot ---------------------------------------------------------------------
def add_ratios(rows: list[dict]) -> None:
    """step_memory_ratio_to_bp: against BP on the very network the rule trained (the twin for gaitprop/tp/itp)."""
    reference = {(r["network"], r["batch_size"], r["rule"] == "bp@twin"): r.get("step_memory_mb") for r in rows
                 if r["rule"] in ("bp", "bp@twin")}
    for row in rows:
        bp = reference.get((row["network"], row["batch_size"], row["rule"] in INVERTING or row["rule"] == "bp@twin"))
        row["step_memory_ratio_to_bp"] = row["step_memory_mb"] / bp if bp and "step_memory_mb" in row else None


def table(rows: list[dict]) -> list[str]:
    """Markdown: step memory / BP per rule (rows) and network x batch (columns); BP's own MB in its row."""
    columns = [(net, batch) for net in TABLE_NETWORKS for batch in BATCHES]
    found = {(r["rule"], r["network"], r["batch_size"]): r for r in rows}
    lines = ["| rule | " + " | ".join(f"{net} b{batch}" for net, batch in columns) + " |",
             "|---|" + "---|" * len(columns)]
    for rule in [*rule_names(), "bp@twin"]:
        cells = []
        for net, batch in columns:
            row = found.get((rule, net, batch), {})
            if rule in ("bp", "bp@twin") and "step_memory_mb" in row:
                cells.append(f"{row['step_memory_mb']:.1f} MB")
            elif row.get("step_memory_ratio_to_bp") is not None:
                cells.append(f"{row['step_memory_ratio_to_bp']:.2f}")
            else:
                cells.append(row.get("error", "-")[:40] if row else "-")
        lines.append(f"| `{rule}` | " + " | ".join(cells) + " |")
    return lines


def plot_depth(path: Path, rows: list[dict]) -> None:
    sweep = [r for r in rows if r["batch_size"] == 128 and "step_memory_mb" in r
             and (r["network"].startswith("mlp-") or r["network"].startswith("resnet-"))]
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    cmap = plt.get_cmap("tab20")
    for ax, family, title in ((axes[0], "mlp", "MLP, hidden 1000 (gaitprop/tp/itp: invertible twin)"),
                              (axes[1], "conv", "ResNet width 0.25 (gaitprop/tp/itp: invertible-conv, 3/5/7 layers)")):
        for i, rule in enumerate([*rule_names(), "bp@twin"]):
            points = sorted((r["depth"], r["step_memory_mb"]) for r in sweep if r["rule"] == rule and r["family"] == family)
            if points:
                style = "--" if rule in INVERTING or rule == "bp@twin" else "-"
                ax.plot(*zip(*points), style, marker="osD^v<>pXh*"[i % 11], color=cmap(i % 20), label=rule)
        ax.set(title=title, xlabel="depth (hidden layers / ResNet depth)", ylabel="peak step memory (MB), batch 128",
               yscale="log")
        ax.grid(alpha=0.3, which="both")
    axes[1].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def readme(command: str, rows: list[dict], steps: int, warmup: int, seconds: float | None,
           again: Sequence[str] = ()) -> str:
    took = f" (took {seconds / 60:.0f} min)" if seconds else ""
    return "\n".join([
        "# Step memory of every rule against BP", "",
        f"Command{took}: `{command}`", "", *(f"{line}\n" for line in again),
        (__doc__ or "").split("\n\n", 2)[2].strip(), "",
        f"Each measurement: {steps} steps, the first {warmup} warm up; the largest step after them is reported.", "",
        "## Step memory / BP on the same network (BP's own figure in MB in its row)", "",
        "`bp@twin`: BP on the invertible twin (`invertible` for the MLPs, `invertible-conv` with 7 layers for vgg "
        "and resnet-20), the reference of gaitprop, tp and itp. The invertible twins are other networks than the "
        "mlp, vgg and resnet: compare gaitprop, tp and itp with `bp@twin`, never with `bp`.", "",
        *table(rows), "",
        "## Peak step memory vs depth (batch 128)", "", "![step memory vs depth](depth.png)", "",
        "Rules whose figures are equal draw over each other (bp, fa and nan-bp; local-random, local-learned "
        "and lfnn-l).", "",
        "Every figure, with the gradients and optimiser state (`step_gradient_mb`, left out of the step memory) "
        "and what the rule carries between steps (`step_kept_mb`, counted in it): `memory.csv`, `memory.json`.", ""])


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("what", nargs="?", default="all", choices=("all", "one", "report"))
    parser.add_argument("child", nargs="*", help="one: NETWORK BATCH")
    parser.add_argument("--out", type=Path, default=Path("results/memory"))
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rules", help="comma-separated rules to measure again, their rows replaced in the "
                                        "existing OUT/memory.json (ratios against its BP rows)")
    args = parser.parse_args()
    only = args.rules.split(",") if args.rules else None
    if args.what == "one":
        network, batch = args.child
        measure_network(network, int(batch), args.steps, args.warmup, only)
        return
    if args.what == "report":
        saved = json.loads((args.out / "memory.json").read_text())
    elif only:
        saved = remeasure(args, only)
    else:
        start, rows = time.time(), measure_plan(args, "done")
        add_ratios(rows)
        saved = {"command": this_command(), "seconds": time.time() - start, "steps": args.steps,
                 "warmup": args.warmup, "rows": rows}
        save(args.out, saved)
    write_files(args.out, saved)


def this_command() -> str:
    return "PYTHONPATH=. .venv/bin/python benchmarks/memory.py " + " ".join(sys.argv[1:])


def measure_plan(args, done: str) -> list[dict]:
    """Every (network, batch) of the plan in its own child process; the rows they print."""
    rows = []
    for network, batch in plan():
        rows += run_child(network, batch, args)
        print(f"{network} batch {batch}: {done}", file=sys.stderr, flush=True)
    return rows


def save(out: Path, saved: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "memory.json").write_text(json.dumps(saved, indent=1) + "\n")


def remeasure(args, only: list[str]) -> dict:
    """Measure ``only`` again on every network and batch of the plan, replacing their rows in memory.json."""
    saved = json.loads((args.out / "memory.json").read_text())
    if (args.steps, args.warmup) != (saved["steps"], saved["warmup"]):
        raise SystemExit(f"--steps/--warmup must match memory.json's ({saved['steps']}/{saved['warmup']})")
    start, fresh = time.time(), measure_plan(args, f"{', '.join(only)} done")
    rows = [r for r in saved["rows"] if r["rule"] not in only] + fresh
    add_ratios(rows)
    saved["remeasured"] = [*saved.get("remeasured", []), {"rules": only, "command": this_command(),
                                                           "seconds": time.time() - start}]
    saved["rows"] = rows
    save(args.out, saved)
    return saved


def write_files(out: Path, saved: dict) -> None:
    """memory.csv, depth.png and README.md from what memory.json holds."""
    rows = saved["rows"]
    write_csv(out / "memory.csv", rows)
    plot_depth(out / "depth.png", rows)
    # memory.json files written before the command was kept in them came from the documented command.
    command = saved.get("command", f"PYTHONPATH=. .venv/bin/python benchmarks/memory.py --out {out} "
                                   f"--steps {saved['steps']} --warmup {saved['warmup']}")
    again = [f"Measured again afterwards ({', '.join(r['rules'])}; took {r['seconds'] / 60:.0f} min): `{r['command']}`"
             for r in saved.get("remeasured", [])]
    (out / "README.md").write_text(readme(command, rows, saved["steps"], saved["warmup"], saved.get("seconds"), again))


if __name__ == "__main__":
    main()
