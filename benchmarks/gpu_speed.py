"""The speed suite on a GPU with no host synchronisation inside a step, and a short time-to-accuracy case.

    PYTHONPATH=. .venv/bin/python benchmarks/gpu_speed.py --device cuda --out results/gpu/speed
    PYTHONPATH=. .venv/bin/python benchmarks/gpu_speed.py --device cpu --tiny --out /tmp/gpu-speed   # CI: same code

1. ``bench --suite speed`` (``localcredit/bench/speed_suite.py``: every rule on the MLP, the conv
   suite's VGG and ResNet-20, steps interleaved, time / FLOP / memory ratios to BP) on ``--device``,
   every interleaved step inside ``torch.cuda.set_sync_debug_mode("error")`` (``benchmarks/gpu.py``'s
   check): a step that makes the host wait for the device (``.item()``, ``float(loss)``, ``nonzero()``,
   a copy to the CPU) fails, and its rule's row names where. A rule whose step waits by design
   (``Rule.syncs_per_step``: gaitprop, tp, itp decide on values they computed) runs under mode "warn"
   and its waits per step are counted instead. Into ``OUT/speed/``.
2. A short time-to-accuracy case: each of ``--tta-rules`` (default bp, local-learned, dgl, predsim)
   trained by ``lc.fit`` on the conv suite's VGG, one process, ``--tta-epochs`` epochs of the first
   ``--tta-train`` Fashion-MNIST images, on ``--device``: test accuracy after every epoch against the
   wall-clock seconds so far. The Trainer reads its figures every few steps (a wait by design), so these
   steps are not sync-checked. Into ``OUT/time_to_accuracy.json``.

``OUT/README.md`` gathers both with the command, date, device and load. ``--device cpu`` runs the very
same code (the sync check exists only on CUDA); ``--tiny`` shrinks every network, batch and run so that
the test suite can run it. Exit status: 0 when every rule ran without a host synchronisation it does not
declare (or other failure), 1 otherwise, 2 for bad input.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import sys
from collections import defaultdict
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from localcredit import rules
from localcredit.bench.plan import CONV, Suite
from localcredit.bench.speed_suite import QUICK, SPEED, SpeedOptions, machine, run_speed
from localcredit.data import Dataset, load
from localcredit.errors import UserError
from localcredit.experiment import RunSpec, build_rule, fit, resolve_device
from localcredit.nets.architectures import NetSpec


def _gpu_check():
    """benchmarks/gpu.py, loaded from beside this file: its sync check is the one used here."""
    spec = importlib.util.spec_from_file_location("gpu_check", Path(__file__).with_name("gpu.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TWIN = {"invertible-conv": NetSpec(arch="invertible-conv", patches=[7, 4])}
#: --tiny: the suite's three networks, shrunk (the code path is the same)
TINY_NETWORKS = {
    "mlp": Suite("mlp", "tiny MLP 16-16", network=NetSpec(arch="mlp", hidden=[16, 16])),
    "vgg": Suite("vgg", "tiny VGG 4,M + 8", network=NetSpec(arch="vgg", channels="4,M", hidden=[8]),
                 fallback_archs=("invertible-conv",), networks=TWIN),
    "resnet": Suite("resnet", "ResNet-8 at width 1/4", network=NetSpec(arch="resnet", depth=8, width=0.25),
                    fallback_archs=("invertible-conv",), networks=TWIN),
}
TTA_RULES = "bp,local-learned,dgl,predsim"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    parser.add_argument("--out", type=Path, default=Path("results/gpu/speed"))
    parser.add_argument("--rules", default=None, help="comma-separated rules of the speed suite (default: all)")
    parser.add_argument("--quick", action="store_true", help="the speed suite's --quick version")
    parser.add_argument("--tiny", action="store_true", help="tiny networks, batches and runs: the test suite's check")
    parser.add_argument("--data", default="fashion-mnist", help="fashion-mnist (default) or synthetic")
    parser.add_argument("--tta-rules", default=TTA_RULES, help=f"time-to-accuracy rules (default {TTA_RULES}; "
                                                                "'none' to skip)")
    parser.add_argument("--tta-epochs", type=int, default=None, help="default 3 (tiny: 1)")
    parser.add_argument("--tta-train", type=int, default=None, help="training images (default 20000; tiny: 64)")
    args = parser.parse_args(argv)
    args.device = resolve_device(args.device)
    args.rules = [n.strip() for n in args.rules.split(",") if n.strip()] if args.rules else None
    args.tta_rules = [] if args.tta_rules == "none" else [n.strip() for n in args.tta_rules.split(",") if n.strip()]
    for name in [*(args.rules or []), *args.tta_rules]:
        rules.get(name)  # an unknown name is a one-line UserError
    args.tta_epochs = args.tta_epochs or (1 if args.tiny else 3)
    args.tta_train = args.tta_train or (64 if args.tiny else 20_000)
    if args.data not in ("fashion-mnist", "synthetic"):
        raise UserError(f"--data is fashion-mnist or synthetic, not {args.data!r}")
    return args


def speed_guard(device: torch.device, counted: dict[str, list[int]]):
    """The sync check around one step of ``rule`` (``benchmarks/gpu.py``): on CUDA, mode "error", or
    "warn" with its waits counted for a rule that declares them; nothing on the CPU."""
    sync_check = _gpu_check().sync_check

    def guard(rule):
        return sync_check(device, type(rule).syncs_per_step, counted[rule.name])

    return guard


def run_speed_part(args, command: str) -> dict[str, Any]:
    suite = QUICK if args.quick else SPEED
    if args.tiny:
        suite = replace(suite, name="speed-tiny", networks=TINY_NETWORKS, batch_size=4, warmup=1, steps=2,
                        flop_steps=1, memory_steps=2, threads=(1,))
    device = torch.device(args.device)
    counted: dict[str, list[int]] = defaultdict(list)
    options = SpeedOptions(suite=suite, out=args.out / "speed", rule_names=args.rules, device=args.device,
                           data=None if args.data == "synthetic" else args.data, command=command,
                           overwrite=True, guard=speed_guard(device, counted),
                           threads=1 if device.type == "cuda" else None)
    summary = run_speed(options)
    waits = {name: sum(c) / len(c) for name, c in counted.items() if c and rules.get(name).syncs_per_step}
    return {"failed": summary["failed"], "waits_per_step_by_design": waits, "report": summary["report"]}


def tta_data(args) -> Dataset:
    if args.data == "synthetic":
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(args.tta_train + 256, 1, 28, 28, generator=generator)
        y = torch.randint(0, 10, (len(x),), generator=generator)
        return Dataset("synthetic", x[:args.tta_train], y[:args.tta_train], x[-256:], y[-256:], 10)
    data = load(args.data)
    assert isinstance(data, Dataset)  # fashion-mnist is held in memory
    test = 256 if args.tiny else len(data.x_test)
    return Dataset(data.name, data.x_train[:args.tta_train], data.y_train[:args.tta_train], data.x_test[:test],
                   data.y_test[:test], data.num_classes)


def time_to_accuracy(args) -> list[dict[str, Any]]:
    """Each rule trained on the conv suite's VGG (tiny: a tiny one): accuracy after each epoch, seconds so far."""
    data = tta_data(args)
    network = TINY_NETWORKS["vgg"].network if args.tiny else CONV.network
    rows = []
    for name in args.tta_rules:
        spec = RunSpec(rule=name, data=data.name, arch="vgg", channels=network.channels, hidden=network.hidden,
                       epochs=args.tta_epochs, batch_size=8 if args.tiny else 128, seed=0)
        rule = build_rule(spec, data)
        result = fit(spec, rule=rule, data=data, device=args.device, progress=False)
        seconds = [sum(result["seconds_per_epoch"][:i + 1]) for i in range(len(result["seconds_per_epoch"]))]
        rows.append({"rule": name, "seconds": seconds, "test_accuracy": result["test_accuracy_per_epoch"],
                     "train_images": len(data.x_train), "epochs": args.tta_epochs})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def write_readme(args, command: str, speed: dict[str, Any], tta: list[dict[str, Any]]) -> None:
    device = torch.device(args.device)
    lines = ["# The speed suite on a device, and a short time-to-accuracy case (benchmarks/gpu_speed.py)", "",
             f"Command: `{command}`  ",
             f"Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}; {machine(device)}; "
             f"1-minute load average {os.getloadavg()[0]:.2f} at the end.", "",
             "## Speed suite: [speed/RESULTS.md](speed/RESULTS.md)", "",
             "Host synchronisation inside a step: "
             + ("not checked on the CPU (nothing to wait for)." if device.type != "cuda" else
                (f"rows that waited without declaring it: {', '.join(speed['failed'])}." if speed["failed"] else
                 "none, except the declared ones below."))]
    for name, waits in sorted(speed["waits_per_step_by_design"].items()):
        lines.append(f"- `{name}` waits by design, {waits:.3g} times per step: {rules.get(name).syncs_per_step}")
    lines += ["", "## Time to accuracy (one process per rule, the conv suite's VGG)", "",
              "| rule | epoch | seconds so far | test accuracy |", "|---|---|---|---|"]
    for row in tta:
        for epoch, (seconds, accuracy) in enumerate(zip(row["seconds"], row["test_accuracy"]), 1):
            lines.append(f"| `{row['rule']}` | {epoch} | {seconds:.1f} | {accuracy:.4f} |")
    lines += ["", (__doc__ or "").split("\n\n", 1)[1]]
    (args.out / "README.md").write_text("\n".join(lines))


def run(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = "PYTHONPATH=. .venv/bin/python benchmarks/gpu_speed.py " + " ".join(sys.argv[1:] if argv is None else argv)
    args.out.mkdir(parents=True, exist_ok=True)
    speed = run_speed_part(args, command)
    tta = time_to_accuracy(args)
    (args.out / "time_to_accuracy.json").write_text(json.dumps({"command": command, "device": args.device,
                                                                "rows": tta}, indent=1) + "\n")
    write_readme(args, command, speed, tta)
    print(f"gpu_speed: {args.out}/: README.md, speed/, time_to_accuracy.json"
          + (f"; failed: {', '.join(speed['failed'])}" if speed["failed"] else ""))
    return 1 if speed["failed"] else 0


def main() -> None:
    try:
        sys.exit(run())
    except UserError as exc:
        print(f"gpu_speed.py: error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
