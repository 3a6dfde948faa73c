"""The modules suite's grid (resnet-20, K = 1, 2, 4, 8 for local-learned, predsim, dgl, infopro, bp end to end)
on a budget that fits an hour of two cores: the shape of error and memory against K, not the converged table.

The full suite (`localcredit bench --suite modules`, ~55 CPU hours: docs/bench.md) trains 6 epochs on 60,000
images with augmentation, a schedule and a tuned learning rate per point, 2 seeds, on two data sets. This
runs the same machinery (bench/modules_suite.py: the same planner, process pool, memory probes and report)
with every point at its rule's default learning rate (the same, zero, tuning budget for every rule), Adam,
no augmentation or schedule, the first 10,000 Fashion-MNIST training images, 2 epochs, seed 0, the whole
test set. The step-memory figures do not depend on the budget: they are the full suite's.

    python benchmarks/modules_short.py --out results/modules [--workers 2] [--resume]
"""

from __future__ import annotations

import argparse
import shlex
import sys
from dataclasses import replace
from pathlib import Path

from localcredit.bench.modules_suite import MODULES, ModulesBenchOptions, run_modules_bench

SHORT = replace(
    MODULES, name="modules-short",
    description="resnet-20 cut into K = 1, 2, 4, 8 modules for local-learned, predsim, dgl and infopro, beside BP "
                "end to end, on the first 10,000 Fashion-MNIST training images (the whole test set), 2 epochs, Adam "
                "at each rule's default learning rate (no tuning, no augmentation, no schedule), 1 seed: the full "
                "suite's grid on a budget of about an hour of two cores (benchmarks/modules_short.py)",
    datasets=("fashion-mnist",), epochs=2, seeds=1, limit_train=10_000, recipe={"optimizer": "adam"},
    recipe_by_data={}, tune_epochs=0)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("results/modules"))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--resume", action="store_true", help="keep the finished runs, resume the interrupted ones")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    options = ModulesBenchOptions(suite=SHORT, out=args.out, rule_names=None, workers=args.workers, threads=1,
                                  progress=not args.quiet, resume=args.resume,
                                  command=shlex.join(["python", "benchmarks/modules_short.py", *argv]),
                                  resume_hint=shlex.join(["python", "benchmarks/modules_short.py", *argv,
                                                          *([] if args.resume else ["--resume"])]))
    summary = run_modules_bench(options)
    print(f"{SHORT.name}: {summary['trained']} runs trained, {summary['skipped']} already finished; {args.out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
