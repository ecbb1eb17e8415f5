"""Continual-learning metrics from the accuracy matrix R (pure functions, numbers in, numbers out).

``R[i][j]`` is the accuracy on test experience ``j`` after training experience ``i``. Definitions
follow Lopez-Paz & Ranzato (GEM, 2017) for BWT and Chaudhry et al. (RWalk, 2018) for forgetting.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


def _matrix(R: Sequence[Sequence[float]]) -> np.ndarray:
    m = np.asarray(R, dtype=np.float64)
    if m.ndim != 2 or m.shape[0] == 0:
        raise ValueError(f"accuracy matrix must be a non-empty 2-D table, got shape {m.shape}")
    return m


def average_accuracy(R: Sequence[Sequence[float]]) -> float:
    """Mean accuracy over all test experiences after the last training experience (last row)."""
    m = _matrix(R)
    return float(m[-1].mean())


def average_incremental_accuracy(R: Sequence[Sequence[float]]) -> float:
    """Mean over steps i of the mean accuracy on the experiences seen up to i (``R[i][:i+1]``)."""
    m = _matrix(R)
    return float(np.mean([m[i, : i + 1].mean() for i in range(m.shape[0])]))


def forgetting(R: Sequence[Sequence[float]]) -> float:
    """Mean over old experiences j < T-1 of (best accuracy on j before the last step) - (final accuracy on j).

    The best earlier accuracy is taken over steps j..T-2 (after j was learned). 0 with a single step.
    """
    m = _matrix(R)
    T = m.shape[0]
    if T < 2:
        return 0.0
    return float(np.mean([m[j : T - 1, j].max() - m[T - 1, j] for j in range(T - 1)]))


def backward_transfer(R: Sequence[Sequence[float]]) -> float:
    """BWT = mean over j < T-1 of R[T-1][j] - R[j][j] (negative = forgetting)."""
    m = _matrix(R)
    T = m.shape[0]
    if T < 2:
        return 0.0
    return float(np.mean([m[T - 1, j] - m[j, j] for j in range(T - 1)]))


def summarize(R: Sequence[Sequence[float]]) -> dict[str, float]:
    return {
        "average_accuracy": average_accuracy(R),
        "average_incremental_accuracy": average_incremental_accuracy(R),
        "forgetting": forgetting(R),
        "bwt": backward_transfer(R),
    }


def format_matrix(R: Sequence[Sequence[float]], row_label: str = "after exp", col_label: str = "test exp") -> str:
    """The accuracy matrix as a fixed-width text table (percentages)."""
    m = _matrix(R)
    header = f"{row_label:>10} | " + " ".join(f"{col_label[:4]} {j:<3d}" for j in range(m.shape[1]))
    lines = [header, "-" * len(header)]
    for i, row in enumerate(m):
        lines.append(f"{i:>10d} | " + " ".join(f"{100 * v:8.1f}" for v in row))
    return "\n".join(lines)
