"""Paired differences between the values of one setting key, seed by seed (``incremental report --paired KEY``).

Runs of two settings that differ only in ``KEY`` and share a seed saw the same data, class order and
initialisation, so their difference removes most of the seed-to-seed spread that makes two means ± std
overlap. For every setting whose ``KEY`` is not the reference value (the first one in the grid's order),
the table gives, per metric, the mean ± std of ``other - reference`` over the shared seeds, the two-sided
95% t interval of that mean, and on how many seeds ``other`` was higher. A difference is outside the noise
when its interval excludes 0.
"""
from __future__ import annotations

import math
import statistics
from typing import Any, Sequence

from .collect import Group, value_key
from .spec import describe, short_names

#: The metrics compared (results.json key -> column title), in points.
PAIRED_METRICS = {"average_accuracy": "avg acc", "forgetting": "forgetting"}


def t_interval(diffs: Sequence[float], level: float = 0.95) -> tuple[float, float] | None:
    """Two-sided t interval of the mean of ``diffs`` (None below two values)."""
    if len(diffs) < 2:
        return None
    from scipy.stats import t

    half = float(t.ppf(0.5 + level / 2, len(diffs) - 1)) * statistics.stdev(diffs) / math.sqrt(len(diffs))
    mean = statistics.fmean(diffs)
    return mean - half, mean + half


def _replicate(run: Any, pool: Sequence[str]) -> str:
    """What identifies a replicate across settings: the seed, and the pooled keys' values."""
    return value_key([run.seed, *[run.config.get(k) for k in pool]])


def paired_rows(groups: Sequence[Group], keys: Sequence[str], key: str, pool: Sequence[str] = ()) -> list[dict[str, Any]]:
    """One row per (setting, non-reference value of ``key``): the differences against the reference."""
    if key not in keys:
        raise ValueError(key)
    reference = groups[0].setting[key]
    by_setting = {value_key(g.setting): g for g in groups}
    rows = []
    for g in groups:
        if value_key(g.setting[key]) == value_key(reference):
            continue
        base = by_setting.get(value_key({**g.setting, key: reference}))
        if base is None:
            continue
        base_runs = {_replicate(r, pool): r for r in base.runs}
        row: dict[str, Any] = {k: g.setting[k] for k in keys}
        row["reference"] = reference
        for metric in PAIRED_METRICS:
            diffs = [100.0 * (r.metrics[metric] - base_runs[rep].metrics[metric])
                     for r in g.runs if (rep := _replicate(r, pool)) in base_runs
                     and metric in r.metrics and metric in base_runs[rep].metrics]
            row[metric] = {
                "n": len(diffs),
                "mean": statistics.fmean(diffs) if diffs else None,
                "std": statistics.stdev(diffs) if len(diffs) > 1 else None,
                "ci95": t_interval(diffs),
                "higher": sum(d > 0 for d in diffs),
            }
        rows.append(row)
    return rows


def paired_markdown(rows: Sequence[dict[str, Any]], keys: Sequence[str], key: str) -> str:
    short = short_names(list(keys))
    others = [k for k in keys if k != key]
    header = [short[k] for k in others] + [f"{short[key]} − reference"]
    for title in PAIRED_METRICS.values():
        header += [f"Δ {title} (points)", "95% CI", "higher on"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for r in rows:
        cells = [describe(r[k]) for k in others] + [f"{describe(r[key])} − {describe(r['reference'])}"]
        for metric in PAIRED_METRICS:
            d = r[metric]
            if d["mean"] is None:
                cells += ["—", "—", "—"]
                continue
            spread = f" ± {d['std']:.2f}" if d["std"] is not None else ""
            ci = f"[{d['ci95'][0]:+.2f}, {d['ci95'][1]:+.2f}]" if d["ci95"] else "—"
            cells += [f"{d['mean']:+.2f}{spread}", ci, f"{d['higher']} of {d['n']}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
