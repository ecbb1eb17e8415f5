"""Commands of the ``incremental`` CLI that stand apart from the core they call.

Each module has ``add_parser(subparsers)`` and a handler, and is registered by name in
:data:`incremental.cli.SUBCOMMANDS`.
"""
from __future__ import annotations

from pathlib import Path


def output_path(out: str | Path, force: bool) -> Path:
    """The file a command will write: refused (one line, nothing written) when it exists without
    ``--force`` or is a directory."""
    from ..cli import UsageError

    path = Path(out)
    if path.is_dir():
        raise UsageError(f"--out {path} is a directory; give the file to write")
    if path.exists() and not force:
        raise UsageError(f"{path} exists; use --force to overwrite")
    return path
