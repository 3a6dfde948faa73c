"""The verdicts of the local-loss papers' cases, each from its runs' figures: LFNN (001: the authors' setting
with its ablations; LFNN-l against every BP-free rule) and fixed random classifiers (002: against FA and
BP; their memory and memory traffic).
"""

from __future__ import annotations

import statistics

from .claims_cases import NOT_BP_FREE, Case
from .claims_figures import (
    HOLDS,
    MIN_TOLERANCE,
    NOT,
    PARTLY,
    CaseReport,
    Context,
    Stats,
    Verdict,
    compare,
    fmt,
    not_run,
    seeds_text,
    tolerance,
)
from .claims_plots import plot_curves
from .claims_tables import ARM_HEADER, arm_rows, column_title, commands, grid, grid_table, table
from .plan import REFERENCE


# ----- case: LFNN -------------------------------------------------------------------------------------
def ablation_sentence(values: dict[str, float], target: float) -> str:
    if not values:
        return ""
    label, value = min(values.items(), key=lambda kv: kv[1])
    return f"the lowest error of any row or sub-case was {label} at {value:.2f} % (target {target:.2f} %)"


def analyse_lfnn(ctx: Context, case: Case) -> CaseReport:
    report = CaseReport()
    main = {a.label: a for a in case.arms if a.role == "main"}
    st = {label: ctx.stats(arm, "mnist") for label, arm in main.items()}
    ablations = [a for a in case.arms if a.role == "ablation"]
    published = 1.20
    report.lines += table(ARM_HEADER, arm_rows(ctx, case.arms))
    falls = [[f"`{arm.label}`", *fall_cells(ctx.stats(arm, "fashion-mnist"))]
             for arm in ablations if "fashion-mnist" in arm.datasets]
    if falls:
        report.lines += ["", "Epoch-to-epoch changes of the test error on Fashion-MNIST (the authors' setting):", "",
                         *table(["row", "epochs whose error rose > 0.5 points", "largest rise (points)",
                                 "mean |change| over the second half (points)"], falls)]
    readouts = [m for m in case.measures if m.kind == "readout"]
    rows = []
    for m in readouts:
        got = ctx.measure(case, m.name)
        if got:
            rows.append([f"`{m.arm.label}` seed {m.seed}", f"{100 * (1 - got['head']):.2f}",
                         " / ".join(f"{100 * (1 - a):.2f}" for a in got["workers_mean_logits"]),
                         " / ".join(f"{100 * (1 - a):.2f}" for a in got["workers_mean_probabilities"])])
    if rows:
        report.lines += ["", "Where the prediction is read from (test error %, final weights): the head `train` reports, "
                             "or the mean of each hidden block's 32 workers (block 1 / block 2):", "",
                         *table(["run", "head", "workers' mean logits", "workers' mean probabilities"], rows)]
    panels = [("MNIST (authors' setting)", [(a.label, ctx.stats(a, "mnist"), "-" if a.role == "main" else "--")
                                            for a in case.arms if "mnist" in a.datasets]),
              ("Fashion-MNIST", [(a.label, ctx.stats(a, "fashion-mnist"), "-")
                                 for a in case.arms if "fashion-mnist" in a.datasets])]
    plot_curves(report, ctx.out / f"{case.name}.png", panels,
                "LFNN, the authors' MNIST setting (784-256-128, Adam 5e-4, 50 epochs)")
    report.lines += ["", "Commands:", "", *commands(ctx, case.arms)]

    l, g, b = st.get("lfnn-l", Stats()), st.get("lfnn", Stats()), st.get("bp", Stats())
    if not (l.done and b.done):
        report.verdicts["lfnn-matches-bp"] = not_run(ctx, case)
        return report
    reach = l.mean <= published + tolerance(l.final)
    near_bp = compare(l.final, b.final) <= 0
    candidates = {"lfnn-l (final)": l.mean, "lfnn-l (best epoch)": statistics.mean(l.best)}
    if g.final:
        candidates.update({"lfnn (final)": g.mean, "lfnn (best epoch)": statistics.mean(g.best)})
    for arm in ablations:
        if "mnist" in arm.datasets:
            a = ctx.stats(arm, "mnist")
            if a.final:
                candidates[f"{arm.label} (final)"] = a.mean
                candidates[f"{arm.label} (best epoch)"] = statistics.mean(a.best)
    for rule in ("lfnn-l", "lfnn"):  # the same trained networks read from a block's workers instead of the head
        reads = [ctx.measure(case, m.name) for m in readouts if m.arm.label == rule]
        found = [read for read in reads if read]
        for block in range(len(found[0]["workers_mean_probabilities"]) if found else 0):
            candidates[f"{rule} read from block {block + 1}'s workers"] = statistics.mean(
                100 * (1 - read["workers_mean_probabilities"][block]) for read in found)
    others_reach = any(v <= published + MIN_TOLERANCE for k, v in candidates.items() if k != "lfnn-l (final)")
    verdict = HOLDS if reach else PARTLY if near_bp or others_reach else NOT
    ours = (f"lfnn-l {fmt(l.final)} final, {fmt(l.best)} best epoch; lfnn {fmt(g.final)} final, {fmt(g.best)} best "
            f"epoch ({seeds_text(len(l.final))})")
    evidence = (f"lfnn-l ends {l.mean - published:+.2f} points from the published {published:.2f} % and "
                f"{l.mean - b.mean:+.2f} from BP on the same net and recipe ({fmt(b.final)} %); "
                f"{ablation_sentence(candidates, published)}.")
    report.verdicts["lfnn-matches-bp"] = Verdict(ours, f"{fmt(b.final)} final, {fmt(b.best)} best epoch", verdict,
                                                 evidence, l.command)
    return report


def fall_cells(st: Stats) -> list[str]:
    if not st.curves:
        return ["not run", "-", "-"]
    rises, largest, half = [], [], []
    for curve in st.curves:
        changes = [b - a for a, b in zip(curve, curve[1:])]
        rises.append(sum(c > 0.5 for c in changes))
        largest.append(max([0.0, *changes]))
        tail = changes[len(changes) // 2:]
        half.append(statistics.mean(abs(c) for c in tail) if tail else 0.0)
    return [fmt(rises, 0), fmt(largest), fmt(half)]
# ----- cases: BP-free comparison and fixed random classifiers ------------------------------------------
def analyse_bp_free(ctx: Context, case: Case) -> CaseReport:
    report = CaseReport()
    columns = [(s, d) for s in ("mlp", "vgg") for d in ("mnist", "fashion-mnist")]
    cells = grid(ctx, case.arms, columns)
    report.lines += grid_table(ctx, cells, columns)
    panels = [(column_title(ctx, s, d), [(name, st, "-" if not name.startswith(REFERENCE) else
                                          "k--" if name == REFERENCE else "k:")
                                          for (name, s2, d2), st in cells.items() if (s2, d2) == (s, d)])
              for s, d in columns]
    plot_curves(report, ctx.out / f"{case.name}.png", panels,
                "LFNN-l against every BP-free rule (mean test error per epoch)")
    report.lines += ["", "Commands:", "", *commands(ctx, [a for a in case.arms if "mnist" in a.datasets])]

    ranks, evidence, ours, bp = [], [], [], []
    complete = True
    for setting in ("mlp", "vgg"):
        mine = cells.get(("lfnn-l", setting, "mnist"))
        others = {name: st for (name, s, d), st in cells.items()
                  if s == setting and d == "mnist" and name != "lfnn-l" and name.split(" ")[0] not in NOT_BP_FREE}
        reference = next((st for (name, s, d), st in cells.items() if s == setting and d == "mnist" and name == REFERENCE),
                         None)
        if mine is None or not mine.done or not all(st.done for st in others.values()):
            complete = False
            continue
        better = [name for name, st in others.items() if compare(st.final, mine.final) < 0]
        ties = [name for name, st in others.items() if compare(st.final, mine.final) == 0]
        order = sorted([*others.values(), mine], key=lambda st: st.mean)
        ranks.append((setting, better, ties))
        best_other = min(others.items(), key=lambda kv: kv[1].mean)
        ours.append(f"{setting.upper()} {fmt(mine.final)} (rank {order.index(mine) + 1} of {len(order)})")
        bp.append(f"{setting.upper()} {fmt(reference.final) if reference else '-'}")
        evidence.append(f"on the {setting.upper()} {len(better)} of {len(others)} BP-free rules beat lfnn-l beyond the "
                        f"tolerance and {len(ties)} tie (best: {best_other[0]} {best_other[1].mean:.2f} %)")
    if not complete:
        report.verdicts["lfnn-beats-bp-free"] = not_run(ctx, case)
        return report
    beats_all = all(not better and not ties for _, better, ties in ranks)
    best_somewhere = any(not better for _, better, _ in ranks)
    verdict = HOLDS if beats_all else PARTLY if best_somewhere else NOT
    report.verdicts["lfnn-beats-bp-free"] = Verdict(
        "lfnn-l MNIST error %: " + "; ".join(ours), "; ".join(bp), verdict,
        "On MNIST, " + "; ".join(evidence) + ".", cells[("lfnn-l", "mlp", "mnist")].command)
    return report


def analyse_fixed_random(ctx: Context, case: Case) -> CaseReport:
    report = CaseReport()
    columns = [(s, d) for s in ("mlp", "vgg") for d in ("mnist", "fashion-mnist")]
    cells = grid(ctx, case.arms, columns)
    report.lines += grid_table(ctx, cells, columns)
    summary, mnist_outcomes, closer, gaps = [], [], [], {}
    complete = True
    for setting, data in columns:
        lr_, fa, bp = (cells.get((n, setting, data)) for n in ("local-random", "fa", REFERENCE))
        if lr_ is None or fa is None or bp is None or not (lr_.done and fa.done and bp.done):
            complete = complete and data != "mnist"
            summary.append([column_title(ctx, setting, data), "not run", "-", "-"])
            continue
        outcome = compare(lr_.final, fa.final)
        word = {-1: "beats FA", 0: "ties FA", 1: "loses to FA"}[outcome]
        gap_lr, gap_fa = lr_.mean - bp.mean, fa.mean - bp.mean
        gaps[setting, data] = gap_lr
        summary.append([column_title(ctx, setting, data), f"{lr_.mean - fa.mean:+.2f} ({word})", f"{gap_lr:+.2f}",
                        f"{gap_fa:+.2f}"])
        if data == "mnist":
            mnist_outcomes.append((setting, outcome))
            closer.append(gap_lr < gap_fa)
    report.lines += ["", *table(["network, data", "local-random − fa (points)", "local-random − bp", "fa − bp"],
                                summary)]
    panels = [(column_title(ctx, s, d), [(name, st, "-") for (name, s2, d2), st in cells.items() if (s2, d2) == (s, d)])
              for s, d in columns]
    plot_curves(report, ctx.out / f"{case.name}.png", panels,
                "Fixed random classifiers vs FA vs BP (mean test error per epoch)")
    report.lines += ["", "Commands:", "", *commands(ctx, case.arms)]
    if not complete or not mnist_outcomes:
        report.verdicts["random-beats-fa"] = not_run(ctx, case)
        return report
    wins = [s for s, o in mnist_outcomes if o < 0]
    verdict = (HOLDS if len(wins) == len(mnist_outcomes) and all(closer) else
               NOT if all(o > 0 for _, o in mnist_outcomes) else PARTLY)
    widen = [f"{s.upper()} {gaps[s, 'mnist']:+.2f} -> {gaps[s, 'fashion-mnist']:+.2f}" for s in ("mlp", "vgg")
             if (s, "mnist") in gaps and (s, "fashion-mnist") in gaps]
    ours = "; ".join(f"{s.upper()} MNIST local-random {fmt(cells[('local-random', s, 'mnist')].final)} vs fa "
                     f"{fmt(cells[('fa', s, 'mnist')].final)}" for s, _ in mnist_outcomes)
    bp_text = "; ".join(f"{s.upper()} {fmt(cells[(REFERENCE, s, 'mnist')].final)}" for s, _ in mnist_outcomes)
    evidence = (f"local-random beats FA beyond the tolerance on {len(wins)} of {len(mnist_outcomes)} MNIST networks "
                f"and ends closer to BP than FA on {sum(closer)}" +
                (f"; its gap to BP from MNIST to Fashion-MNIST: {', '.join(widen)} points" if widen else "") + ".")
    report.verdicts["random-beats-fa"] = Verdict(ours, bp_text, verdict, evidence,
                                                 cells[("local-random", "mlp", "mnist")].command)
    return report


# ----- case: memory ----------------------------------------------------------------------------------
MEMORY_FIGURES = (("step_memory_mb", "step memory MB"), ("credit_bytes_moved_mb", "bytes moved MB (credit)"),
                  ("credit_weight_bytes_read_mb", "weight bytes read MB"), ("saved_activations_mb",
                                                                            "activations kept for backward MB"),
                  ("optimizer_bytes_moved_mb", "optimiser bytes moved MB"))


def analyse_memory(ctx: Context, case: Case) -> CaseReport:
    report = CaseReport()
    ratios: dict[tuple[str, str], dict[str, float]] = {}
    for setting in dict.fromkeys(m.arm.setting for m in case.measures):
        found = {m.arm.label: ctx.measure(case, m.name) for m in case.measures if m.arm.setting == setting}
        bp = found.get(REFERENCE)
        rows = []
        for label, got in found.items():
            if got is None:
                rows.append([f"`{label}`", *(["not run"] * len(MEMORY_FIGURES))])
                continue
            cells = []
            for key, _ in MEMORY_FIGURES:
                ratio = got[key] / bp[key] if bp and bp.get(key) else None
                if ratio is not None:
                    ratios.setdefault((setting, label), {})[key] = ratio
                cells.append(f"{got[key]:.2f}" + (f" ({ratio:.2f}x)" if ratio is not None else ""))
            rows.append([f"`{label}`", *cells])
        report.lines += [f"{setting.upper()}, batch 128, one step after warm-up (ratio to BP in brackets):", "",
                         *table(["rule", *(title for _, title in MEMORY_FIGURES)], rows), ""]
    report.lines += ["`local-random-layerwise` is measured in its first phase (block 1 trains, the others wait), the "
                     "phase its run starts in.", "",
                     "Bytes moved: every aten operation's inputs read and outputs written at their tensors' sizes "
                     "(views move nothing), the forward pass and the learning signals; the optimiser's update (the "
                     "same Adam for every rule) apart. An upper bound on DRAM traffic that sees no on-chip reuse: the "
                     "paper's argument (a layer's error is there as soon as its output is, so its activations need "
                     "not wait in memory for a backward pass) shows in the step memory, not in this count."]
    needed = [(setting, "local-random") for setting in ("mlp", "vgg")]
    if not all(key in ratios and "step_memory_mb" in ratios[key] for key in needed):
        report.verdicts["random-memory"] = not_run(ctx, case)
        return report
    memory = {s: ratios[s, "local-random"]["step_memory_mb"] for s, _ in needed}
    traffic = {s: ratios[s, "local-random"]["credit_bytes_moved_mb"] for s, _ in needed}
    both = all(v <= 0.5 for v in [*memory.values(), *traffic.values()])
    some = any(v <= 0.5 for v in [*memory.values(), *traffic.values()])
    verdict = HOLDS if both else PARTLY if some else NOT
    ours = "; ".join(f"{s.upper()} step memory {memory[s]:.2f}x, bytes moved {traffic[s]:.2f}x BP" for s in memory)
    evidence = (f"local-random's step memory is {min(memory.values()):.2f}-{max(memory.values()):.2f}x BP's and its "
                f"traffic {min(traffic.values()):.2f}-{max(traffic.values()):.2f}x (MLP, VGG; 'drastically' read as "
                f"at most half).")
    report.verdicts["random-memory"] = Verdict(ours, "1.00x (the reference)", verdict, evidence,
                                               memory_command(ctx, case))
    return report


def memory_command(ctx: Context, case: Case) -> str:
    got = next((m for m in case.measures if m.arm.label == "local-random" and m.arm.setting == "vgg"), None)
    log = got.file(ctx.out, case.name).with_suffix(".log") if got else None
    if log is None or not log.exists():
        return ""
    return "python -m localcredit.bench.claims_measure " + log.read_text().splitlines()[0].split("claims_measure ", 1)[-1]
