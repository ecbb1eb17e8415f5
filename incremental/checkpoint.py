"""Run checkpoints: written atomically after every experience, verified on load, safe to load.

A checkpoint is a ``torch.save`` of plain tensors, lists and dicts (loaded with
``weights_only=True``, so loading never runs code from the file) plus a sidecar JSON with its SHA-256.
On resume the newest checkpoint whose hash matches and that loads is used; a truncated or corrupted
one is reported and skipped in favour of the previous good one.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any, Protocol

import torch

from .interrupts import deferred
from .io import save_torch, write_json

CHECKPOINT_FORMAT = 1


class CheckpointError(RuntimeError):
    pass


#: Config sections that change what a run records, not what it computes: a run resumes with other values.
NOT_COMPARED = ("logging",)


def _comparable(config: Any) -> Any:
    return {k: v for k, v in config.items() if k not in NOT_COMPARED} if isinstance(config, dict) else config


class Resumable(Protocol):
    """What a run object exposes for checkpointing between experiences."""

    trainer: Any
    accuracy_matrix: list[list[float]]
    train_time_s: float


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class RunCheckpointer:
    """Checkpoints of one run directory: ``DIR/checkpoints/exp_NNN.pt`` (+ ``.json`` with its hash)."""

    def __init__(self, out_dir: Path, config: dict[str, Any], keep: int = 2) -> None:
        self.dir = Path(out_dir) / "checkpoints"
        self.config = config
        self.keep = keep

    def path(self, n_done: int) -> Path:
        return self.dir / f"exp_{n_done:03d}.pt"

    def save(self, run: Resumable, n_done: int, extra: dict[str, Any] | None = None) -> Path:
        """Write checkpoint ``n_done`` (rank 0 only in data-parallel runs; every rank waits for it)."""
        from . import distributed as dist_utils

        path = self.path(n_done)
        if dist_utils.is_main_process():
            self._write(run, n_done, extra)
        dist_utils.barrier()
        _maybe_die_for_test(n_done)
        return path

    def _write(self, run: Resumable, n_done: int, extra: dict[str, Any] | None) -> Path:
        state = {
            "format": CHECKPOINT_FORMAT,
            "config": self.config,
            "experiences_done": n_done,
            "trainer": run.trainer.state_dict(),
            "accuracy_matrix": run.accuracy_matrix,
            "train_time_s": run.train_time_s,
            "extra": extra or {},
        }
        with deferred():  # Ctrl-C waits until the checkpoint and its hash file are both on disk
            path = save_torch(self.path(n_done), state)
            write_json(path.with_suffix(".json"), {"file": path.name, "sha256": sha256_of(path), "experiences_done": n_done})
            for old in sorted(self.dir.glob("exp_*.pt"))[: -self.keep]:
                old.unlink(missing_ok=True)
                old.with_suffix(".json").unlink(missing_ok=True)
        return path

    def load_latest(self) -> dict[str, Any] | None:
        """The newest checkpoint that verifies and loads, or None when there is none."""
        candidates = sorted(self.dir.glob("exp_*.pt"), reverse=True)
        for path in candidates:
            try:
                state = load_checkpoint(path)
            except CheckpointError as exc:
                print(f"warning: {exc}; trying an older checkpoint", file=sys.stderr)
                continue
            if _comparable(state["config"]) != _comparable(self.config):
                raise CheckpointError(
                    f"{path} was written by a run with a different config; resume with the same config "
                    "(and --set values) or use a new --out directory"
                )
            return state
        return None

    def restore(self, run: Resumable) -> int:
        """Restore ``run`` from the newest good checkpoint; returns the number of experiences done."""
        state = self.load_latest()
        if state is None:
            return 0
        run.trainer.load_state_dict(state["trainer"])
        run.accuracy_matrix = [list(map(float, row)) for row in state["accuracy_matrix"]]
        run.train_time_s = float(state["train_time_s"])
        restore_extra = getattr(run, "load_extra_state", None)
        if callable(restore_extra):
            restore_extra(state["extra"])
        return int(state["experiences_done"])


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load and verify one checkpoint (hash, then a weights-only load)."""
    meta_path = path.with_suffix(".json")
    if not meta_path.is_file():
        raise CheckpointError(f"checkpoint {path} has no {meta_path.name} (write was interrupted)")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"checkpoint metadata {meta_path} is unreadable ({exc})") from None
    actual = sha256_of(path)
    if actual != meta.get("sha256"):
        raise CheckpointError(f"checkpoint {path} is truncated or corrupted (SHA-256 {actual[:12]}... does not match {str(meta.get('sha256'))[:12]}...)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means an unusable file
        raise CheckpointError(f"checkpoint {path} cannot be loaded ({type(exc).__name__}: {exc})") from None
    if state.get("format", 0) > CHECKPOINT_FORMAT:
        raise CheckpointError(f"checkpoint {path} has format {state.get('format')}, newer than this version reads ({CHECKPOINT_FORMAT})")
    return state


def _maybe_die_for_test(n_done: int) -> None:
    """Fault injection for the resume tests: ``INCREMENTAL_KILL_AFTER_EXPERIENCE=N`` makes the process
    SIGKILL itself right after checkpoint N is on disk, exactly like a run killed between experiences."""
    target = os.environ.get("INCREMENTAL_KILL_AFTER_EXPERIENCE")
    if target is not None and int(target) == n_done:
        os.kill(os.getpid(), signal.SIGKILL)
