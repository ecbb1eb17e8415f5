"""Per-step statistics of gradient mixing: what the rule saw and did, digested and plotted.

The plugin records one row per mixed step from the single host transfer the rule needs anyway (so
recording is free); these functions turn the rows into per-experience means and PNGs.
"""
from __future__ import annotations

from pathlib import Path

#: Per-iteration statistics, in the order of one recorded row (``conflict`` is added: ``s < 0``).
STAT_NAMES: tuple[str, ...] = ("similarity", "w_h", "w_t", "norm_h", "norm_t", "loss_h", "loss_t")

Rows = dict[int, list[dict[str, float]]]


def summarize_stats(stats: Rows) -> dict[int, dict[str, float]]:
    """Per experience: iterations, mean of every statistic, fraction of conflicting steps (s < 0)."""
    out: dict[int, dict[str, float]] = {}
    for exp_id, rows in sorted(stats.items()):
        if not rows:
            continue
        n = len(rows)
        out[exp_id] = {"iterations": n, "conflict_fraction": sum(r["conflict"] for r in rows) / n}
        for name in STAT_NAMES:
            out[exp_id][f"mean_{name}"] = sum(r[name] for r in rows) / n
    return out


def plot_stats(stats: Rows, out_dir: str | Path, prefix: str = "gradient_mixing", rule: str = "") -> list[Path]:
    """One PNG per experience: similarity, weights, gradient norms and the running conflict fraction."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from incremental.io import save_figure

    paths = []
    for exp_id, rows in sorted(stats.items()):
        if not rows:
            continue
        it = list(range(len(rows)))
        col = {name: [r[name] for r in rows] for name in (*STAT_NAMES, "conflict")}
        running = [sum(col["conflict"][: i + 1]) / (i + 1) for i in it]
        fig, axes = plt.subplots(2, 2, figsize=(10, 6), sharex=True)
        ax = axes[0, 0]
        ax.plot(it, col["similarity"], lw=1)
        ax.axhline(0.0, color="grey", lw=0.8, ls="--")
        ax.set_ylabel("cosine s(g_h, g_t)")
        ax = axes[0, 1]
        ax.plot(it, col["w_h"], lw=1, label="w_h")
        ax.plot(it, col["w_t"], lw=1, label="w_t")
        ax.set_ylabel("weight")
        ax.legend(fontsize=8)
        ax = axes[1, 0]
        ax.plot(it, col["norm_h"], lw=1, label="|g_h|")
        ax.plot(it, col["norm_t"], lw=1, label="|g_t|")
        ax.set_ylabel("gradient norm")
        ax.set_yscale("log")
        ax.legend(fontsize=8)
        ax = axes[1, 1]
        ax.plot(it, running, lw=1)
        ax.set_ylim(0, 1)
        ax.set_ylabel("conflicting steps (running fraction)")
        for a in axes[1]:
            a.set_xlabel("iteration")
        for a in axes.flat:
            a.grid(alpha=0.3)
        fig.suptitle(f"gradient mixing ({rule}), experience {exp_id}: "
                     f"{100 * running[-1]:.0f}% of {len(rows)} steps conflicting")
        fig.tight_layout()
        paths.append(save_figure(Path(out_dir) / f"{prefix}_exp{exp_id}.png", fig, dpi=100))
    return paths
