"""Read a folder of runs (``results.json`` files, from a grid or made by hand) and aggregate over seeds.

Runs are grouped by the config values that differ between them (a *setting*), leaving out the seed
and any key that moves with the seed one-to-one (a class order zipped with the seed), and the
``logging`` section (it changes what is recorded, not what is learned). Every metric is reported as
mean and sample standard deviation (n - 1) over the runs of a setting.
"""
from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from .spec import describe

#: results.json key -> column name in the report
METRICS: dict[str, str] = {
    "average_accuracy": "avg_acc",
    "average_incremental_accuracy": "avg_inc_acc",
    "forgetting": "forgetting",
    "bwt": "bwt",
    "wall_time_s": "time_s",
}
IGNORED_PREFIXES = ("logging.",)


@dataclass
class Run:
    path: Path
    config: dict[str, Any]  # flattened: dotted key -> value
    metrics: dict[str, float]
    accuracy_matrix: list[list[float]] | None

    @property
    def seed(self) -> Any:
        return self.config.get("seed")


@dataclass
class Group:
    setting: dict[str, Any]
    runs: list[Run] = field(default_factory=list)

    def label(self, short: dict[str, str] | None = None) -> str:
        short = short or {}
        return ", ".join(f"{short.get(k, k)}={describe(v)}" for k, v in self.setting.items()) or "all runs"

    def stats(self, metric: str) -> tuple[float, float | None, int]:
        """Mean, sample std (None for a single run) and count of ``metric`` over the runs that report it."""
        values = [r.metrics[metric] for r in self.runs if metric in r.metrics and math.isfinite(r.metrics[metric])]
        if not values:
            return math.nan, None, 0
        return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None), len(values)

    def seen_accuracy_curves(self) -> list[list[float]]:
        """Per run: after each training step i, the mean accuracy on the experiences seen so far (R[i][:i+1])."""
        curves = []
        for r in self.runs:
            R = r.accuracy_matrix
            if R:
                curves.append([statistics.fmean(row[: i + 1]) for i, row in enumerate(R)])
        return curves


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def find_runs(root: str | Path) -> list[Run]:
    """Every ``results.json`` under ``root`` (hidden folders skipped), in the order of the grid's cells
    when ``root`` is a grid directory, else sorted by path."""
    root = Path(root)
    runs = []
    for path in sorted(root.rglob("results.json")):
        if any(part.startswith(".") for part in path.relative_to(root).parts):
            continue
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(data, dict):
            continue
        config = flatten(data.get("config") or {})
        if "seed" not in config and "seed" in data:
            config["seed"] = data["seed"]
        metrics = {k: float(data[k]) for k in METRICS if isinstance(data.get(k), (int, float))}
        runs.append(Run(path, config, metrics, data.get("accuracy_matrix")))
    manifest = root / "grid.json"
    if manifest.is_file():
        try:
            order = {name: k for k, name in enumerate(json.loads(manifest.read_text()).get("cells", {}))}
        except ValueError:
            order = {}
        runs.sort(key=lambda r: order.get(r.path.relative_to(root).parts[0], len(order)))
    return runs


def value_key(value: Any) -> str:
    """A config value as a hashable, order-independent key (settings are compared by it)."""
    return json.dumps(value, sort_keys=True, default=str)


def varying_keys(runs: Sequence[Run]) -> list[str]:
    """Config keys whose value differs between runs, in first-seen order (``logging.*`` left out)."""
    order: list[str] = []
    for r in runs:
        order += [k for k in r.config if k not in order]
    out = []
    for key in order:
        if key.startswith(IGNORED_PREFIXES):
            continue
        if len({value_key(r.config.get(key)) for r in runs}) > 1:
            out.append(key)
    return out


def moves_with_seed(runs: Sequence[Run], key: str) -> bool:
    """True when ``key``'s value and the seed determine each other (e.g. a class order zipped with the seed)."""
    forward: dict[str, str] = {}
    backward: dict[str, str] = {}
    for r in runs:
        s, v = value_key(r.seed), value_key(r.config.get(key))
        if forward.setdefault(s, v) != v or backward.setdefault(v, s) != s:
            return False
    return True


def group_runs(runs: Sequence[Run], pool: Sequence[str] = ()) -> tuple[list[str], list[Group]]:
    """The setting keys and the groups of runs sharing a setting (in order of first appearance).

    ``pool``: keys counted as replicates like the seed (their runs go into one mean ± std), for axes
    that only perturb a run: thread counts, a library draw, a data-order seed.
    """
    keys = [k for k in varying_keys(runs) if k != "seed" and k not in pool and not moves_with_seed(runs, k)]
    groups: dict[str, Group] = {}
    for r in runs:
        setting = {k: r.config.get(k) for k in keys}
        groups.setdefault(value_key(setting), Group(setting)).runs.append(r)
    return keys, list(groups.values())
