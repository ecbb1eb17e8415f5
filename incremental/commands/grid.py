"""``incremental grid GRID.yaml --out DIR [--jobs N] [--launcher local|submitit] [--force]``."""
from __future__ import annotations

import argparse
import sys
from typing import Any


def add_parser(sub: Any) -> None:
    p = sub.add_parser("grid", help="run every cell of a grid file (seeds x strategies x ...) as ordinary runs, "
                                    "skipping finished cells and resuming interrupted ones")
    p.add_argument("grid_file", help="grid YAML: base config, axes (grid:), axes that move together (zip:)")
    p.add_argument("--out", required=True, help="grid directory: one sub-directory per cell, named by its settings")
    p.add_argument("--jobs", type=int, default=1, help="cells run at the same time (threads per cell = cores / jobs)")
    p.add_argument("--launcher", choices=("local", "submitit"), default="local",
                   help="local: child processes; submitit: a Slurm job array (settings in the grid file's submitit:)")
    p.add_argument("--force", action="store_true",
                   help="DIR holds a different grid: run this one there (unchanged finished cells are kept)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or table")
    p.set_defaults(handler=cmd_grid)


def cmd_grid(args: argparse.Namespace) -> int:
    from ..cli import UsageError
    from ..grids.report import write_report
    from ..grids.runner import GridError, run_grid
    from ..grids.spec import load_grid

    if args.jobs < 1:
        raise UsageError(f"--jobs must be >= 1, got {args.jobs}")
    if args.launcher == "submitit":
        from ..tracking.config import is_installed

        if not is_installed("submitit"):
            raise UsageError("--launcher submitit needs the 'submitit' package: pip install 'incremental-adapt[submitit]'")
    spec = load_grid(args.grid_file)
    try:
        outcome = run_grid(spec, args.out, jobs=args.jobs, launcher=args.launcher, force=args.force,
                           progress=not args.quiet and sys.stderr.isatty())
    except GridError as exc:
        raise UsageError(str(exc)) from None
    print(outcome.summary())
    if not outcome.failed:
        table, files = write_report(args.out)
        if not args.quiet:
            print(table)
        print(f"wrote {files[0].parent}")
    return 1 if outcome.failed else 0
