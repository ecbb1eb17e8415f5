"""``incremental report DIR [--out REPORT_DIR] [--pool KEY] [--paired KEY]``: one table over every results.json under DIR."""
from __future__ import annotations

import argparse
from typing import Any


def add_parser(sub: Any) -> None:
    p = sub.add_parser("report", help="one table (mean ± std over seeds) and plots over every results.json under DIR")
    p.add_argument("dir", help="a grid directory, or any folder of runs")
    p.add_argument("--out", help="where to write report.{md,csv,json} and the plots (default: DIR/report)")
    p.add_argument("--no-plots", action="store_true", help="tables only")
    p.add_argument("--pool", action="append", default=[], metavar="KEY",
                   help="a config key (as in --set) whose runs count as replicates, like seeds (repeatable)")
    p.add_argument("--paired", metavar="KEY",
                   help="a setting key (as in --set) whose values are compared seed by seed against its first one")
    p.set_defaults(handler=cmd_report)


def cmd_report(args: argparse.Namespace) -> int:
    from ..cli import UsageError
    from ..grids.report import ReportError, write_report

    try:
        table, files = write_report(args.dir, args.out, plots=not args.no_plots, pool=args.pool, paired=args.paired)
    except ReportError as exc:
        raise UsageError(str(exc)) from None
    print(table)
    print(f"wrote {', '.join(str(f) for f in files)}")
    return 0
