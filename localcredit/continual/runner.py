"""Continual learning: train tasks in sequence with any rule, evaluate every task after each.

The strategy is plain fine-tuning (Avalanche's "Naive"): the same rule, network and optimiser
state carry on from task to task, with no replay or regularisation, so the numbers measure how
much each *learning rule* forgets by itself. Metrics follow the definitions of METHODS.md:
with R[t][i] the test accuracy on task i after training task t (0-based, T tasks),

* average accuracy   = mean_i R[T-1][i]
* forgetting         = mean over i < T-1 of ( max_{t < T-1} R[t][i] - R[T-1][i] )
* backward transfer  = mean over i < T-1 of ( R[T-1][i] - R[i][i] )
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from ..rules.base import Rule
from ..training.checkpoint import write_json
from ..training.config import TrainConfig
from ..training.trainer import Trainer
from .scenarios import Task


def average_accuracy(matrix: Sequence[Sequence[float]]) -> float:
    return sum(matrix[-1]) / len(matrix[-1])


def forgetting(matrix: Sequence[Sequence[float]]) -> float | None:
    """Mean drop from each earlier task's best accuracy to its final one (None with a single task)."""
    last = len(matrix) - 1
    if last == 0:
        return None
    drops = [max(matrix[t][i] for t in range(last)) - matrix[last][i] for i in range(last)]
    return sum(drops) / len(drops)


def backward_transfer(matrix: Sequence[Sequence[float]]) -> float | None:
    """Mean change of each earlier task's accuracy from just after learning it to the end."""
    last = len(matrix) - 1
    if last == 0:
        return None
    return sum(matrix[last][i] - matrix[i][i] for i in range(last)) / last


def evaluate_task(rule: Rule, task: Task, batch_size: int = 2000) -> float:
    """Test accuracy on one task, with its own head when the scenario gives the task id."""
    rule.restrict_outputs(task.head_classes)
    x, y = task.data.x_test, task.data.y_test
    with torch.no_grad():
        correct = sum((rule.predict(x[s:s + batch_size]) == y[s:s + batch_size]).sum().item()
                      for s in range(0, len(x), batch_size))
    rule.restrict_outputs(None)
    return correct / len(x)


def run_stream(rule: Rule, stream: Sequence[Task], config: TrainConfig) -> list[list[float]]:
    """Train every task in order; after each, evaluate all tasks. Returns the accuracy matrix R."""
    matrix = []
    bar = tqdm(stream, desc="tasks", unit="task", disable=not config.progress or None, leave=False)
    for task in bar:
        rule.restrict_outputs(task.head_classes)
        # Each task gets its own shuffling seed; the rule and its optimisers carry over.
        task_config = TrainConfig(epochs=config.epochs, batch_size=config.batch_size,
                                  seed=config.seed * 1000 + task.index, limit_train=config.limit_train,
                                  progress=config.progress)
        Trainer(rule, task.data, task_config).fit()
        matrix.append([evaluate_task(rule, other) for other in stream])
    rule.restrict_outputs(None)
    return matrix


def summarise(matrix: list[list[float]]) -> dict[str, Any]:
    return {"accuracy_matrix": matrix, "average_accuracy": average_accuracy(matrix),
            "forgetting": forgetting(matrix), "backward_transfer": backward_transfer(matrix)}


def plot_matrix(matrix: list[list[float]], title: str, path: Path) -> None:
    """Heat-map of R[t][i] with the values written in the cells."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    size = len(matrix)
    fig, ax = plt.subplots(figsize=(1.2 * size + 2.5, 1.0 * size + 2))
    image = ax.imshow(matrix, vmin=0, vmax=1, cmap="viridis")
    for t in range(size):
        for i in range(size):
            ax.text(i, t, f"{matrix[t][i]:.2f}", ha="center", va="center",
                    color="white" if matrix[t][i] < 0.6 else "black", fontsize=9)
    ax.set_xticks(range(size), [f"task {i + 1}" for i in range(size)])
    ax.set_yticks(range(size), [f"after {t + 1}" for t in range(size)])
    ax.set_xlabel("evaluated on")
    ax.set_ylabel("trained up to")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="test accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save(result: dict[str, Any], out_dir: Path, title: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "result.json", result)
    plot_matrix(result["accuracy_matrix"], title, out_dir / "accuracy_matrix.png")
