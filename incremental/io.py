"""Atomic file output: a killed run never leaves a half-written result or checkpoint behind.

A file is written to a temporary name beside its path, flushed to disk and renamed over the path, so
the path holds the old file or the new one, never a part. SIGINT / SIGTERM wait until the write is done
(:func:`incremental.interrupts.deferred`); a failed write (disk full, no permission) removes the
temporary file and raises :class:`WriteError`, one line naming the path.
"""
from __future__ import annotations

import json
import os
import signal
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

from .interrupts import deferred


class WriteError(OSError):
    """Writing an output failed (disk full, no permission); what was at the path is unchanged."""

    def __init__(self, path: Path, cause: OSError) -> None:
        super().__init__(cause.errno, cause.strerror or str(cause))
        self.filename = str(path)

    def __str__(self) -> str:
        return f"cannot write {self.filename} ({self.strerror}); the previous version of it is unchanged"


_writes = 0  # atomic writes made by this process (for the fault-injection tests)


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, fsync it, then rename over ``path``."""
    global _writes
    path = Path(path)
    _writes += 1
    with deferred():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        except OSError as exc:
            raise WriteError(path, exc) from None
        os.close(fd)
        tmp_path = Path(tmp)
        try:
            write(tmp_path)
            with open(tmp_path, "rb") as handle:
                os.fsync(handle.fileno())
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp makes 0600; outputs get the usual permissions
            _fault_point("before_rename")
            os.replace(tmp_path, path)
        except OSError as exc:
            raise WriteError(path, exc) from None
        finally:
            if tmp_path.exists():
                tmp_path.unlink()
        _fault_point("after_rename")
    return path


def remove_partial_files(folder: str | Path) -> list[Path]:
    """Delete the temporary files that writes killed mid-way (SIGKILL, power loss) left in ``folder``.

    Only safe while this process holds the folder's output lock (no one else is writing there).
    """
    removed = []
    for tmp in Path(folder).glob(".*.tmp"):
        if tmp.is_file():
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def _fault_point(stage: str) -> None:
    """Fault injection for the kill tests: ``INCREMENTAL_KILL_IN_WRITE=N:STAGE`` SIGKILLs the process at
    ``STAGE`` (``before_rename`` or ``after_rename``) of its N-th atomic write."""
    spec = os.environ.get("INCREMENTAL_KILL_IN_WRITE")
    if spec and spec == f"{_writes}:{stage}":
        os.kill(os.getpid(), signal.SIGKILL)


def write_json(path: str | Path, data: Any) -> Path:
    return atomic_write(path, lambda p: p.write_text(json.dumps(data, indent=2, default=_json_default) + "\n"))


def write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda p: p.write_text(text))


def save_torch(path: str | Path, obj: Any) -> Path:
    return atomic_write(path, lambda p: torch.save(obj, p))


def save_figure(path: str | Path, figure: Any, **kwargs: Any) -> Path:
    """Save a matplotlib figure atomically (format from the final suffix) and close it."""
    import matplotlib.pyplot as plt

    fmt = Path(path).suffix.lstrip(".") or "png"
    try:
        return atomic_write(path, lambda p: figure.savefig(p, format=fmt, **kwargs))
    finally:
        plt.close(figure)


def _json_default(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} as JSON")
