"""What keeping gradients in their maps' channels-last layout (localcredit/nets/layout.py) saves (not a test).

    PYTHONPATH=. .venv/bin/python benchmarks/gradient_layout.py --out results/speed/gradient-layout.json
        [--rules bp,dfa,local-random,lfnn-l,dgl,predsim] [--rounds 40]

Each rule is built twice on the speed suite's VGG: once as the code is, once with nets/layout.py's
helpers switched off (its maps' gradients then come back in the default layout where a flatten, a
global average or a ``view`` makes them, as before that module). Both copies of every rule step the
same batches in interleaved rounds, as the speed suite does (the starting row rotating), one thread,
batch 128; the medians are compared with BP as it is now. Only a comparison inside one process is
fair here: the ratios of the speed suite moved by up to 5 % between days on this shared host.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

import localcredit.nets.layout as layout
import localcredit.rules.attention as attention
import localcredit.rules.feedback as feedback
from localcredit.bench.plan import entry_network
from localcredit.bench.speed_suite import NETWORKS, images, plan_rows
from localcredit.experiment import RunSpec, build_rule

KEEPING = (layout._is_channels_last, layout.in_layout_of)


def keep_layout(on: bool) -> None:
    """Switch nets/layout.py's helpers on (as shipped) or off (gradients in whatever layout autograd gives)."""
    layout._is_channels_last = KEEPING[0] if on else (lambda h: False)
    feedback.in_layout_of = attention.in_layout_of = KEEPING[1] if on else (lambda values, like: values)


def write_report(out: Path, argv: list[str] | None, load_before: float, fields: dict) -> None:
    """``out`` as JSON: ``fields`` after the command that made them, the date, the 1-minute load average
    before and after, and torch's version (fixed_step_cost.py writes its report with this too)."""
    report = {"command": "PYTHONPATH=. .venv/bin/python " + " ".join([sys.argv[0], *(argv or sys.argv[1:])]),
              "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "load_average": {"before": load_before, "after": os.getloadavg()[0]}, "torch": torch.__version__,
              **fields}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--rules", default="bp,dfa,local-random,lfnn-l,dgl,predsim")
    parser.add_argument("--rounds", type=int, default=40)
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.rules.split(",") if n.strip()]
    if "bp" not in names:
        names.insert(0, "bp")
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    suite, batch, warmup = NETWORKS["vgg"], 128, 5
    data = images("fashion-mnist", 50 * batch)
    rows = []
    for row in plan_rows(suite, names):
        if row.entry.rule not in names:
            continue
        for kept in (True, False):
            spec = RunSpec(rule=row.entry.rule, data="fashion-mnist", **asdict(entry_network(row.entry, suite)),
                           options=list(row.entry.options), batch_size=batch, seed=0)
            rule = build_rule(spec, data)
            rule.start_epoch(0, 1)
            rows.append((row.key, kept, rule, []))
    load_before = os.getloadavg()[0]
    for r in range(warmup + args.rounds):
        i = r % 50
        x, y = data.x_train[i * batch:(i + 1) * batch], data.y_train[i * batch:(i + 1) * batch]
        shift = r % len(rows)
        for _, kept, rule, times in rows[shift:] + rows[:shift]:
            keep_layout(kept)
            start = time.perf_counter()
            rule.step(x, y)
            if r >= warmup:
                times.append(1000 * (time.perf_counter() - start))
    keep_layout(True)
    median = {(key, kept): statistics.median(times) for key, kept, _, times in rows}
    bp = median[("bp", True)]
    results = {}
    print("| rule | ms, layout kept | ms, before | of BP, kept | of BP, before | kept / before |")
    print("|---|---|---|---|---|---|")
    for key in dict.fromkeys(key for key, *_ in rows):
        kept, before = median[(key, True)], median[(key, False)]
        results[key] = {"ms_kept": kept, "ms_before": before, "of_bp_kept": kept / bp, "of_bp_before": before / bp,
                        "kept_over_before": kept / before}
        print(f"| `{key}` | {kept:.1f} | {before:.1f} | {kept / bp:.3f} | {before / bp:.3f} | {kept / before:.3f} |")
    if args.out:
        write_report(args.out, argv, load_before, {"threads": 1, "batch": batch, "rounds": args.rounds,
                                                   "network": suite.description, "rules": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
