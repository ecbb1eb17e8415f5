"""``incremental report DIR``: one table over a folder of runs (Markdown, CSV, JSON) and plots.

The table has one row per setting: the setting's values, the number of runs (seeds), and mean ± std
over them of average accuracy, average incremental accuracy, forgetting, BWT and wall time. The plots:
bars with error bars per setting, accuracy against every numeric setting key (memory size, ...), and the
per-experience curve (accuracy on the experiences seen so far after each step) per setting.
"""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any, Sequence

from ..io import write_json, write_text
from .collect import METRICS, Group, find_runs, group_runs
from .spec import describe, short_names

PERCENT = {"avg_acc", "avg_inc_acc", "forgetting", "bwt"}


class ReportError(Exception):
    """Nothing to report (the CLI turns it into a one-line error, exit code 2)."""


def _cell(mean: float, std: float | None, column: str) -> str:
    if math.isnan(mean):
        return "—"
    scale, digits = (100.0, 1) if column in PERCENT else (1.0, 1)
    text = f"{scale * mean:.{digits}f}"
    return text + (f" ± {scale * std:.{digits}f}" if std is not None else "")


def build_table(groups: Sequence[Group], keys: Sequence[str]) -> list[dict[str, Any]]:
    """One dict per setting: the setting, ``n``, ``seeds`` (a seed appears once per pooled replicate)
    and ``<metric>_mean`` / ``<metric>_std``."""
    rows = []
    for g in groups:
        row: dict[str, Any] = {k: g.setting[k] for k in keys}
        row["n"] = len(g.runs)
        row["seeds"] = sorted((r.seed for r in g.runs), key=str)
        for metric, column in METRICS.items():
            mean, std, _ = g.stats(metric)
            row[f"{column}_mean"] = None if math.isnan(mean) else mean
            row[f"{column}_std"] = std
        rows.append(row)
    return rows


def markdown(rows: Sequence[dict[str, Any]], keys: Sequence[str]) -> str:
    short = short_names(list(keys))
    columns = [c for c in METRICS.values() if any(r.get(f"{c}_mean") is not None for r in rows)]
    titles = {"avg_acc": "avg acc (%)", "avg_inc_acc": "avg inc. acc (%)", "forgetting": "forgetting (%)",
              "bwt": "BWT (%)", "time_s": "time (s)"}
    header = [short[k] for k in keys] + ["n"] + [titles[c] for c in columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for r in rows:
        cells = [describe(r[k]) for k in keys] + [str(r["n"])]
        cells += [_cell(r[f"{c}_mean"] if r[f"{c}_mean"] is not None else math.nan, r[f"{c}_std"], c) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def csv_text(rows: Sequence[dict[str, Any]]) -> str:
    buf = io.StringIO()
    if rows:
        writer = csv.DictWriter(buf, list(rows[0]))
        writer.writeheader()
        for r in rows:
            writer.writerow({k: ("" if v is None else v if isinstance(v, (int, float, str)) else describe(v))
                             for k, v in r.items()})
    return buf.getvalue()


def write_report(root: str | Path, out: str | Path | None = None, plots: bool = True,
                 pool: Sequence[str] = (), paired: str | None = None) -> tuple[str, list[Path]]:
    """Aggregate every run under ``root``; writes ``report.{md,csv,json}`` and PNGs to ``out``
    (default ``root/report``). ``pool``: config keys whose runs count as replicates of one setting, as
    seeds do. ``paired``: a setting key whose values are compared seed by seed against its first value
    (:mod:`incremental.grids.paired`; also ``paired.md``). Returns the Markdown text and the files written."""
    root = Path(root)
    runs = find_runs(root)
    if not runs:
        raise ReportError(f"no results.json under {root}")
    unknown = [k for k in pool if not any(k in r.config for r in runs)]
    if unknown:
        raise ReportError(f"--pool {unknown[0]}: no run under {root} has this config key (keys as in --set)")
    keys, groups = group_runs(runs, pool)
    if paired is not None and paired not in keys:
        raise ReportError(f"--paired {paired}: not a setting key of the runs under {root} "
                          f"(their settings differ in: {', '.join(keys) or 'nothing but the seed'})")
    rows = build_table(groups, keys)
    out = Path(out) if out is not None else root / "report"
    table = markdown(rows, keys)
    over = " and ".join(["seeds", *pool])
    header = f"{len(runs)} runs under {root}, {len(groups)} settings (mean ± sample std over {over})"
    text = f"{header}\n\n{table}"
    pairs: list[dict[str, Any]] = []
    if paired is not None:
        from .paired import paired_markdown, paired_rows

        pairs = paired_rows(groups, keys, paired, pool)
        text += (f"\n\nPaired by seed against {paired} = {describe(groups[0].setting[paired])} (other − reference, "
                 f"points; 95% t interval):\n\n{paired_markdown(pairs, keys, paired)}")
    files = [
        write_text(out / "report.md", f"{text}\n"),
        write_text(out / "report.csv", csv_text(rows)),
        write_json(out / "report.json", {"root": str(root), "setting_keys": keys, "pooled": list(pool), "rows": rows,
                                         "paired_key": paired, "paired": pairs,
                                         "runs": [str(r.path.relative_to(root)) for r in runs]}),
    ]
    if plots:
        from .report_plots import plot_all

        files += plot_all(groups, keys, out)
    return text, files
