"""Ctrl-C and SIGTERM end a command with one line, never mid-way through a checkpoint.

Inside :func:`signals_as_exceptions` (the CLI's whole life) both signals raise :class:`Interrupted`,
a ``KeyboardInterrupt`` that carries the signal number, so ``finally`` blocks run (a half-written file
is removed, a lock is released) and the CLI exits with ``128 + signal``: 130 for Ctrl-C, 143 for
SIGTERM. Inside :func:`deferred` a signal is held until the block ends, so a checkpoint and its
hash file are written together or not at all.
"""
from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from types import FrameType
from typing import Iterator

HANDLED = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """The process got SIGINT or SIGTERM (``signum``)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = int(signum)


_depth = 0  # how many deferred() blocks are open
_pending: int | None = None  # a signal that arrived inside one


def _raise(signum: int, frame: FrameType | None) -> None:
    global _pending
    if _depth:
        _pending = signum
        return
    raise Interrupted(signum)


@contextmanager
def signals_as_exceptions() -> Iterator[None]:
    """SIGINT and SIGTERM raise :class:`Interrupted` inside the block (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in HANDLED}
    for s in HANDLED:
        signal.signal(s, _raise)
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


@contextmanager
def deferred() -> Iterator[None]:
    """Hold SIGINT / SIGTERM until the block is done, then raise :class:`Interrupted` (nests)."""
    global _depth, _pending
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if _depth == 0 and _pending is not None:
            signum, _pending = _pending, None
            raise Interrupted(signum)


def exit_code(exc: KeyboardInterrupt) -> int:
    """The shell's convention: 128 + the signal number (a plain KeyboardInterrupt is SIGINT)."""
    return 128 + getattr(exc, "signum", int(signal.SIGINT))
