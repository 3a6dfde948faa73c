"""The outputs of the claims suite: RESULTS.md (a verdict per claim, then each case's tables, plots and
commands), results.csv (one row per run), verdicts.csv and one PNG per case.

Everything is read back from the run folders and measurement files, so the report can be rebuilt at
any time, and cases run at different times (``--cases``) join one report; a case not run yet has its
rows marked so, with the command that runs it.

**Verdicts.** Errors are test errors in %, mean ± sample std over seeds. Two figures differ when their
means differ by more than the *tolerance*: twice the standard error of the difference (sqrt(s_a^2/n_a +
s_b^2/n_b)), and never less than 0.05 points; a published figure counts as exact. Each case's rule
from its figures to "holds", "holds partly", "does not hold" is written in its design (claims_cases).

The pieces: ``claims_figures`` (runs read back, the tolerance, the verdict record), ``claims_tables`` and
``claims_plots``, a ``claims_verdicts_*`` module per group of cases (``ANALYSES`` below maps each case to
its analysis) and ``claims_estimate`` (the full run's cost, in a quick run's report); this module writes
the files.
"""

from __future__ import annotations

import datetime
import json
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .claims_cases import CLAIMS, LFNN_AUTHORS, Case, ClaimsPlan
from .claims_estimate import estimate_lines
from .claims_figures import HOLDS, MIN_TOLERANCE, NOT, PARTLY, CaseReport, Context, Verdict, errors_of, not_run
from .claims_runs import TIMING, ClaimRun, command_text, final_runs, grid_of, tune_run, tuning_keys
from .claims_tables import table
from .claims_verdicts_bp import analyse_gait, analyse_gait_align, analyse_nan
from .claims_verdicts_external import analyse_external
from .claims_verdicts_local import analyse_bp_free, analyse_fixed_random, analyse_lfnn, analyse_memory
from .published import SEED_CLAIMS
from .report import machine_description, write_csv

ANALYSES: dict[str, Callable[[Context, Case], CaseReport]] = {
    "lfnn": analyse_lfnn, "bp-free": analyse_bp_free, "fixed-random": analyse_fixed_random, "memory": analyse_memory,
    "gait": analyse_gait, "gait-align": analyse_gait_align, "nan": analyse_nan, "external": analyse_external}


# ----- results.csv ----------------------------------------------------------------------------------------
def run_rows(ctx: Context) -> list[dict[str, Any]]:
    """One row per run folder of the plan, tuning runs included; the cases and row names that use it."""
    rows: dict[Path, dict[str, Any]] = {}

    def add(job: ClaimRun, case: str, label: str) -> None:
        folder = job.folder(ctx.out)
        if folder in rows:
            if case not in rows[folder]["cases"].split():
                rows[folder]["cases"] += f" {case}"
            return
        result = ctx.result(job) or {}
        errors = errors_of(result)
        seconds = result.get("seconds_per_epoch") or []
        steady = statistics.median(seconds[1:] if len(seconds) > 1 else seconds) if seconds else None
        steps = -(-int(result.get("train_samples") or 0) // job.setting.batch_size) if result.get("train_samples") else None
        rows[folder] = {
            "cases": case, "setting": job.setting.name, "stage": job.run.stage, "row": label, "rule": job.run.entry.rule,
            "arch": job.run.entry.arch, "options": " ".join(job.run.entry.options), "data": job.run.data,
            "evaluated_on": "validation" if job.run.stage == "tune" else "test", "seed": job.run.seed,
            "lr": job.run.lr, "epochs": result.get("epochs"), "status": result.get("status", "missing"),
            "final_error": errors[-1] if errors else None, "best_error": min(errors) if errors else None,
            "best_epoch": errors.index(min(errors)) + 1 if errors else None,
            "error_per_epoch": " ".join(f"{e:.2f}" for e in errors), "seconds_per_epoch": steady,
            "ms_per_step": 1000 * steady / steps if steady and steps else None,
            "train_samples": result.get("train_samples"), "command": command_text(job, ctx.out),
            "result_json": str(folder / "result.json")}

    for case in ctx.plan.cases:
        for key in tuning_keys(ctx.plan, [case]):
            setting = ctx.plan.settings[key[0]]
            for lr in grid_of(ctx.plan, key, ctx.out)[0]:
                add(tune_run(setting, key[1], key[2], lr), case.name, key[1].variant or key[1].label)
        for arm in case.arms:
            for job in final_runs(ctx.plan, arm, ctx.out):
                if job is not None:
                    add(job, case.name, arm.label)
    return list(rows.values())


# ----- RESULTS.md -----------------------------------------------------------------------------------------
def quickly(verdict: Verdict, plan: ClaimsPlan) -> Verdict:
    if plan.quick and verdict.read:
        verdict.evidence = "Not from the quick budget: read from results made elsewhere. " + verdict.evidence
    elif plan.quick and verdict.verdict in (HOLDS, PARTLY, NOT):
        verdict.verdict = f"quick budget, not a verdict (reads: {verdict.verdict})"
        verdict.evidence = ("Quick budget (2 epochs on 1,000-2,000 images, 1 seed, no tuning): this tests that the "
                            "suite runs, not the claim. " + verdict.evidence)
    return verdict


def escape(text: str) -> str:
    return text.replace("|", "\\|")


def verdict_table(plan: ClaimsPlan, verdicts: dict[str, Verdict]) -> list[str]:
    rows = []
    for claim in CLAIMS:
        v = verdicts[claim.key]
        paper = SEED_CLAIMS[claim.key]
        rows.append([claim.paper, escape(claim.text), escape(f"{paper.figure} [{paper.source}]"), escape(v.ours),
                     escape(v.bp), f"**{v.verdict}**", escape(v.evidence),
                     f"`{escape(v.command)}`" if v.command else "-", f"[{claim.case}](#case-{claim.case})"])
    return table(["paper", "claim", "published (source)", "ours (mean ± std over seeds)", "BP, same network and recipe",
                  "verdict", "evidence", "command (seed 0; the others differ in --seed and --out)", "case"], rows)


def timing_lines(out: Path) -> list[str]:
    path = out / TIMING
    if not path.exists():
        return []
    log = json.loads(path.read_text())
    lines = ["| started | command | wall | processes | their wall s | their CPU s | load average at end (1/5/15 min) |",
             "|---|---|---|---|---|---|---|"]
    for entry in log:
        lines.append(f"| {entry['started']} | `{entry['command']}` | {entry['wall_seconds'] / 60:.1f} min"
                     f"{' (interrupted)' if entry.get('interrupted') else ''} | {entry.get('processes', '-')} | "
                     f"{entry.get('process_wall_seconds', '-')} | {entry.get('process_cpu_seconds', '-')} | "
                     f"{' / '.join(f'{v:.2f}' for v in entry['load_average_at_end'])} |")
    return lines


def write_report(plan: ClaimsPlan, out: Path, command: str, resume_hint: str = "") -> dict:
    ctx = Context(plan, out)
    verdicts: dict[str, Verdict] = {}
    sections: list[str] = []
    for case in plan.cases:
        report = ANALYSES[case.name](ctx, case)
        for key in case.claims:
            verdicts[key] = quickly(report.verdicts.get(key) or not_run(ctx, case), plan)
        settings = list(dict.fromkeys(a.setting for a in (*case.arms, *(m.arm for m in case.measures))))
        sections += [f'<a id="case-{case.name}"></a>', f"### Case `{case.name}`: {case.title}", "",
                     f"Design: {case.design}", "",
                     *(f"- setting `{s}`: {plan.settings[s].description}." for s in settings), "",
                     *report.lines, "", *(f"![{p}]({p})" for p in report.plots), ""]
    rows = run_rows(ctx)
    write_csv(out / "results.csv", rows)
    write_csv(out / "verdicts.csv", [{"paper": c.paper, "claim": c.text, "case": c.case,
                                      "published": SEED_CLAIMS[c.key].figure, "source": SEED_CLAIMS[c.key].source,
                                      **{k: v for k, v in vars(verdicts[c.key]).items() if k != "read"}}
                                     for c in CLAIMS])
    done = sum(r["status"] in ("ok", "diverged") for r in rows)
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    budget = ("**Quick budget** (`--quick`): every case at 2 epochs on 1,000-2,000 images, 1 seed, no tuning. It checks "
              "that the suite runs end to end; its verdicts are marked and say nothing about the claims."
              if plan.quick else
              "Full budget: 3 seeds for every claim's rows (ablations 1), learning rates tuned on a validation split "
              "where a setting tunes; docs/bench.md gives each case's design and the CPU time.")
    lines = [
        "# The seed papers' claims, a verdict each", "",
        f"Command: `{command}`  ", f"Report written {now}; machine: {machine_description()}.", "",
        budget, "",
        f"Runs: {done} of {len(rows)} finished (results.csv); per case below its tables, plots and commands.", "",
        "## Verdicts", "", *verdict_table(plan, verdicts), "",
        "How a verdict is read: errors are test errors in %, mean ± sample std over seeds; two figures differ when "
        f"their means differ by more than the tolerance, twice the standard error of the difference and at least "
        f"{MIN_TOLERANCE} points (a published figure counts as exact). Each case's design says which outcome is "
        "'holds', 'holds partly' or 'does not hold'. 'cannot be tested here': the data or the scale is not on this "
        "machine. A published LFNN setting field by field: "
        + ", ".join(f"{k} {v}" for k, v in LFNN_AUTHORS.items()) + ".", "",
        "## Cases", "", *sections]
    if plan.quick:
        lines += ["## What the full run would cost", "", *estimate_lines(plan, ctx, rows), ""]
    timing = timing_lines(out)
    if timing:
        lines += ["## Time taken (each invocation of the command)", "", *timing, ""]
    if resume_hint:
        lines += [f"Resume or complete with: `{resume_hint}`", ""]
    (out / "RESULTS.md").write_text("\n".join(lines))
    plots = [p.name for p in sorted(out.glob("*.png"))]
    return {"rows": len(rows), "files": ["results.csv", "verdicts.csv", "RESULTS.md", *plots]}
