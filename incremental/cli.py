"""The ``incremental`` command: ``run`` scenario configs, ``update`` deployed models, ``feedback``.

Exit codes: 0 success, 2 bad input (config, data or model file), 1 anything unexpected.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from .checkpoint import CheckpointError
from .config import ConfigError, apply_overrides, from_dict, load_yaml

#: Extra subcommands contributed by feature modules: name -> module with add_parser(sub) and main(args).
SUBCOMMANDS: dict[str, str] = {
    "update": "incremental.update",
    "feedback": "incremental.detection.feedback",
    "package": "incremental.commands.package", "predict": "incremental.commands.predict",
    "grid": "incremental.commands.grid", "report": "incremental.commands.report",
}


class UsageError(Exception):
    """Bad input from the user (exit code 2)."""


def _progress_enabled(quiet: bool) -> bool:
    return not quiet and sys.stderr.isatty()


def prepare_run(config_path: str, overrides: Sequence[str]) -> tuple[Any, Any, dict[str, Any]]:
    """Load, override and validate a config; returns (runner module, typed config, raw dict)."""
    from .runners import runner_for

    raw = apply_overrides(load_yaml(config_path), list(overrides))
    scenario = raw.get("scenario", {})
    name = scenario.get("name") if isinstance(scenario, dict) else None
    runner = runner_for(name)
    legacy = getattr(runner, "legacy", None)
    if legacy is not None and "strategy" in raw:  # old strategy names, kept for one release
        from .runners.base import legacy_strategy

        raw["strategy"] = legacy_strategy(raw["strategy"], legacy)
    config = from_dict(runner.Config, raw)
    return runner, config, raw


def cmd_run(args: argparse.Namespace) -> int:
    from .io import write_json

    from . import distributed as dist_utils

    runner, config, _ = prepare_run(args.config, args.set or [])
    out = Path(args.out)
    results_path = out / "results.json"
    if results_path.exists() and not args.resume and not args.force:
        raise UsageError(f"{results_path} exists; use --resume to continue or --force to overwrite")
    if dist_utils.launched_by_torchrun():
        # torchrun started N copies of this command: join its process group (gloo / NCCL).
        train_cfg = getattr(config, "train", None)
        dist_utils.init_distributed(getattr(train_cfg, "device", "auto"))
    main = dist_utils.is_main_process()
    # The output folder is made by the first file written into it: a run refused while its data and
    # model are built (bad data, a class order the data lack) leaves nothing behind.
    start = time.perf_counter()
    results = runner.run(config, out, progress=_progress_enabled(args.quiet) and main, resume=args.resume)
    report = results.pop("report", None)
    payload = {
        **results,
        "seed": config.seed,
        "wall_time_s": time.perf_counter() - start,
        "world_size": dist_utils.world_size(),
        "config": dataclasses.asdict(config),
    }
    if main:
        write_json(results_path, payload)
    dist_utils.shutdown()
    if not args.quiet and main:
        if report:
            print(report)
        summary = {k: payload[k] for k in ("average_accuracy", "forgetting", "bwt") if k in payload}
        if summary:
            print("  ".join(f"{k}={v:.4f}" for k, v in summary.items()))
        print(f"wrote {results_path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="incremental", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a scenario config (YAML) and write DIR/results.json")
    run.add_argument("config", help="path to a YAML config (see configs/)")
    run.add_argument("--out", required=True, help="output directory")
    run.add_argument("--set", action="append", metavar="KEY=VALUE",
                     help="override a dotted config key; the value is parsed as YAML (repeatable)")
    run.add_argument("--resume", action="store_true", help="continue a killed run from its last checkpoint")
    run.add_argument("--force", action="store_true", help="overwrite an existing results.json")
    run.add_argument("--quiet", action="store_true", help="no progress bars or tables")
    run.set_defaults(handler=cmd_run)
    for name, module_name in SUBCOMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name and module_name.startswith(exc.name):
                continue  # feature not in this version
            raise
        module.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except (ConfigError, UsageError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - a DataError may arrive wrapped by a DataLoader worker
        from .datasets import DataError

        if isinstance(exc, DataError):
            print(f"error: {one_line(exc)}", file=sys.stderr)
            return 2
        raise


def one_line(exc: BaseException) -> str:
    """The user-facing line of an error. A DataLoader re-raises a worker's exception with the worker's
    traceback in its message; the original message is its last line."""
    lines = [line for line in str(exc).splitlines() if line.strip()]
    if len(lines) <= 1:
        return lines[0] if lines else type(exc).__name__
    last = lines[-1]
    return last.split(": ", 1)[1] if last.startswith(("incremental.", "DataError")) and ": " in last else last


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
