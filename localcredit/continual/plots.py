"""The figures of a continual run: the accuracy matrix as a heat-map, and accuracy over training steps."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_matrix(matrix: list[list[float]], title: str, path: Path) -> None:
    """Heat-map of R[t][i] with the values written in the cells."""
    plt = _pyplot()
    size = len(matrix[0])
    fig, ax = plt.subplots(figsize=(0.9 * size + 2.5, 0.8 * len(matrix) + 2))
    image = ax.imshow(matrix, vmin=0, vmax=1, cmap="viridis")
    for t, row in enumerate(matrix):
        for i, value in enumerate(row):
            ax.text(i, t, f"{value:.2f}", ha="center", va="center", color="white" if value < 0.6 else "black",
                    fontsize=8)
    ax.set_xticks(range(size), [f"task {i + 1}" for i in range(size)])
    ax.set_yticks(range(len(matrix)), [f"after {t + 1}" for t in range(len(matrix))])
    ax.set_xlabel("evaluated on")
    ax.set_ylabel("trained up to")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="test accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_curve(curve: list[dict[str, Any]], title: str, path: Path) -> None:
    """Each task's test accuracy against the training step, from the step its task began; task switches dashed."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4))
    tasks = max(point["task"] for point in curve) + 1
    for i in range(tasks):
        points = [(p["global_step"], p["accuracy"][i]) for p in curve if len(p["accuracy"]) > i]
        ax.plot([s for s, _ in points], [a for _, a in points], label=f"task {i + 1}", linewidth=1.2)
    for point in curve:
        if point["step"] == 0 and point["task"] > 0:
            ax.axvline(point["global_step"], color="grey", linestyle="--", linewidth=0.6)
    ax.set_xlabel("training step")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_run(result: dict[str, Any], out_dir: Path, title: str) -> None:
    plot_matrix(result["accuracy_matrix"], title, out_dir / "accuracy_matrix.png")
    if result.get("accuracy_curve"):
        plot_curve(result["accuracy_curve"], title, out_dir / "accuracy_curve.png")
