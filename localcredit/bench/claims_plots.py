"""The claims report's plots (image files only): a case's rows' test error per epoch, and alignment with
BP per layer over training.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator, ScalarFormatter  # noqa: E402

from .claims_figures import CaseReport, Stats  # noqa: E402


def plot_curves(report: CaseReport, path: Path, panels: Sequence[tuple[str, Sequence[tuple[str, Stats, str]]]],
                title: str) -> None:
    """One axes per panel (a network and data set), every row's mean test error per epoch on it; no file
    while no run has finished."""
    panels = [(name, [line for line in lines if line[1].curves]) for name, lines in panels]
    panels = [panel for panel in panels if panel[1]]
    if not panels:
        path.unlink(missing_ok=True)
        return
    columns = min(2, len(panels))
    rows = -(-len(panels) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(7.5 * columns, 5.2 * rows), squeeze=False)
    cmap = plt.get_cmap("tab20")
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, (name, lines) in zip(axes.flat, panels):
        for i, (label, st, style) in enumerate(lines):
            length = min(len(c) for c in st.curves)
            mean = [statistics.mean(c[e] for c in st.curves) for e in range(length)]
            colour = "black" if style.startswith("k") else cmap([*range(0, 20, 2), *range(1, 20, 2)][i % 20])
            ax.plot(range(1, length + 1), mean, style.lstrip("k"), color=colour, label=label,
                    marker="o" if length < 15 else None, markersize=3)
        ax.set_title(name)
        ax.set_xlabel("epoch")
        ax.set_ylabel("test error % (mean over seeds)")
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_minor_formatter(ScalarFormatter())
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize="x-small", ncols=2)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    report.plots.append(path.name)


def plot_alignment(report: CaseReport, path: Path, drawn: dict[str, dict]) -> None:
    """Each measured rule's cosine with BP's gradient per layer over training, a line per layer; no file
    while nothing is measured."""
    path.unlink(missing_ok=True)
    if drawn:
        fig, ax = plt.subplots(figsize=(8, 4.8))
        for style, (rule, got) in zip(("-", "--", ":"), drawn.items()):
            steps = [p["step"] for p in got["curve"]]
            layers = len(got["curve"][0]["cosine"])
            for l in range(layers):
                ax.plot(steps, [p["cosine"][l] for p in got["curve"]], style,
                        color=plt.get_cmap("viridis")(l / max(1, layers - 1)), label=f"{rule} layer {l + 1}")
        ax.set_xlabel("training step")
        ax.set_ylabel("cosine with BP's gradient")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="x-small", ncols=2)
        ax.set_title("Alignment with BP per layer over training, depth 7")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        report.plots.append(path.name)
