"""One writer per output: an advisory lock that a command holds on its output for its whole life.

Two ``incremental run`` processes started with the same ``--out`` would otherwise both "succeed",
leaving the results of one, the checkpoints of both and the model of whichever wrote last. The lock of
output ``P`` (a file or a directory) is the file ``.P.lock`` beside it, locked with ``flock``: the
kernel releases it when the process ends, however it ends (a SIGKILLed run leaves no stale lock). The
holder writes its pid into the file, so a second process can say who holds it, and removes the
file when it is done. A lock file left by a killed process is simply taken over.
"""
from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path
from types import TracebackType


class OutputBusyError(RuntimeError):
    """Another process holds the output's lock (the CLI exits with code 2, touching nothing)."""


def lock_path_of(output: str | Path) -> Path:
    """``DIR/.NAME.lock`` for output ``DIR/NAME`` (symbolic links resolved, so spellings agree)."""
    output = Path(output).resolve()
    return output.parent / f".{output.name}.lock"


class OutputLock:
    """Exclusive, non-blocking lock of one output path; use as a context manager.

    Directories above the lock file that do not exist are created for it and removed again on
    release when still empty, so a command that fails leaves nothing behind.
    """

    def __init__(self, output: str | Path) -> None:
        self.output = Path(output)
        self.path = lock_path_of(output)
        self._fd: int | None = None
        self._created: list[Path] = []

    def acquire(self) -> "OutputLock":
        self._make_parents()
        try:
            while True:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    holder = _read_pid(fd)
                    os.close(fd)
                    raise OutputBusyError(
                        f"{self.output} is in use by another incremental process (pid {holder}); "
                        "wait for it to end or choose another output") from None
                # The previous holder may have removed the file between our open and our lock: then we
                # hold a lock on a file nobody else can see, so start again with the current file.
                try:
                    same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
                except FileNotFoundError:
                    same = False
                if same:
                    break
                os.close(fd)
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            self._fd = fd
        except BaseException:
            self._remove_parents()
            raise
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # while still locked: nobody can take the old file
        finally:
            os.close(self._fd)
            self._fd = None
            self._remove_parents()

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.release()

    def _make_parents(self) -> None:
        missing = []
        parent = self.path.parent
        while not parent.exists():
            missing.append(parent)
            parent = parent.parent
        for folder in reversed(missing):
            folder.mkdir(exist_ok=True)
            self._created.append(folder)

    def _remove_parents(self) -> None:
        for folder in reversed(self._created):
            try:
                folder.rmdir()
            except OSError:  # not empty: the command wrote its output there
                break
        self._created = []


def _read_pid(fd: int) -> str:
    """The holder's pid from the lock file (it writes it right after locking: wait a moment for it)."""
    for _ in range(50):
        os.lseek(fd, 0, os.SEEK_SET)
        text = os.read(fd, 64).decode(errors="replace").strip()
        if text:
            return text
        time.sleep(0.01)
    return "unknown"
