"""The spread behind every learning floor of the test suite (issue 25).

Float results differ between CPUs and BLAS builds, and training turns that into points of accuracy,
so a floor set from one run on one machine is a coin toss elsewhere. This runs every learning case
of the suite (each rule's MLP and deep-network tests from ``tests/rule_contract.py``, and the cases
other test modules register in ``tests/learning.py``) over several seeds and thread counts, and
once with the rule broken (every gradient's sign flipped before the optimiser steps), and writes
per case: min / median / max, the floor in the suite, the floor the spread suggests
(min - max(0.03, half the range), rounded down) and whether the broken rule falls under the floor.

    python benchmarks/learning_floors.py --threads 1 --out results/learning-floors   # one store per thread count
    python benchmarks/learning_floors.py --threads 2 --out results/learning-floors   # (two can run side by side)
    python benchmarks/learning_floors.py --report --out results/learning-floors      # README.md from both
    python benchmarks/learning_floors.py --cases lfnn --threads 2 --out /tmp/floors  # some cases only

Resumable: each finished run is stored at once in OUT/spread-t{threads}.json and skipped next time.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from tests import learning  # noqa: E402
from tests.conftest import fashion_deep_data, fashion_small_data  # noqa: E402
from tests.rule_contract import RuleContract  # noqa: E402

Case = Callable[[int, "str | None"], float]


def contract_cases() -> dict[str, tuple[Case, float]]:
    """Every RuleContract subclass's MLP case and (where it trains conv nets) its three deep cases."""
    cases: dict[str, tuple[Case, float]] = {}
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        module = importlib.import_module(f"tests.{path.stem}")
        for name, cls in inspect.getmembers(module, inspect.isclass):
            if not issubclass(cls, RuleContract) or not cls.rule or cls.__module__ != module.__name__:
                continue
            test = cls()
            cases[f"{path.stem}::{name}::mlp"] = (
                lambda seed, broken, test=test: test.learn(fashion_small_data(), seed, broken)["test_accuracy"],
                cls.accuracy_floor)
            if cls.supports_conv:
                for network in ("vgg", "resnet", "user"):
                    cases[f"{path.stem}::{name}::{network}"] = (
                        lambda seed, broken, test=test, network=network:
                        test.learn_deep(fashion_deep_data(), network, seed, broken)["test_accuracy"],
                        cls.deep_floors[network])
    return cases


def all_cases() -> dict[str, tuple[Case, float]]:
    cases = contract_cases()  # imports every test module, which registers its own cases
    cases.update(learning.CASES)
    return cases


def suggested_floor(values: list[float]) -> float:
    low, high = min(values), max(values)
    return math.floor((low - max(0.03, (high - low) / 2)) * 100) / 100


def report(out: Path, cases: dict[str, tuple[Case, float]]) -> str:
    stores = {int(p.stem.split("-t")[1]): json.loads(p.read_text()) for p in sorted(out.glob("spread-t*.json"))}
    lines = ["| case | floor in the suite | runs | min | median | max | suggested floor | broken (sign flipped) "
             "| floor below min - 3 pt | broken under floor |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, (_, floor) in cases.items():
        values = [v for store in stores.values() for k, v in store.get(name, {}).items() if k.startswith("seed")]
        broken = [v for store in stores.values() for k, v in store.get(name, {}).items() if k == "broken-flip"]
        if not values:
            continue
        low = min(values)
        lines.append(f"| {name} | {floor:.2f} | {len(values)} | {low:.3f} | {statistics.median(values):.3f} | "
                     f"{max(values):.3f} | {suggested_floor(values):.2f} | "
                     f"{broken[0] if broken else float('nan'):.3f} | {'yes' if floor <= low - 0.03 + 1e-9 else 'NO'} | "
                     f"{'yes' if broken and broken[0] < floor else ('-' if not broken else 'NO')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cases", default="", help="only cases whose name contains one of these (comma-separated)")
    parser.add_argument("--no-broken", action="store_true", help="skip the broken-rule run of each case")
    parser.add_argument("--report", action="store_true", help="only write OUT/README.md from the stores")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cases = all_cases()
    if not args.report:
        wanted = [c for c in args.cases.split(",") if c]
        chosen = {k: v for k, v in cases.items() if not wanted or any(w in k for w in wanted)}
        if not chosen:
            parser.error(f"no case matches {args.cases!r}; cases: {', '.join(cases)}")
        torch.set_num_threads(args.threads)
        store_path = out / f"spread-t{args.threads}.json"
        store = json.loads(store_path.read_text()) if store_path.exists() else {}
        runs = [(name, f"seed{s}", s, None) for s in map(int, args.seeds.split(",")) for name in chosen]
        if not args.no_broken and args.threads == 2:
            runs += [(name, "broken-flip", 0, "flip") for name in chosen]
        for name, key, seed, broken in runs:
            if key in store.get(name, {}):
                continue
            start = time.perf_counter()
            store.setdefault(name, {})[key] = round(float(chosen[name][0](seed, broken)), 4)
            store_path.write_text(json.dumps(store, indent=1))
            print(f"{name:60s} {key:12s} {store[name][key]:.4f} ({time.perf_counter() - start:.0f} s)", flush=True)
    table = report(out, cases)
    (out / "README.md").write_text(
        "# The spread behind the suite's learning floors\n\n"
        "Every learning case of the test suite over seeds 0-4, with 1 and 2 threads (the suite runs seed 0 "
        "with 2 threads; the continual cases seed 1), and once with its rule broken (gradient signs "
        "flipped). Suggested floor: min - max(0.03, half the range), rounded down. "
        "Every deep-network test also checks that the training loss falls from the first epoch to the last, "
        "which catches a broken dgl on resnet where its accuracy floor cannot. Commands:\n\n"
        "    python benchmarks/learning_floors.py --threads 1 --out results/learning-floors\n"
        "    python benchmarks/learning_floors.py --threads 2 --out results/learning-floors\n"
        "    python benchmarks/learning_floors.py --report --out results/learning-floors\n\n" + table + "\n")
    print(table)


if __name__ == "__main__":
    main()
