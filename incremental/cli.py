"""The ``incremental`` command: ``run`` scenario configs, ``update`` deployed models, ``feedback``.

Exit codes: 0 success; 2 bad input (config, data or model file, an output that exists or that another
process is writing), nothing written; 3 training diverged (non-finite loss: the last good checkpoint
is kept, no model package is written); 1 an output could not be written (disk full, permissions: the
previous version stays) or anything unexpected; 130 / 143 interrupted by Ctrl-C / SIGTERM (a run
continues with ``--resume``). Every ending but 0 prints one line on stderr.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from .checkpoint import CheckpointError
from .config import InputError, apply_overrides, from_dict, load_yaml, one_line
from .guards import DivergedError
from .interrupts import exit_code, signals_as_exceptions
from .io import WriteError
from .locking import OutputBusyError, OutputLock

#: Extra subcommands contributed by feature modules: name -> module with add_parser(sub) and main(args).
SUBCOMMANDS: dict[str, str] = {
    "update": "incremental.update",
    "feedback": "incremental.detection.feedback",
    "package": "incremental.commands.package", "predict": "incremental.commands.predict",
    "grid": "incremental.commands.grid", "report": "incremental.commands.report",
}


class UsageError(InputError):
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
    from . import distributed as dist_utils
    from .io import remove_partial_files, write_json

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
    if main:
        for folder in (out, out / "checkpoints"):  # what a killed run left half-written (we hold the lock)
            remove_partial_files(folder)
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


class _Parser(argparse.ArgumentParser):
    """argparse, with a command-line mistake reported like every other error: one line, exit 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"error: {one_line(message)} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="incremental", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a scenario config (YAML) and write DIR/results.json")
    run.add_argument("config", help="path to a YAML config (see configs/)")
    run.add_argument("--out", required=True, help="output directory")
    run.add_argument("--set", action="append", metavar="KEY=VALUE",
                     help="override a dotted config key; the value is parsed as YAML (repeatable)")
    run.add_argument("--resume", action="store_true", help="continue a killed run from its last checkpoint")
    run.add_argument("--force", action="store_true", help="overwrite an existing results.json")
    run.add_argument("--quiet", action="store_true", help="no progress bars or tables")
    run.set_defaults(handler=cmd_run, output_arg="out")
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
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    with signals_as_exceptions():
        try:
            with _output_lock(args):
                return int(args.handler(args) or 0)
        except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM (incremental.interrupts)
            print(one_line(_interrupted_message(args, argv)), file=sys.stderr)
            return exit_code(exc)
        except DivergedError as exc:
            return _fail(f"{exc}; no model package was written", 3)
        except (InputError, CheckpointError, OutputBusyError) as exc:
            return _fail(exc, 2)
        except WriteError as exc:
            return _fail(exc, 1)
        except OSError as exc:  # an input that cannot be read (missing file, no permission)
            return _fail(exc, 2)


def _fail(message: object, code: int) -> int:
    print(f"error: {one_line(str(message))}", file=sys.stderr)
    return code


def _output_lock(args: argparse.Namespace) -> Any:
    """The lock of the command's output (``output_arg`` names it), held for the command's whole life.

    In a data-parallel run every rank runs this command; rank 0 holds the lock for all of them.
    """
    import contextlib

    output = getattr(args, getattr(args, "output_arg", "") or "", None)
    if output is None or os.environ.get("RANK", "0") != "0":
        return contextlib.nullcontext()
    return OutputLock(output)


def _interrupted_message(args: argparse.Namespace, argv: list[str]) -> str:
    """One line: where a run stopped and the command that continues it; other commands wrote nothing."""
    if getattr(args, "command", None) != "run":
        return "interrupted; nothing was written"
    done = sorted(Path(args.out).glob("checkpoints/exp_*.json"))
    k = int(done[-1].stem.split("_")[1]) if done else 0
    again = shlex.join(["incremental", *[a for a in argv if a not in ("--force", "--resume")], "--resume"])
    return f"interrupted during experience {k} ({k} done and checkpointed); `{again}` continues"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
