"""The Markdown that the claims report's cases share: a table, a case's rows with their figures and their
commands, and the grid of rules x (network, data set) of the BP-free and fixed-random cases.
"""

from __future__ import annotations

from collections.abc import Sequence

from .claims_cases import Arm
from .claims_figures import Context, Stats, cell, seeds_text


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(row) + " |" for row in rows)]


def data_title(data: str) -> str:
    return {"mnist": "MNIST", "fashion-mnist": "Fashion-MNIST", "cifar10": "CIFAR-10", "svhn": "SVHN"}.get(data, data)


def arm_rows(ctx: Context, arms: Sequence[Arm], best: bool = True) -> list[list[str]]:
    rows = []
    for arm in arms:
        for data in arm.datasets:
            st = ctx.stats(arm, data)
            rows.append([f"`{arm.label}`", data_title(data), str(arm.seeds), "-" if st.lr is None else f"{st.lr:.3g}",
                         cell(st), *([cell(st, best=True)] if best else []), arm.note or arm.role])
    return rows


ARM_HEADER = ["row", "data", "seeds", "lr", "final-epoch test error %", "best-epoch test error % (epoch)", "what it is"]

def commands(ctx: Context, arms: Sequence[Arm]) -> list[str]:
    """Each row's command, seed 0 (the others differ in --seed and --out only)."""
    lines = []
    for arm in arms:
        for data in arm.datasets:
            st = ctx.stats(arm, data)
            if st.command:
                lines.append(f"- `{arm.label}` ({data_title(data)}, {seeds_text(arm.seeds)}): `{st.command}`")
    return lines


def row_name(arm: Arm, ctx: Context) -> str:
    """A rule's row across networks: the rule (and variant), '[invertible]' where it trains its own network."""
    setting = ctx.plan.settings[arm.setting]
    name = "local-random layerwise" if arm.entry.variant == "local-random-layerwise" else arm.entry.variant or arm.entry.rule
    return name if arm.entry.arch == setting.arch else f"{name} [invertible net]"


def grid(ctx: Context, arms: Sequence[Arm], columns: Sequence[tuple[str, str]]) -> dict[tuple[str, str, str], Stats]:
    """(row name, setting, data) -> Stats of the arms on those settings and data sets."""
    cells = {}
    for arm in arms:
        for setting, data in columns:
            if arm.setting == setting and data in arm.datasets:
                cells[row_name(arm, ctx), setting, data] = ctx.stats(arm, data)
    return cells


def column_title(ctx: Context, setting: str, data: str) -> str:
    return f"{setting.upper() if setting in ('mlp', 'vgg') else setting} {data_title(data)}"


def grid_table(ctx: Context, cells: dict, columns: Sequence[tuple[str, str]]) -> list[str]:
    names = list(dict.fromkeys(key[0] for key in cells))
    rows = []
    for name in names:
        row = [f"`{name}`"]
        for setting, data in columns:
            st = cells.get((name, setting, data))
            row.append("-" if st is None else cell(st) + (f" [lr {st.lr:.3g}]" if st.lr else ""))
        rows.append(row)
    return table(["row", *(column_title(ctx, s, d) + " error %" for s, d in columns)], rows)
