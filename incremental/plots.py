"""PNG plots of results people would rather look at than read (matplotlib, headless backend)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .io import save_figure  # noqa: E402


def accuracy_heatmap(R: Sequence[Sequence[float]], path: str | Path, title: str = "Accuracy matrix") -> Path:
    """Heat map of R[i][j] (row: after training experience i, column: test experience j)."""
    m = np.asarray(R, dtype=float)
    fig, ax = plt.subplots(figsize=(1.0 + 0.8 * m.shape[1], 1.0 + 0.7 * m.shape[0]))
    im = ax.imshow(m, vmin=0.0, vmax=1.0, cmap="viridis")
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            ax.text(j, i, f"{100 * m[i, j]:.0f}", ha="center", va="center",
                    color="white" if m[i, j] < 0.6 else "black", fontsize=9)
    ax.set_xlabel("test experience")
    ax.set_ylabel("after training experience")
    ax.set_xticks(range(m.shape[1]))
    ax.set_yticks(range(m.shape[0]))
    ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    return save_figure(path, fig, dpi=110)


def line_plot(series: dict[str, Sequence[float]], path: str | Path, xlabel: str, ylabel: str, title: str,
              x: Sequence[float] | None = None) -> Path:
    """One line per named series (loss-weight curves, gradient statistics, AP against samples)."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, values in series.items():
        xs = list(x) if x is not None else list(range(len(values)))
        ax.plot(xs[: len(values)], list(values), marker="o" if len(values) < 30 else None, label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(path, fig, dpi=110)


def bar_chart(groups: dict[str, dict[str, float]], path: str | Path, ylabel: str, title: str) -> Path:
    """Grouped bars: ``groups[group][bar] = value`` (e.g. before/after for old/new classes)."""
    names = list(groups)
    bars = list(next(iter(groups.values())))
    width = 0.8 / max(len(bars), 1)
    fig, ax = plt.subplots(figsize=(1.5 + 1.2 * len(names), 4))
    for k, bar in enumerate(bars):
        values = [groups[g].get(bar, float("nan")) for g in names]
        pos = np.arange(len(names)) + (k - (len(bars) - 1) / 2) * width
        ax.bar(pos, values, width, label=bar)
        for p, v in zip(pos, values):
            if np.isfinite(v):
                ax.text(p, v, f"{v:.2f}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    finite = [v for g in groups.values() for v in g.values() if np.isfinite(v)]
    ax.set_ylim(0, max(finite + [1e-9]) * 1.15)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=len(bars), frameon=False)
    fig.tight_layout()
    return save_figure(path, fig, dpi=110)
