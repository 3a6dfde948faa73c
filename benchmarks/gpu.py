"""GPU check: every rule on the conv nets on CUDA, no host synchronisation inside a step; time and memory vs BP.

    PYTHONPATH=. .venv/bin/python benchmarks/gpu.py --out results/gpu [--steps 300] [--bf16] [--data synthetic]
    PYTHONPATH=. .venv/bin/python benchmarks/gpu.py --dry-run --out /tmp/gpu-dry   # the same code path on CPU

For every registered rule on each conv net (vgg8b and ResNet-20; gaitprop, tp and itp train
``invertible-conv`` with 7 layers, against BP on that same net, ``bp@twin``):

* ``--warmup`` steps first (optimiser state and kernel choice are made there);
* ``--steps`` steps, each inside ``torch.cuda.set_sync_debug_mode("error")``: a step that makes the
  host wait for the device (``.item()``, ``float(loss)``, ``.tolist()``, ``nonzero()``, a copy to
  the CPU) raises, and the rule's row records where (``host_sync``) instead of figures. A rule
  whose step waits by design (it decides on values it computed; ``Rule.syncs_per_step`` says why:
  gaitprop, tp, itp) runs under mode "warn" instead, and its row counts the waits
  (``host_syncs_per_step``) beside the reason (``syncs_by_design``);
* step time from CUDA events around those steps (one synchronisation after the last), peak memory
  as ``torch.cuda.max_memory_allocated`` over them minus the allocation before them, and the step
  memory of :mod:`localcredit.bench.memory` over a few more steps; each as a ratio to BP on the same net;
* ``--bf16`` runs every step under ``torch.autocast(dtype=torch.bfloat16)``.

``--dry-run`` runs all of it on the CPU with tiny nets, a handful of steps and synthetic data (the
sync check only exists on CUDA): the test suite runs it, so the script cannot rot where CI has no
GPU. Exit status: 0 when every rule ran without a host synchronisation it does not declare, or
another failure (named in its row, e.g. an operation without a bfloat16 kernel), 1 otherwise, 2 for
bad input.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import platform
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch

from localcredit import rules
from localcredit.bench.memory import step_memory
from localcredit.errors import UserError
from localcredit.experiment import RunSpec, build_rule

INVERTING = ("gaitprop", "itp", "tp")
#: In what torch's sync debug mode says at a wait, as an error (mode "error") or a warning (mode "warn").
SYNC_MESSAGE = "synchroniz"
#: network name -> RunSpec options (real run, dry run); the inverting rules' twin is "invertible-conv"
NETWORKS = {
    "vgg": (dict(arch="vgg"), dict(arch="vgg", channels="4,M", hidden=[16])),
    "resnet-20": (dict(arch="resnet", depth=20), dict(arch="resnet", depth=8, width=0.125)),
}
TWIN = (dict(arch="invertible-conv", patches=[7, 4, 1, 1, 1, 1, 1]), dict(arch="invertible-conv", patches=[7, 4]))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("results/gpu"))
    parser.add_argument("--steps", type=int, default=None, help="timed steps per rule (default 300; dry run 2)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 20; dry run 1)")
    parser.add_argument("--batch-size", type=int, default=None, help="default 128; dry run 4")
    parser.add_argument("--bf16", action="store_true", help="every step under bfloat16 autocast")
    parser.add_argument("--data", default=None, help="fashion-mnist (default) or synthetic (dry run's default)")
    parser.add_argument("--rules", default=None, help="comma-separated rules (default: every registered rule)")
    parser.add_argument("--dry-run", action="store_true", help="the same code path on the CPU, tiny and short")
    args = parser.parse_args(argv)
    dry = args.dry_run
    args.steps = args.steps if args.steps is not None else (2 if dry else 300)
    args.warmup = args.warmup if args.warmup is not None else (1 if dry else 20)
    args.batch_size = args.batch_size if args.batch_size is not None else (4 if dry else 128)
    args.data = args.data or ("synthetic" if dry else "fashion-mnist")
    args.rules = args.rules.split(",") if args.rules else sorted(rules.available())
    for name in args.rules:
        rules.get(name)  # an unknown name is a one-line UserError
    if min(args.steps, args.batch_size) < 1 or args.warmup < 0:
        raise UserError("--steps and --batch-size must be at least 1, --warmup at least 0")
    return args


def device_for(args) -> torch.device:
    if args.dry_run:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UserError("torch sees no CUDA device: benchmarks/gpu.py --dry-run runs the same code on the CPU")
    return torch.device("cuda")


def training_images(args, device: torch.device, count: int) -> tuple[torch.Tensor, torch.Tensor, object]:
    """``count`` training images and labels on ``device`` (batches are slices: no copy, no sync), and the Dataset."""
    from localcredit.data import Dataset, load

    if args.data == "synthetic":  # shapes of Fashion-MNIST; time and memory do not depend on the values
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(count, 1, 28, 28, generator=generator)
        y = torch.randint(0, 10, (count,), generator=generator)
        data = Dataset(name="synthetic", x_train=x, y_train=y, x_test=x[:8], y_test=y[:8], num_classes=10)
    else:
        data = load(args.data)
    return data.x_train[:count].to(device), data.y_train[:count].to(device), data


def sync_check(device: torch.device, by_design: str | None, counted: list[int]):
    """The host-synchronisation check around one step (CUDA only: a CPU has nothing to wait for).

    A rule whose step never waits: any synchronising call inside the block raises (sync debug mode
    "error"). A rule that waits by design (``by_design``, its ``Rule.syncs_per_step``): the block's
    waits are counted into ``counted`` instead (mode "warn", whose warnings are caught here).
    """
    if device.type != "cuda":
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def checked():
        torch.cuda.set_sync_debug_mode("warn" if by_design else "error")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")  # every wait, not the first one per line
                yield
            counted.append(sum(SYNC_MESSAGE in str(w.message) for w in caught))
        finally:
            torch.cuda.set_sync_debug_mode("default")

    return checked()


def precision(args, device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16) if args.bf16 else contextlib.nullcontext()


def where_it_synced(exc: BaseException) -> str:
    """The innermost localcredit line of the traceback and the error's first line: what the report names."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if "localcredit" in f.filename]
    place = f"{Path(frames[-1].filename).name}:{frames[-1].lineno} `{frames[-1].line}`" if frames else "?"
    message = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
    return f"{place}: {message}"


def timed_steps(rule, batches, args, device: torch.device) -> tuple[float, float | None]:
    """Milliseconds per step over ``batches``, every step checked for host synchronisation; and the
    waits per step of a rule that waits by design (None otherwise, and on the CPU)."""
    by_design, counted = type(rule).syncs_per_step, []
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
    else:
        began = time.perf_counter()
    for x, y in batches:
        with sync_check(device, by_design, counted), precision(args, device):
            rule.step(x, y)
    syncs = sum(counted) / len(batches) if counted else None
    if device.type == "cuda":
        end.record()
        torch.cuda.synchronize(device)  # once, after the last step
        return start.elapsed_time(end) / len(batches), syncs
    return 1000 * (time.perf_counter() - began) / len(batches), syncs


def measure(rule_name: str, network: str, args, device, images) -> dict:
    """One rule on one network: its row of the report."""
    x_all, y_all, data = images
    real, dry = TWIN if rule_name in INVERTING or rule_name == "bp@twin" else NETWORKS[network]
    options = dry if args.dry_run else real
    name = rule_name.removesuffix("@twin")
    rule = build_rule(RunSpec(rule=name, data="fashion-mnist", seed=0, **options), data).to(device)
    b = args.batch_size
    count = len(x_all) // b
    batches = [(x_all[(i % count) * b:(i % count + 1) * b], y_all[(i % count) * b:(i % count + 1) * b])
               for i in range(args.warmup + args.steps)]
    row = {"rule": rule_name, "network": network, "arch": options["arch"], "batch_size": b, "bf16": args.bf16,
           "syncs_by_design": type(rule).syncs_per_step}
    try:
        with precision(args, device):
            for x, y in batches[:args.warmup]:
                rule.step(x, y)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
        row["ms_per_step"], row["host_syncs_per_step"] = timed_steps(rule, batches[args.warmup:], args, device)
        if device.type == "cuda":
            row["cuda_peak_mb"] = (torch.cuda.max_memory_allocated(device) - before) / 2**20
        with precision(args, device):  # the rule is warm: one more step warms the meter's ledger
            row.update(step_memory(rule, batches[:3], warmup=1))
    except Exception as exc:  # noqa: BLE001 -- the report names it; the other rules still run
        key = "host_sync" if SYNC_MESSAGE in str(exc) else "error"  # the sync check's error, or another
        row[key] = where_it_synced(exc)
    return row


def add_ratios(rows: list[dict]) -> None:
    reference = {(r["network"], r["rule"] == "bp@twin"): r for r in rows if r["rule"] in ("bp", "bp@twin")}
    for row in rows:
        bp = reference.get((row["network"], row["rule"] in INVERTING or row["rule"] == "bp@twin"), {})
        for key in ("ms_per_step", "cuda_peak_mb", "step_memory_mb"):
            ok = row.get(key) is not None and bp.get(key)
            row[f"{key}_ratio_to_bp"] = row[key] / bp[key] if ok else None


def host_sync_cell(row: dict) -> str:
    """The report's "host sync in the step" cell: none, where an undeclared one happened, or the
    declared ones counted (not on the CPU) with their reason."""
    if "error" in row:
        return f"(failed: {row['error']})"
    if "host_sync" in row:
        return row["host_sync"]
    if row["syncs_by_design"]:
        counted = row.get("host_syncs_per_step")
        count = f"{counted:.3g} per step" if counted is not None else "not counted on the CPU"
        return f"by design ({count}): {row['syncs_by_design']}"
    return "none"


def write_results(out: Path, rows: list[dict], args, device, command: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.machine()}), dry run"
    (out / "gpu.json").write_text(json.dumps({"command": command, "device": machine, "torch": torch.__version__,
                                              "steps": args.steps, "warmup": args.warmup, "rows": rows}, indent=1))
    fields = list(dict.fromkeys(k for row in rows for k in row))
    with open(out / "gpu.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    lines = ["# GPU check: every rule on the conv nets", "", f"Command: `{command}`", "",
             f"Device: {machine}; torch {torch.__version__}; batch {args.batch_size}, {args.warmup} warm-up + "
             f"{args.steps} timed steps per rule{', bf16 autocast' if args.bf16 else ''}.", "",
             "| rule | network | ms/step | time vs BP | CUDA peak vs BP | step memory vs BP | host sync in the step |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        cells = [f"{row[k]:.3g}" if row.get(k) is not None else "-"
                 for k in ("ms_per_step", "ms_per_step_ratio_to_bp", "cuda_peak_mb_ratio_to_bp",
                           "step_memory_mb_ratio_to_bp")]
        lines.append(f"| `{row['rule']}` | {row['network']} | " + " | ".join(cells) + f" | {host_sync_cell(row)} |")
    (out / "README.md").write_text("\n".join(lines + ["", (__doc__ or "").split("\n\n", 1)[1]]))


def run(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = device_for(args)
    if args.dry_run:
        torch.set_num_threads(1)  # tiny nets: more threads only add overhead (and CI shares its cores)
    torch.manual_seed(0)
    images = training_images(args, device, max(3, args.warmup + args.steps) * args.batch_size)
    rows = []
    for network in NETWORKS:
        for rule_name in [*args.rules, "bp@twin"]:
            rows.append(measure(rule_name, network, args, device, images))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    add_ratios(rows)
    command = "PYTHONPATH=. .venv/bin/python benchmarks/gpu.py " + " ".join(sys.argv[1:] if argv is None else argv)
    write_results(args.out, rows, args, device, command)
    return 1 if any("host_sync" in row or "error" in row for row in rows) else 0


def main() -> None:
    try:
        sys.exit(run())
    except UserError as exc:
        print(f"gpu.py: error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
