"""Grid files: a base config, axes of ``--set`` values, and the cells they make.

A grid file (YAML)::

    base: ../configs/quickstart.yaml       # the base config, relative to this file
    set: {train.epochs: 5}                  # optional: overrides for every cell
    grid:                                   # axes: every combination is a cell
      strategy.plugins: [[{name: replay}], [{name: gradient_mixing, rule: pcgrad}]]
      strategy.history.mem_size: [200, 500]
    zip:                                    # optional: axes that move together (equal lengths)
      seed: [0, 1, 2]
      scenario.class_order: [[0,1,2,3,4,5,6,7,8,9], [9,8,7,6,5,4,3,2,1,0], [3,1,4,0,5,9,2,6,8,7]]
    torchrun: {nproc_per_node: 2}           # optional: every cell a data-parallel run
    submitit: {timeout_min: 60, slurm_partition: gpu, gpus_per_node: 2}   # optional, --launcher submitit

Keys are dotted config keys, exactly as ``incremental run --set``. ``zip`` may also be a list of such
mappings (several groups). A cell is named by its settings, ``strategy=replay,mem_size=200,seed=0``: the
last part of each key (the whole key where two axes would share it), and values made safe for a
directory name (a long value becomes a short hash of itself).
"""
from __future__ import annotations

import hashlib
import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import ConfigError, load_yaml

KNOWN_KEYS = ("base", "set", "grid", "zip", "torchrun", "submitit")
MAX_VALUE_CHARS = 40


@dataclass(frozen=True)
class Cell:
    """One run of the grid: its directory name and the ``--set`` overrides that make it."""

    name: str
    overrides: dict[str, Any]

    def set_args(self) -> list[str]:
        """``key=value`` strings for ``incremental run --set`` (values as JSON, which YAML reads back)."""
        return [f"{k}={json.dumps(v)}" for k, v in self.overrides.items()]


@dataclass
class GridSpec:
    path: Path
    base: Path
    fixed: dict[str, Any]
    axes: dict[str, list[Any]]
    zips: list[dict[str, list[Any]]]
    torchrun: dict[str, Any] = field(default_factory=dict)
    submitit: dict[str, Any] = field(default_factory=dict)

    def axis_keys(self) -> list[str]:
        return [*self.axes, *(k for group in self.zips for k in group)]

    def cells(self) -> list[Cell]:
        """Every combination of the axes (each zip group is one axis of tuples), in file order."""
        factors: list[list[dict[str, Any]]] = [[{key: v} for v in values] for key, values in self.axes.items()]
        for group in self.zips:
            keys = list(group)
            factors.append([dict(zip(keys, values)) for values in zip(*group.values())])
        short = short_names(self.axis_keys())
        cells = []
        for combo in itertools.product(*factors):
            overrides: dict[str, Any] = dict(self.fixed)
            settings: dict[str, Any] = {}
            for part in combo:
                settings.update(part)
            overrides.update(settings)
            name = ",".join(f"{short[k]}={value_token(v)}" for k, v in settings.items()) or "base"
            cells.append(Cell(name, overrides))
        return cells


def _short(key: str) -> str:
    parts = key.split(".")
    return parts[-2] if parts[-1] == "name" and len(parts) > 1 else parts[-1]  # strategy.name -> strategy


def short_names(keys: list[str]) -> dict[str, str]:
    """The last dotted part of each key (``strategy.name`` -> ``strategy``), or the whole key where two
    keys would share it."""
    last = [_short(k) for k in keys]
    return {k: (s if last.count(s) == 1 else k) for k, s in zip(keys, last)}


def describe(value: Any) -> str:
    """A config value as people write it: ``replay``, ``gradient_mixing(rule=pcgrad)+replay`` for a plugin
    list, ``3-1-2-0`` for a list of numbers, ``none`` for an empty list."""
    if isinstance(value, dict):
        if "name" in value:
            options = [f"{k}={describe(v)}" for k, v in value.items() if k != "name"]
            return str(value["name"]) + (f"({','.join(options)})" if options else "")
        return ",".join(f"{k}={describe(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        if not value:
            return "none"
        joiner = "+" if all(isinstance(v, dict) for v in value) else "-"
        return joiner.join(describe(v) for v in value)
    return str(value)


def value_token(value: Any) -> str:
    """A value as a safe directory-name token (:func:`describe`, other characters as ``_``; a long one is
    shortened and given a hash of the whole value)."""
    text = re.sub(r"[^A-Za-z0-9._+=-]+", "_", describe(value).replace(")", "")).strip("_") or "_"
    if len(text) > MAX_VALUE_CHARS:
        digest = hashlib.sha1(json.dumps(value, sort_keys=True).encode()).hexdigest()[:8]
        text = f"{text[:12]}~{digest}"
    return text


def _mapping(data: dict[str, Any], key: str, where: str) -> dict[str, Any]:
    value = data.get(key) or {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: {key}", f"must be a mapping, got {value!r}")
    return value


def _axes(mapping: dict[str, Any], where: str) -> dict[str, list[Any]]:
    axes = {}
    for key, values in mapping.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{where}.{key}", f"must be a non-empty list of values, got {values!r}")
        axes[str(key)] = values
    return axes


def load_grid(path: str | Path) -> GridSpec:
    """Read and check a grid file; every error is one line naming the file and the key."""
    path = Path(path)
    data = load_yaml(path)
    where = str(path)
    for key in data:
        if key not in KNOWN_KEYS:
            raise ConfigError(f"{where}: {key}", f"unknown key (known: {', '.join(KNOWN_KEYS)})")
    if not isinstance(data.get("base"), str):
        raise ConfigError(f"{where}: base", "must name the base config file (a path relative to the grid file)")
    base = (path.parent / data["base"]).resolve()
    if not base.is_file():
        raise ConfigError(f"{where}: base", f"config file {str(base)!r} does not exist")
    axes = _axes(_mapping(data, "grid", where), f"{where}: grid")
    raw_zip = data.get("zip") or []
    groups = raw_zip if isinstance(raw_zip, list) else [raw_zip]
    zips = []
    for n, group in enumerate(groups):
        label = f"{where}: zip" + (f"[{n}]" if isinstance(raw_zip, list) else "")
        if not isinstance(group, dict):
            raise ConfigError(label, f"must be a mapping of keys to equal-length lists, got {group!r}")
        zipped = _axes(group, label)
        lengths = {k: len(v) for k, v in zipped.items()}
        if len(set(lengths.values())) > 1:
            raise ConfigError(label, f"zipped axes must have equal lengths, got {lengths}")
        zips.append(zipped)
    keys = [*axes, *(k for g in zips for k in g)]
    fixed = {str(k): v for k, v in _mapping(data, "set", where).items()}
    for key in keys:
        if keys.count(key) > 1:
            raise ConfigError(f"{where}: {key}", "appears in more than one axis")
        if key in fixed:
            raise ConfigError(f"{where}: {key}", "is both an axis and a fixed 'set' value")
    spec = GridSpec(path, base, fixed, axes, zips, _mapping(data, "torchrun", where), _mapping(data, "submitit", where))
    names = [c.name for c in spec.cells()]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise ConfigError(where, f"two cells would share the directory name {dup!r}; use values that differ more")
    return spec
