"""The full claims run's cost, estimated from a quick run's step times (a ``--quick`` run's RESULTS.md
ends with it)."""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence

from .claims_cases import ClaimsPlan, claims_plan
from .claims_figures import Context
from .claims_runs import TIMING, tuning_keys
from .claims_tables import table

TRAIN_SIZE = {"mnist": 60_000, "fashion-mnist": 60_000, "cifar10": 50_000, "svhn": 73_257}
PROCESS_SECONDS = 4.0  # a process's start, data loading and building, when nothing better is measured


def estimate_lines(plan: ClaimsPlan, ctx: Context, rows: list[dict]) -> list[str]:
    """CPU hours of the full plan: each of its runs' steps x the step time this quick run measured for that
    setting and row, scaled by the share of a core the quick run's processes got, plus their start-up."""
    path = ctx.out / TIMING
    log = json.loads(path.read_text()) if path.exists() else []
    wall = sum(e.get("process_wall_seconds", 0) for e in log)
    cpu = sum(e.get("process_cpu_seconds", 0) for e in log)
    share = cpu / wall if wall else 1.0
    measured: dict[tuple[str, str], list[float]] = {}
    for r in rows:
        if r["ms_per_step"]:
            measured.setdefault((r["setting"], r["options"] and f"{r['rule']} {r['options']}" or r["rule"]), []).append(
                r["ms_per_step"])
            measured.setdefault((r["setting"], r["rule"]), []).append(r["ms_per_step"])
    quick_steps_cpu = sum((r["ms_per_step"] or 0) * (r["epochs"] or 0) * -(-int(r["train_samples"] or 0) // 128) / 1000
                          for r in rows) * share
    processes = max(1, sum(e.get("processes", 0) for e in log))
    per_process = max(PROCESS_SECONDS, (cpu - quick_steps_cpu) / processes) if cpu else PROCESS_SECONDS
    full = claims_plan(quick=False, present=set(plan.present))
    by_case: dict[str, float] = {}
    unknown: set[str] = set()
    seen: set[tuple] = set()
    for case in full.cases:
        hours = 0.0
        for key in tuning_keys(full, [case]):
            setting = full.settings[key[0]]
            size = min(TRAIN_SIZE.get(key[2], 60_000) * 5 // 6, setting.tune_limit_train or setting.limit_train or 10**9)
            grid_size = 2 * setting.lr_span + 1
            job = (key, "tune")
            if job in seen:
                continue
            seen.add(job)
            ms = _ms(measured, key[0], key[1].rule, key[1].options, unknown)
            hours += grid_size * (setting.tune_epochs * -(-size // setting.batch_size) * ms * share / 1000 +
                                  per_process) / 3600
        for arm in case.arms:
            setting = full.settings[arm.setting]
            for data in arm.datasets:
                runs = (arm.setting, arm.entry, data, arm.seeds, arm.lr)
                if runs in seen:
                    continue
                seen.add(runs)
                size = min(TRAIN_SIZE.get(data, 60_000), setting.limit_train or 10**9)
                ms = _ms(measured, arm.setting, arm.entry.rule, arm.entry.options, unknown)
                steps = setting.epochs * (-(-size // setting.batch_size) + 10_000 // setting.batch_size // 3)  # + eval
                hours += arm.seeds * (steps * ms * share / 1000 + per_process) / 3600
        for m in case.measures:
            if m.kind == "align-curve":
                setting = full.settings[m.arm.setting]
                size = min(TRAIN_SIZE[m.data], setting.limit_train or 10**9)
                steps = setting.epochs * -(-size // setting.batch_size)
                ms = _ms(measured, m.arm.setting, m.arm.entry.rule, (), unknown)
                marks = 8 + setting.epochs + 1
                hours += (steps + marks * 6) * ms * share / 1000 / 3600
            else:
                hours += 2 * per_process / 3600
        by_case[case.name] = hours
    total = sum(by_case.values())
    loads = [e["load_average_at_end"][0] for e in log]
    lines = [f"From this quick run's step times (each row's median wall ms per step on its own network) times the "
             f"share of a core its processes got ({share:.2f}: {cpu:.0f} CPU s in {wall:.0f} s of their wall time; "
             f"1-minute load average at the end {', '.join(f'{v:.1f}' for v in loads) or '-'}), plus "
             f"{per_process:.1f} CPU s per process (start, data, evaluation), over the full plan's runs (the first "
             "tuning grid; a widened grid adds up to one run per tuned row):", "",
             *table(["case", "CPU hours"], [[f"`{k}`", f"{v:.2f}"] for k, v in by_case.items()]), "",
             f"**{total:.1f} CPU hours: about {total / 2:.1f} h of wall time with 2 runs at a time on 2 quiet cores.** "
             "Step times measured under load are inflated by cache and memory-bandwidth contention beyond what the "
             "CPU share corrects, so this errs high."]
    if unknown:
        lines.append(f"No quick-run step time for {', '.join(sorted(unknown))}: counted at 50 ms per step.")
    return lines


def _ms(measured: dict[tuple[str, str], list[float]], setting: str, rule: str, options: Sequence[str],
        unknown: set[str]) -> float:
    for key in ((setting, f"{rule} {' '.join(options)}" if options else rule), (setting, rule)):
        if key in measured:
            return statistics.median(measured[key])
    unknown.add(f"{rule} ({setting})")
    return 50.0
