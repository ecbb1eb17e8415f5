"""Data-parallel runs with torchrun (CPU, gloo, 2 processes) against single-process runs."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from incremental.distributed import GlobalBatchSharder

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--set", "train.epochs=2", "--set", "scenario.n_experiences=3", "--set", "model.hidden_size=64",
         "--set", "train.lr=0.1", "--quiet"]
# Tolerance: per-rank half-batch gradients averaged by all-reduce are not bit-identical to a
# full-batch gradient in general; one test sample of an experience is ~0.009 of its accuracy.
TOLERANCE = 0.01


def test_shards_of_a_global_batch_add_up_to_it():
    idx = torch.tensor([7, 3, 9, 1, 4])
    shards = [GlobalBatchSharder(r, 2).shard(idx) for r in range(2)]
    assert shards[0].tolist() == [7, 9, 4] and shards[1].tolist() == [3, 1]
    assert sorted(torch.cat(shards).tolist()) == sorted(idx.tolist())
    # rank 0 holds 3 of 5: its mean loss is weighted 3*2/5, rank 1's 2*2/5; the ranks' average is then
    # (1.2 * mean0 + 0.8 * mean1) / 2 = (3 * mean0 + 2 * mean1) / 5, the mean over all 5 samples.
    assert GlobalBatchSharder(0, 2).weight(idx) == pytest.approx(1.2)
    assert GlobalBatchSharder(1, 2).weight(idx) == pytest.approx(0.8)


def _run(config, out, nproc=1, extra=(), env=None):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else [sys.executable]
    cmd = [*launcher, "-m", "incremental", "run", f"configs/{config}.yaml", "--out", str(out), *SMALL, *extra]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def _matrix(out):
    return np.array(json.loads((Path(out) / "results.json").read_text())["accuracy_matrix"])


@pytest.mark.parametrize("config", ["split_digits_naive", "split_digits_replay", "split_digits_gradient_mixing"])
def test_two_processes_match_one_process(tmp_path, config):
    one = _run(config, tmp_path / "one")
    assert one.returncode == 0, one.stderr[-2000:]
    two = _run(config, tmp_path / "two", nproc=2)
    assert two.returncode == 0, two.stderr[-2000:]
    results = json.loads((tmp_path / "two" / "results.json").read_text())
    assert results["world_size"] == 2
    np.testing.assert_allclose(_matrix(tmp_path / "two"), _matrix(tmp_path / "one"), atol=TOLERANCE)


def test_two_processes_on_the_dataloader_path_match_one_process_in_memory(tmp_path):
    """The lazy path (a DataLoader per rank over its share of each global minibatch) keeps the
    exact-equivalence guarantee of the in-memory path."""
    one = _run("split_digits_replay", tmp_path / "one")
    assert one.returncode == 0, one.stderr[-2000:]
    two = _run("split_digits_replay", tmp_path / "two", nproc=2, extra=["--set", "data.in_memory=false"])
    assert two.returncode == 0, two.stderr[-2000:]
    assert json.loads((tmp_path / "two" / "results.json").read_text())["in_memory"] is False
    np.testing.assert_allclose(_matrix(tmp_path / "two"), _matrix(tmp_path / "one"), atol=TOLERANCE)


def test_killed_two_process_run_resumes(tmp_path):
    ref = _run("split_digits_replay", tmp_path / "ref", nproc=2)
    assert ref.returncode == 0, ref.stderr[-2000:]
    killed = _run("split_digits_replay", tmp_path / "k", nproc=2, env={"INCREMENTAL_KILL_AFTER_EXPERIENCE": "2"})
    assert killed.returncode != 0
    assert not (tmp_path / "k" / "results.json").exists()
    assert (tmp_path / "k" / "checkpoints" / "exp_002.pt").exists()
    resumed = _run("split_digits_replay", tmp_path / "k", nproc=2, extra=["--resume"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    np.testing.assert_allclose(_matrix(tmp_path / "k"), _matrix(tmp_path / "ref"), atol=1e-12)
