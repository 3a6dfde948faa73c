"""The verdicts of the claims on data this machine may lack (CIFAR-10, SVHN: run on user-supplied data when
it is present) or cannot reach (ImageNet: "cannot be tested here").
"""

from __future__ import annotations

from .claims_cases import NOT_BP_FREE, Case
from .claims_figures import (
    HOLDS,
    NOT,
    PARTLY,
    UNTESTABLE,
    CaseReport,
    Context,
    Verdict,
    compare,
    fmt,
    not_run,
    tolerance,
)
from .claims_tables import ARM_HEADER, arm_rows, commands, data_title, table
from .plan import REFERENCE


# ----- case: CIFAR-10, SVHN, ImageNet ----------------------------------------------------------------------
def analyse_external(ctx: Context, case: Case) -> CaseReport:
    report = CaseReport()
    absent = [d for d in ("cifar10", "svhn") if d not in ctx.plan.present]
    missing = (f"{' and '.join(data_title(d) for d in absent)} not on this machine (`localcredit datasets` says where "
               "to put them; then rerun with `--cases external --resume`)") if absent else ""
    imagenet = "ImageNet-scale training is out of reach of this 2-core CPU machine: no run is planned"
    if case.arms:
        report.lines += table(ARM_HEADER, arm_rows(ctx, case.arms))
        report.lines += ["", "Commands:", "", *commands(ctx, case.arms)]
    else:
        report.lines += [f"No run: {missing}. {imagenet}."]

    def untested(why: str) -> Verdict:
        return Verdict("-", "-", UNTESTABLE, why + ".")

    stats = {a.label: (a, ctx.stats(a, a.datasets[0])) for a in case.arms}
    cifar = {label: st for label, (a, st) in stats.items() if a.datasets == ("cifar10",)}
    if "cifar10" in ctx.plan.present and cifar:
        mine, bp = cifar.get("lfnn-l [vgg]"), cifar.get("bp [vgg]")
        others = {k: v for k, v in cifar.items() if k.split(" ")[0] not in (*NOT_BP_FREE, "lfnn-l") and "[vgg]" in k}
        if mine and bp and mine.done and all(o.done for o in others.values()):
            better = [k for k, o in others.items() if compare(o.final, mine.final) < 0]
            verdict = HOLDS if not better and compare(mine.final, bp.final) <= 0 else PARTLY if not better else NOT
            report.verdicts["lfnn-cifar-imagenet"] = Verdict(
                f"CIFAR-10 lfnn-l [vgg] {fmt(mine.final)}", fmt(bp.final), verdict,
                f"On CIFAR-10 {len(better)} of {len(others)} BP-free rules beat lfnn-l; {imagenet}.", mine.command)
        else:
            report.verdicts["lfnn-cifar-imagenet"] = not_run(ctx, case)
    else:
        report.verdicts["lfnn-cifar-imagenet"] = untested(f"{missing or 'no CIFAR-10 run'}; {imagenet}")
    cells = []
    for data, suffix in (("cifar10", ""), ("svhn", " svhn")):
        got = {name: stats.get(f"{name} [vgg]{suffix}") for name in ("local-random", "fa", REFERENCE)}
        if all(v is not None and v[1].done for v in got.values()):
            lr_, fa, bp = (got[n][1] for n in ("local-random", "fa", REFERENCE))  # type: ignore[index]
            cells.append((data, compare(lr_.final, fa.final), lr_, fa, bp))
    if cells:
        verdict = HOLDS if all(o < 0 for _, o, *_ in cells) else NOT if all(o > 0 for _, o, *_ in cells) else PARTLY
        report.verdicts["random-cifar-svhn"] = Verdict(
            "; ".join(f"{data_title(d)} local-random {fmt(a.final)} vs fa {fmt(f.final)}" for d, _, a, f, _ in cells),
            "; ".join(f"{data_title(d)} {fmt(b.final)}" for d, *_, b in cells), verdict,
            f"local-random beats FA beyond the tolerance on {sum(o < 0 for _, o, *_ in cells)} of {len(cells)} data "
            f"sets{'; ' + missing if missing else ''}.", cells[0][2].command)
    else:
        report.verdicts["random-cifar-svhn"] = untested(missing or "the CIFAR-10/SVHN runs are not finished")
    deep = {k: v for k, v in cifar.items() if "deep invertible" in k}
    g, b = deep.get("gaitprop [deep invertible]"), deep.get("bp [deep invertible]")
    if g and b and g.done and b.done:
        gap = g.mean - b.mean
        report.verdicts["gait-imagenet"] = Verdict(
            f"CIFAR-10 gaitprop [deep invertible] {fmt(g.final)}", fmt(b.final),
            HOLDS if gap <= max(tolerance(g.final, b.final), 0.5) else PARTLY if gap <= 2 else NOT,
            f"On CIFAR-10 the deep MLP's gaitprop ends {gap:+.2f} points from BP; {imagenet}.", g.command)
    else:
        report.verdicts["gait-imagenet"] = untested(f"{missing or 'no CIFAR-10 run'}; {imagenet}")
    return report
