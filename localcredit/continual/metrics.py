"""The continual-learning metrics, from the accuracy matrix R (Lopez-Paz & Ranzato 2017; Chaudhry et al. 2018).

R[t][i] is the test accuracy on task i after training tasks 0..t (0-based, T tasks):

* average accuracy   = mean_i R[T-1][i]
* forgetting         = mean over i < T-1 of ( max_{t < T-1} R[t][i] - R[T-1][i] )
* backward transfer  = mean over i < T-1 of ( R[T-1][i] - R[i][i] )
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


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


def summarise(matrix: Sequence[Sequence[float]]) -> dict[str, Any]:
    return {"accuracy_matrix": [list(row) for row in matrix], "average_accuracy": average_accuracy(matrix),
            "forgetting": forgetting(matrix), "backward_transfer": backward_transfer(matrix)}
