"""Shared by the reliability and fuzz tests: tiny inputs, the CLI in and out of process, file snapshots."""
from __future__ import annotations

import contextlib
import hashlib
import io
import os
import subprocess
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
#: The smallest Split Digits run that still has three experiences.
TINY_RUN = ["--set", "train.epochs=1", "--set", "scenario.n_experiences=3", "--set", "model.hidden_size=32", "--quiet"]


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    from incremental.scenarios.digits import load_digits_arrays

    return load_digits_arrays()


def tiny_classifier_package(path: Path, n_classes: int = 3, hidden: int = 8, exemplars: bool = True) -> Path:
    """An MLP package on 8x8 digits knowing classes ``zero, one, two`` (with a few exemplars)."""
    from incremental.buffer import HistoryLibrary
    from incremental.data import TensorSamples
    from incremental.models import MLP
    from incremental.package import save_model
    from incremental.update_classifier import classifier_package_extra

    x, y = digits_arrays()
    torch.manual_seed(0)
    model = MLP(64, hidden, n_classes)
    history = None
    if exemplars:
        history = HistoryLibrary(12, "class_balanced")
        keep = y < n_classes
        history.update(TensorSamples(torch.from_numpy(x[keep][:60]), torch.from_numpy(y[keep][:60])))
    names = ["zero", "one", "two", "three", "four"][:n_classes]
    return save_model(path, model, kind="classifier", architecture="mlp",
                      arch_kwargs={"input_size": 64, "hidden_size": hidden, "n_classes": n_classes},
                      class_names=names, extra=classifier_package_extra(history))


def new_class_npz(path: Path, n: int = 40) -> Path:
    """Digits 1 and 3 as classes ``one`` (known) and ``three`` (new)."""
    x, y = digits_arrays()
    sel = np.flatnonzero((y == 1) | (y == 3))[:n]
    np.savez(path, x=x[sel], y=(y[sel] == 3).astype(np.int64), class_names=np.array(["one", "three"]))
    return path


def run_main(args: Sequence[str]) -> tuple[int, str, str]:
    """``incremental ARGS`` in this process; returns (exit code, stdout, stderr).

    An exception escaping ``main`` is returned as exit code 1 with its traceback as stderr, the way
    the installed command would end, so that a test can assert on it instead of erroring.
    """
    import traceback

    from incremental.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as exc:  # argparse
            code = exc.code if isinstance(exc.code, int) else 2
        except BaseException:  # noqa: BLE001 - what the user would see is a traceback and exit 1
            traceback.print_exc()
            code = 1
    return code, out.getvalue(), err.getvalue()


def cli_process(args: Sequence[str], env: dict[str, str] | None = None, **kwargs) -> subprocess.Popen:
    """``python -m incremental ARGS`` as a child process (for signals, kills and concurrency)."""
    return subprocess.Popen([sys.executable, "-m", "incremental", *args], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, **(env or {})}, **kwargs)


def snapshot(*roots: Path) -> dict[str, str]:
    """Path -> SHA-256 of every file under ``roots`` (to assert that nothing was written or changed)."""
    files: dict[str, str] = {}
    for root in roots:
        paths = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []
        for p in paths:
            files[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return files
