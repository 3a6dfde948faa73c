"""The verdicts of the cases whose papers claim BP's results: GAIT-prop (003: near BP at depth; its
per-layer alignment with BP over training) and NAN (000: equal to BP; forgetting less than BP, read from
the continual suite's results).
"""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

from .claims_cases import Case
from .claims_figures import HOLDS, NOT, PARTLY, CaseReport, Context, Verdict, fmt, not_run, tolerance
from .claims_plots import plot_alignment, plot_curves
from .claims_tables import ARM_HEADER, arm_rows, commands, data_title, table
from .plan import REFERENCE


# ----- cases: GAIT-prop --------------------------------------------------------------------------------
def analyse_gait(ctx: Context, case: Case) -> CaseReport:
    report = CaseReport()
    report.lines += table(ARM_HEADER, arm_rows(ctx, case.arms))
    datasets = list(dict.fromkeys(d for a in case.arms for d in a.datasets))
    panels = [(data_title(d), [(a.label, ctx.stats(a, d), "-" if a.role == "main" else "--")
                               for a in case.arms if d in a.datasets]) for d in datasets]
    plot_curves(report, ctx.out / f"{case.name}.png", panels,
                "GAIT-prop on the deep invertible MLP (1024 x 6) and the invertible conv net")
    report.lines += ["", "Commands:", "", *commands(ctx, case.arms)]
    main = {a.entry.rule: a for a in case.arms if a.role == "main"}
    deep = ctx.plan.settings[main["gaitprop"].setting]
    gaps, texts, bp_texts, others = [], [], [], []
    for data in deep.datasets:
        g, b = ctx.stats(main["gaitprop"], data), ctx.stats(main[REFERENCE], data)
        if not (g.done and b.done):
            report.verdicts["gait-near-bp"] = not_run(ctx, case)
            return report
        gap = g.mean - b.mean
        gaps.append((gap, tolerance(g.final, b.final)))
        texts.append(f"{data_title(data)} {fmt(g.final)}")
        bp_texts.append(f"{data_title(data)} {fmt(b.final)}")
        rest = [f"{name} {ctx.stats(main[name], data).mean:.2f}" for name in ("tp", "itp", "fa")
                if name in main and ctx.stats(main[name], data).final]
        others.append(f"{data_title(data)}: gaitprop {gap:+.2f} points from BP ({', '.join(rest)})")
    near = all(gap <= max(t, 0.5) for gap, t in gaps)
    verdict = HOLDS if near else PARTLY if any(gap <= 2.0 for gap, _ in gaps) else NOT
    conv = {a.entry.rule: a for a in case.arms if a.entry.arch == "invertible-conv"}
    conv_text = ""
    if "gaitprop" in conv and REFERENCE in conv:
        g, b = ctx.stats(conv["gaitprop"], "fashion-mnist"), ctx.stats(conv[REFERENCE], "fashion-mnist")
        if g.final and b.final:
            conv_text = f"; on the invertible conv net (Fashion-MNIST) {g.mean - b.mean:+.2f}"
    report.verdicts["gait-near-bp"] = Verdict(
        f"gaitprop [deep invertible] {'; '.join(texts)}", "; ".join(bp_texts), verdict,
        f"At depth 7, {'; '.join(others)}{conv_text} (trained {deep.epochs} epochs on "
        f"{deep.limit_train or 'all':,} images: cut from the paper's 200).",
        ctx.stats(main["gaitprop"], deep.datasets[0]).command)
    return report
def analyse_gait_align(ctx: Context, case: Case) -> CaseReport:
    report = CaseReport()
    curves = {m.arm.entry.rule: ctx.measure(case, m.name) for m in case.measures}
    drawn = {rule: got for rule, got in curves.items() if got}
    for rule, got in drawn.items():
        rows = [[str(p["step"]), f"{p['epoch']:.2f}", " / ".join(f"{c:.4f}" for c in p["cosine"])] for p in got["curve"]]
        report.lines += [f"`{rule}` on the deep invertible MLP ({got['data']}, lr {got['lr']}, seed {got['seed']}; "
                         f"test accuracy at the end {100 * got['test_accuracy']:.2f} %): cosine with BP per layer "
                         "(1 ... 7):", "", *table(["step", "epoch", "cosine per layer"], rows), ""]
    path = ctx.out / f"{case.name}.png"
    plot_alignment(report, path, drawn)
    gait = drawn.get("gaitprop")
    if not gait:
        report.verdicts["gait-credit"] = not_run(ctx, case)
        return report

    def after_first_epoch(curve: dict) -> list[float]:
        points = [p for p in curve["curve"] if p["epoch"] >= 1] or curve["curve"][-1:]
        return [min(p["cosine"][l] for p in points) for l in range(len(points[0]["cosine"]))]

    lows = after_first_epoch(gait)
    verdict = HOLDS if min(lows) >= 0.9 else PARTLY if min(lows) >= 0.5 else NOT
    itp = drawn.get("itp")
    contrast = f"; itp's: {' / '.join(f'{c:.3f}' for c in after_first_epoch(itp))}" if itp else ""
    report.verdicts["gait-credit"] = Verdict(
        "gaitprop, lowest cosine with BP per layer after epoch 1: " + " / ".join(f"{c:.3f}" for c in lows),
        "1 (the reference)", verdict,
        f"Over {gait['steps']} steps at depth 7 every layer's update stays at cosine >= {min(lows):.3f} with BP after "
        f"the first epoch{contrast}.", measure_command(ctx, case, "gaitprop"))
    return report

def measure_command(ctx: Context, case: Case, rule: str) -> str:
    """The command line of a case's measurement of ``rule``, as its log recorded it."""
    m = next((m for m in case.measures if m.arm.entry.rule == rule), None)
    log = m.file(ctx.out, case.name).with_suffix(".log") if m else None
    if log is None or not log.exists():
        return ""
    return "python -m localcredit.bench.claims_measure " + log.read_text().splitlines()[0].split("claims_measure ", 1)[-1]


# ----- case: NAN -----------------------------------------------------------------------------------------
def analyse_nan(ctx: Context, case: Case) -> CaseReport:
    report = CaseReport()
    arms = {a.entry.rule: a for a in case.arms}
    report.lines += table(ARM_HEADER, arm_rows(ctx, case.arms))
    rows, diffs, cosines = [], [], []
    complete = True
    for data in arms[REFERENCE].datasets:
        n, b = ctx.stats(arms["nan-bp"], data), ctx.stats(arms[REFERENCE], data)
        if not (n.done and b.done):
            complete = False
            continue
        for seed, (x, y) in enumerate(zip(n.final, b.final)):
            diffs.append(abs(x - y))
            rows.append([data_title(data), str(seed), f"{100 - y:.2f}", f"{100 - x:.2f}", f"{x - y:+.3f}"])
    report.lines += ["", "Test accuracy %, final epoch:", "",
                     *table(["data", "seed", "bp", "nan-bp", "nan-bp − bp error (points)"], rows)]
    for m in case.measures:
        got = ctx.measure(case, m.name)
        if got:
            cosines += [*got["init"], *got["final"]]
            report.lines += ["", f"nan-bp's cosine with BP per layer ({data_title(m.data)}, seed {m.seed}): at "
                                 f"initialisation {' / '.join(f'{c:.6f}' for c in got['init'])}; trained "
                                 f"{' / '.join(f'{c:.6f}' for c in got['final'])}"]
        else:
            complete = False
    panels = [(data_title(d), [(a.label, ctx.stats(a, d), "-" if a.entry.rule == REFERENCE else "--")
                               for a in case.arms]) for d in arms[REFERENCE].datasets]
    plot_curves(report, ctx.out / f"{case.name}.png", panels, "nan-bp vs bp (the curves should coincide)")
    report.lines += ["", "Commands:", "", *commands(ctx, case.arms)]
    if complete and diffs and cosines:
        worst, low = max(diffs), min(cosines)
        verdict = HOLDS if worst <= 0.1 and low >= 0.999 else PARTLY if worst <= 0.5 or low >= 0.99 else NOT
        report.verdicts["nan-equals-bp"] = Verdict(
            f"nan-bp accuracy − bp at most {worst:.3f} points over {len(diffs)} runs; cosine >= {low:.6f}",
            fmt(ctx.stats(arms[REFERENCE], "mnist").final) + " % error (MNIST)", verdict,
            f"Every nan-bp run ends within {worst:.3f} points of BP's test error on the same seed, and every layer's "
            f"update has cosine >= {low:.6f} with BP's gradient, at initialisation and trained.",
            ctx.stats(arms["nan-bp"], "mnist").command)
    else:
        report.verdicts["nan-equals-bp"] = not_run(ctx, case)
    forgetting, lines = forgetting_verdict()
    report.verdicts["nan-forgets-less"] = forgetting
    report.lines += ["", "Forgetting (read, not run, by this suite):", "", *lines]
    return report


#: Where the continual suite's results.csv may be (bench/continual_report.py writes it), first found wins.
CONTINUAL_RESULTS = (Path("runs/bench/continual/results.csv"), Path("results/continual/grid/results.csv"))
CONTINUAL_PROTOCOL = Path("results/continual/protocol")
CONTINUAL_TABLE = Path("results/continual/table.csv")
#: The commands that made each source of forgetting figures (their READMEs say so).
PROTOCOL_COMMAND = "python benchmarks/continual_protocol.py --out results/continual/protocol"
TABLE_COMMAND = ("python benchmarks/continual_experiment.py --out results/continual --seeds 3 --tasks 5 "
                 "(at commit a8aab30)")


def forgetting_verdict() -> tuple[Verdict, list[str]]:
    """NAN vs BP forgetting under naive fine-tuning, from the best source present (the row names it)."""
    for path in CONTINUAL_RESULTS:
        if path.exists():
            with open(path, newline="") as handle:
                rows = [r for r in csv.DictReader(handle) if r.get("stage") == "final" and r.get("strategy") == "naive"
                        and r.get("status") == "finished" and r.get("label") in ("nan", REFERENCE)]
            found: dict[str, dict[str, list[float]]] = {}
            for r in rows:
                found.setdefault(r["scenario"], {}).setdefault(r["label"], []).append(float(r["forgetting"]))
            if found:
                return _forgetting(found, f"the continual suite's `{path}` (naive fine-tuning, split MNIST)",
                                   f"localcredit bench --suite continual --out {path.parent}")
    protocol: dict[str, dict[str, list[float]]] = {}
    for scenario in ("split-task", "split-domain", "split-class"):
        for rule in ("nan", REFERENCE):
            path = CONTINUAL_PROTOCOL / scenario / f"{rule}-naive" / "result.json"
            if path.exists():
                forgetting = json.loads(path.read_text()).get("forgetting")
                if forgetting is not None:
                    protocol.setdefault(scenario, {})[rule] = [float(forgetting)]
    if any(len(v) == 2 for v in protocol.values()):
        # One seed each: METHODS.md measured single-seed differences of +-0.05 in forgetting as noise.
        return _forgetting({k: v for k, v in protocol.items() if len(v) == 2},
                           f"`{CONTINUAL_PROTOCOL}` (naive fine-tuning, split MNIST, van de Ven's protocol, one seed "
                           "each, so differences below 0.05 count as ties; the continual suite's results.csv was not "
                           "found)", PROTOCOL_COMMAND, floor=0.05)
    if CONTINUAL_TABLE.exists():
        with open(CONTINUAL_TABLE, newline="") as handle:
            table_rows = [r for r in csv.DictReader(handle) if r["rule"] in ("nan", REFERENCE)]
        found = {}
        for r in table_rows:
            mean, _, std = r["forgetting"].partition(" ± ")
            found.setdefault(r["scenario"], {})[r["rule"]] = [float(mean) + float(std or 0) * k
                                                              for k in _unit(int(r["seeds"]))]
        if found:
            return _forgetting(found, f"`{CONTINUAL_TABLE}` (plain fine-tuning, Fashion-MNIST, before strategies "
                                      "existed)", TABLE_COMMAND)
    return Verdict(evidence="No continual-learning results were found (`localcredit bench --suite continual` writes "
                            "them)."), []


def _unit(n: int) -> list[float]:
    """n numbers with mean 0 and sample std 1 (to carry a table's mean ± std into the tolerance)."""
    if n < 2:
        return [0.0]
    values = [i - (n - 1) / 2 for i in range(n)]
    scale = statistics.stdev(values)
    return [v / scale for v in values]


def _forgetting(found: dict[str, dict[str, list[float]]], source: str, command: str,
                floor: float = 0.0) -> tuple[Verdict, list[str]]:
    rows, outcomes, ours, bp = [], [], [], []
    for scenario, by_rule in found.items():
        if "nan" not in by_rule or REFERENCE not in by_rule:
            continue
        n, b = by_rule["nan"], by_rule[REFERENCE]
        # forgetting is a fraction and tolerance() works in points: scale in and out
        t = max(tolerance([v * 100 for v in n], [v * 100 for v in b]) / 100, floor, 0.005)
        d = statistics.mean(n) - statistics.mean(b)
        outcomes.append(-1 if d < -t else 1 if d > t else 0)
        word = {-1: "nan forgets less", 0: "a tie", 1: "nan forgets more"}[outcomes[-1]]
        rows.append([scenario, fmt(n, 3), fmt(b, 3), f"{d:+.3f} ({word})"])
        ours.append(f"{scenario} {fmt(n, 3)}")
        bp.append(f"{scenario} {fmt(b, 3)}")
    if not outcomes:
        return Verdict(evidence=f"{source} holds no nan and bp pair."), []
    verdict = HOLDS if all(o < 0 for o in outcomes) else NOT if all(o >= 0 for o in outcomes) else PARTLY
    evidence = (f"Source: {source}; nan forgets less than bp beyond the tolerance in {outcomes.count(-1)} of "
                f"{len(outcomes)} scenarios, more in {outcomes.count(1)}.")
    return (Verdict("forgetting " + "; ".join(ours), "; ".join(bp), verdict, evidence, command, read=True),
            [f"Source: {source}.", "", *table(["scenario", "nan forgetting", "bp forgetting", "difference"], rows)])
