"""The report's plots: bars with error bars per setting, accuracy against numeric setting keys, and
per-experience curves (mean ± std over seeds)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ..io import save_figure  # noqa: E402
from .collect import Group  # noqa: E402
from .spec import describe, short_names  # noqa: E402


def bars(groups: Sequence[Group], keys: Sequence[str], path: Path) -> Path | None:
    """Average accuracy and forgetting per setting, bars at the mean, error bars at ± one std."""
    metrics = [("average_accuracy", "average accuracy"), ("forgetting", "forgetting")]
    metrics = [(m, t) for m, t in metrics if any(g.stats(m)[2] for g in groups)]
    if not metrics:
        return None
    short = short_names(list(keys))
    labels = [g.label(short) for g in groups]
    fig, axes = plt.subplots(1, len(metrics), figsize=(2.0 + 1.1 * len(groups) * len(metrics), 4.2), squeeze=False)
    for ax, (metric, title) in zip(axes[0], metrics):
        stats = [g.stats(metric) for g in groups]
        means = [100 * m if not math.isnan(m) else 0.0 for m, _, _ in stats]
        errs = [100 * (s or 0.0) for _, s, _ in stats]
        pos = np.arange(len(groups))
        ax.bar(pos, means, yerr=errs, capsize=4, color=plt.cm.tab10(pos % 10))
        for p, m, e in zip(pos, means, errs):
            ax.text(p, m + e if m >= 0 else m - e, f"{m:.1f}", ha="center", va="bottom" if m >= 0 else "top", fontsize=8)
        ax.axhline(0.0, color="grey", lw=0.8)
        ax.set_xticks(pos)
        ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel(f"{title} (%)")
        ax.set_title(f"{title} (mean ± std over seeds)", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return save_figure(path, fig, dpi=110)


def accuracy_against(groups: Sequence[Group], keys: Sequence[str], key: str, path: Path) -> Path | None:
    """Average accuracy against a numeric setting key, one line per value of the other keys."""
    others = [k for k in keys if k != key]
    short = short_names(list(keys))
    lines: dict[str, list[tuple[float, float, float]]] = {}
    for g in groups:
        x = g.setting.get(key)
        mean, std, n = g.stats("average_accuracy")
        if not isinstance(x, (int, float)) or isinstance(x, bool) or not n:
            continue
        label = ", ".join(f"{short[k]}={describe(g.setting[k])}" for k in others) or "runs"
        lines.setdefault(label, []).append((float(x), 100 * mean, 100 * (std or 0.0)))
    if not lines or max(len(v) for v in lines.values()) < 2:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for label, points in lines.items():
        points.sort()
        xs, ys, es = zip(*points)
        ax.errorbar(xs, ys, yerr=es, marker="o", capsize=4, label=label)
    ax.set_xlabel(key)
    ax.set_ylabel("average accuracy (%)")
    ax.set_title(f"average accuracy against {short[key]} (mean ± std over seeds)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(path, fig, dpi=110)


def per_experience(groups: Sequence[Group], keys: Sequence[str], path: Path) -> Path | None:
    """Accuracy on the experiences seen so far after each training step, mean ± std band per setting."""
    short = short_names(list(keys))
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    drawn = 0
    for g in groups:
        curves = g.seen_accuracy_curves()
        if not curves:
            continue
        length = min(len(c) for c in curves)
        data = np.array([c[:length] for c in curves]) * 100
        mean = data.mean(axis=0)
        std = data.std(axis=0, ddof=1) if len(data) > 1 else np.zeros(length)
        steps = np.arange(length)
        ax.plot(steps, mean, marker="o", label=g.label(short))
        ax.fill_between(steps, mean - std, mean + std, alpha=0.2)
        drawn += 1
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel("after training experience")
    ax.set_ylabel("accuracy on experiences seen so far (%)")
    ax.set_title("per-experience accuracy (mean ± std over seeds)", fontsize=10)
    ax.set_xticks(steps)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(path, fig, dpi=110)


def plot_all(groups: Sequence[Group], keys: Sequence[str], out: Path) -> list[Path]:
    paths: list[Any] = [bars(groups, keys, out / "accuracy_bars.png"), per_experience(groups, keys, out / "per_experience.png")]
    for key in keys:
        paths.append(accuracy_against(groups, keys, key, out / f"accuracy_vs_{key.replace('.', '_')}.png"))
    return [p for p in paths if p is not None]
