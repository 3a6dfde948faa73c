"""Every rule with and without flushing subnormal floats: accuracy and epoch time (not a test).

    python benchmarks/denormal.py --out results/denormal [--epochs 3] [--rules bp,fa,...]

For each registered rule (gaitprop, tp and itp on ``--arch invertible``, the others on the mlp),
``localcredit train --data fashion-mnist --hidden 1000,1000 --epochs E --threads 1`` runs twice,
once with ``--flush-denormal off`` and once with ``on``, one after the other (so a slow patch of the
shared machine hits both alike). Updates of rarely active units drift into subnormal floats, which
this CPU computes in slow microcode, so the epochs of the unflushed run may slow down as training
goes on; flushing changes only numbers below ~1.2e-38. Writes ``denormal.csv`` and ``denormal.json``
(per rule: test accuracy per epoch and seconds per epoch of both runs, and the ratio of the last
epoch's time off / on).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from localcredit import rules as registry

ARGS = ["--data", "fashion-mnist", "--hidden", "1000,1000", "--threads", "1", "--quiet"]


def train(rule: str, flush: str, epochs: int, out: Path) -> dict:
    command = [sys.executable, "-m", "localcredit", "train", "--rule", rule, *ARGS, "--epochs", str(epochs),
               "--flush-denormal", flush, "--out", str(out), "--overwrite"]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    result = json.loads((out / "result.json").read_text())
    return {"test_accuracy_per_epoch": result["test_accuracy_per_epoch"],
            "seconds_per_epoch": [round(s, 2) for s in result["seconds_per_epoch"]]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("results/denormal"))
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--rules", default=",".join(registry.available()), help="comma-separated (default: every rule)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for rule in args.rules.split(","):
            runs = {flush: train(rule, flush, args.epochs, Path(scratch) / f"{rule}-{flush}") for flush in ("off", "on")}
            off, on = runs["off"], runs["on"]
            rows.append({"rule": rule, "load_average_1min_after": round(os.getloadavg()[0], 2),
                         "accuracy_off": off["test_accuracy_per_epoch"][-1], "accuracy_on": on["test_accuracy_per_epoch"][-1],
                         "seconds_per_epoch_off": off["seconds_per_epoch"], "seconds_per_epoch_on": on["seconds_per_epoch"],
                         "last_epoch_time_off_over_on": round(off["seconds_per_epoch"][-1] / on["seconds_per_epoch"][-1], 3)})
            print(json.dumps(rows[-1]), flush=True)
    (args.out / "denormal.json").write_text(json.dumps({"command": " ".join(sys.argv), "train_args": ARGS,
                                                        "epochs": args.epochs, "rows": rows}, indent=2) + "\n")
    with open(args.out / "denormal.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({k: (" ".join(map(str, v)) if isinstance(v, list) else v) for k, v in row.items()} for row in rows)


if __name__ == "__main__":
    main()
