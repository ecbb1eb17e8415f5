"""Run a grid: check every cell's config up front, skip finished cells, resume interrupted ones.

``DIR/grid.json`` (the manifest) records each cell's overrides and resolved config; running again
with a different grid file or base config is a one-line error unless ``--force``, which keeps the
finished cells whose resolved config did not change and redoes (or removes) the others.
``DIR/grid_status.json`` says, per cell, what the last invocation did (``skipped``, ``ran``,
``resumed``) and how it ended (``done``, ``failed``), updated as cells finish.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from tqdm.auto import tqdm

from ..io import write_json, write_text
from .launchers import CellJob, cell_command, run_local, run_submitit
from .spec import Cell, GridSpec

MANIFEST = "grid.json"
STATUS = "grid_status.json"


class GridError(Exception):
    """The grid cannot run as asked (the CLI reports it as a one-line usage error, exit code 2)."""


@dataclass
class PreparedCell:
    cell: Cell
    raw: dict[str, Any]  # the merged YAML config the cell runs (written to CELL/config.yaml)
    resolved: dict[str, Any]  # the typed config, as results.json records it
    threads: int | None  # train.threads of the cell's config, when it has one

    @property
    def name(self) -> str:
        return self.cell.name


def _canonical(config: Any) -> str:
    """A config as comparable text; its ``logging`` section is left out (it changes what a run records,
    not what it learns, so a finished cell stays finished when only its loggers change)."""
    if isinstance(config, dict):
        config = {k: v for k, v in config.items() if k != "logging"}
    return json.dumps(json.loads(json.dumps(config, default=str)), sort_keys=True)


def prepare_cells(spec: GridSpec) -> list[PreparedCell]:
    """Load and validate every cell's config before anything runs (one bad value: one-line error)."""
    from ..cli import prepare_run

    prepared = []
    for cell in spec.cells():
        try:
            _, config, raw = prepare_run(str(spec.base), cell.set_args())
        except ValueError as exc:
            raise GridError(f"cell {cell.name}: {exc}") from None
        train = getattr(config, "train", None)
        prepared.append(PreparedCell(cell, raw, dataclasses.asdict(config), getattr(train, "threads", None)))
    return prepared


def _differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif _canonical(a) != _canonical(b):
            out.append(f"{prefix}{key} {json.dumps(a)} -> {json.dumps(b)}")
    return out


def _results_config(cell_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((cell_dir / "results.json").read_text()).get("config")
    except (OSError, ValueError):
        return None


CellState = Literal["done", "partial", "new"]


@dataclass
class Plan:
    states: dict[str, CellState]
    stale: list[str] = field(default_factory=list)  # cell directories to clear (changed or removed cells)


def plan_grid(out: Path, cells: list[PreparedCell], force: bool) -> Plan:
    """What each cell needs; raises :class:`GridError` when ``out`` holds a different grid and not ``force``."""
    manifest_path = out / MANIFEST
    old: dict[str, Any] = {}
    if manifest_path.is_file():
        old = json.loads(manifest_path.read_text()).get("cells", {})
    new = {c.name: c.resolved for c in cells}
    changed = [n for n in new if n in old and _canonical(old[n]["config"]) != _canonical(new[n])]
    for c in cells:  # a finished run in a cell's directory made with another config
        results = _results_config(out / c.name)
        if results is not None and _canonical(results) != _canonical(c.resolved) and c.name not in changed:
            changed.append(c.name)
    removed = [n for n in old if n not in new]
    added = [n for n in new if n not in old] if old else []
    if (changed or removed or added) and not force:
        parts = [f"{len(added)} cells added"] if added else []
        parts += [f"{len(removed)} removed"] if removed else []
        if changed:
            name = changed[0]
            before = old[name]["config"] if name in old else _results_config(out / name) or {}
            diff = _differences(before, new[name])
            parts.append(f"{len(changed)} changed (first: {name}: {'; '.join(diff[:2])})")
        raise GridError(f"{out} holds runs of a different grid or base config ({', '.join(parts)}); "
                        "use --force to run this grid there (finished cells whose config did not change are kept)")
    states: dict[str, CellState] = {}
    for c in cells:
        cell_dir = out / c.name
        if c.name in changed:
            states[c.name] = "new"
        elif (cell_dir / "results.json").is_file():
            states[c.name] = "done"
        elif any((cell_dir / "checkpoints").glob("exp_*.pt")):
            states[c.name] = "partial"
        else:
            states[c.name] = "new"
    return Plan(states, stale=[*changed, *removed])


def threads_per_cell(jobs: int, nproc: int = 1, cores: int | None = None) -> int:
    """Threads each process of a cell may use so that jobs x processes x threads <= cores."""
    cores = cores or len(os.sched_getaffinity(0))
    return max(1, cores // max(1, jobs * nproc))


@dataclass
class CellOutcome:
    action: str  # skipped / ran / resumed
    status: str  # done / failed / pending
    returncode: int | None = None
    message: str = ""


@dataclass
class GridOutcome:
    out: Path
    outcomes: dict[str, CellOutcome]

    @property
    def failed(self) -> list[str]:
        return [n for n, o in self.outcomes.items() if o.status == "failed"]

    def summary(self) -> str:
        counts: dict[str, int] = {}
        for o in self.outcomes.values():
            key = "failed" if o.status == "failed" else o.action
            counts[key] = counts.get(key, 0) + 1
        order = ["skipped", "ran", "resumed", "failed"]
        lines = [f"{len(self.outcomes)} cells: " + ", ".join(f"{counts[k]} {k}" for k in order if counts.get(k))]
        for name in self.failed:
            o = self.outcomes[name]
            code = "job failed" if o.returncode is None else f"exit {o.returncode}"
            lines.append(f"FAILED {name} ({code}): {o.message}  [log: {self.out / name / 'run.log'}]")
        return "\n".join(lines)


def run_grid(spec: GridSpec, out: str | Path, *, jobs: int = 1, launcher: str = "local", force: bool = False,
             progress: bool = True, log: Any = None) -> GridOutcome:
    """Run every cell of ``spec`` under ``out`` that is not finished; returns what happened to each."""
    log = log or sys.stdout
    out = Path(out)
    cells = prepare_cells(spec)
    plan = plan_grid(out, cells, force)
    out.mkdir(parents=True, exist_ok=True)
    for name in plan.stale:
        if (out / name).is_dir():
            shutil.rmtree(out / name)
    if plan.stale:
        print(f"--force: cleared {len(plan.stale)} cell directories of the previous grid", file=log)
    write_json(out / MANIFEST, {
        "grid_file": str(spec.path), "base": str(spec.base),
        "axes": spec.axis_keys(),
        "cells": {c.name: {"overrides": c.cell.overrides, "config": c.resolved} for c in cells},
    })
    nproc = int(spec.torchrun.get("nproc_per_node", 1)) if spec.torchrun else 1
    jobs = max(1, min(jobs, len(cells)))
    threads = threads_per_cell(jobs, nproc)
    heavy = [c for c in cells if c.threads and c.threads * jobs * nproc > len(os.sched_getaffinity(0))]
    if heavy:
        print(f"warning: train.threads={heavy[0].threads} with --jobs {jobs} oversubscribes "
              f"{len(os.sched_getaffinity(0))} cores; set train.threads: null to share them", file=log)
    outcomes: dict[str, CellOutcome] = {}
    todo: list[CellJob] = []
    for c in cells:
        state = plan.states[c.name]
        if state == "done":
            outcomes[c.name] = CellOutcome("skipped", "done")
            continue
        cell_dir = out / c.name
        cell_dir.mkdir(parents=True, exist_ok=True)
        write_text(cell_dir / "config.yaml", yaml.safe_dump(c.raw, sort_keys=False))
        env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        todo.append(CellJob(c.name, str(cell_dir), cell_command(cell_dir, spec.torchrun), env))
        outcomes[c.name] = CellOutcome("resumed" if state == "partial" else "ran", "pending")
    status_path = out / STATUS

    def write_status() -> None:
        write_json(status_path, {"cells": {n: dataclasses.asdict(o) for n, o in outcomes.items()},
                                 "finished": all(o.status != "pending" for o in outcomes.values())})

    write_status()
    bar = tqdm(total=len(cells), initial=len(cells) - len(todo), desc="grid", unit="cell", disable=not progress)

    def on_done(job: CellJob, code: int | None, message: str) -> None:
        o = outcomes[job.name]
        o.returncode, o.message = code, message
        o.status = "done" if code == 0 and (Path(job.dir) / "results.json").is_file() else "failed"
        write_status()
        bar.update(1)
        failed = sum(x.status == "failed" for x in outcomes.values())
        if failed:
            bar.set_postfix(failed=failed)

    try:
        if todo and launcher == "submitit":
            run_submitit(todo, jobs, on_done, out / ".submitit", spec.submitit)
        elif todo:
            run_local(todo, jobs, on_done)
    finally:
        bar.close()
    return GridOutcome(out, outcomes)
