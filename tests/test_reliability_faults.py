"""Fault injection (slow): runs killed with SIGKILL, then resumed, end with the numbers of a run that
was never killed.

Twenty kills: ten inside file writes (``INCREMENTAL_KILL_IN_WRITE=N:STAGE`` kills the process in its
N-th atomic write, before or after the rename: inside a checkpoint, between a checkpoint and its hash
file, inside the final package / plot / results), and ten at random moments of the run (seeded). Each
killed run is resumed with ``--resume`` and must give the reference accuracy matrix, a loadable
package and no leftover partial file.
"""
from __future__ import annotations

import json
import random
import shutil
import signal
import time

import pytest

from incremental.locking import lock_path_of
from incremental.package import load_model

from .reliability_helpers import cli_process

pytestmark = pytest.mark.slow

ARGS = ["run", "configs/split_digits_naive.yaml", "--quiet", "--set", "scenario.n_experiences=3",
        "--set", "model.hidden_size=16", "--set", "train.epochs=60"]
WRITES = 9  # 3 checkpoints x (file + hash file), then model.pt, accuracy_matrix.png, results.json


def run_to_end(out, env=None, resume=False):
    proc = cli_process([*ARGS, "--out", str(out), *(["--resume"] if resume else [])], env=env)
    _, err = proc.communicate(timeout=600)
    return proc.returncode, err


def start_and_wait_for_lock(out):
    """Start a run; return it once it holds its output lock (Python and torch are imported by then)."""
    proc = cli_process([*ARGS, "--out", str(out)])
    while not lock_path_of(out).exists() and proc.poll() is None:
        time.sleep(0.002)
    return proc


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run's results, and how long it runs once it holds its lock."""
    out = tmp_path_factory.mktemp("reference") / "run"
    proc = start_and_wait_for_lock(out)
    start = time.monotonic()
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    return json.loads((out / "results.json").read_text()), time.monotonic() - start


def assert_resumes_to(reference_results, out):
    code, err = run_to_end(out, resume=True)
    assert code == 0, err
    results = json.loads((out / "results.json").read_text())
    assert results["accuracy_matrix"] == reference_results["accuracy_matrix"]
    assert load_model(out / "model.pt").class_names == [str(c) for c in range(10)]
    assert not [p for p in out.parent.rglob(".*")], "a partial file or a lock was left behind"


IN_WRITE = random.Random(17).sample([(n, stage) for n in range(1, WRITES + 1) for stage in ("before_rename", "after_rename")], 10)


@pytest.mark.parametrize("n, stage", IN_WRITE)
def test_killed_inside_a_write_resumes_to_the_same_numbers(tmp_path, reference, n, stage):
    out = tmp_path / "run"
    code, err = run_to_end(out, env={"INCREMENTAL_KILL_IN_WRITE": f"{n}:{stage}"})
    assert code == -signal.SIGKILL, f"write {n} was not reached: {err}"
    assert_resumes_to(reference[0], out)


@pytest.mark.parametrize("k", range(10))
def test_killed_at_a_random_moment_resumes_to_the_same_numbers(tmp_path, reference, k):
    rng = random.Random(1000 + k)
    out = tmp_path / "run"
    for _ in range(20):  # a moment after the run ended is no kill: draw another one
        proc = start_and_wait_for_lock(out)
        time.sleep(rng.uniform(0, reference[1]))
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=600)
        if proc.returncode == -signal.SIGKILL:
            break
        shutil.rmtree(out)
    assert proc.returncode == -signal.SIGKILL
    assert_resumes_to(reference[0], out)
