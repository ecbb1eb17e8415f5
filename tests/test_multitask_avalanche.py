"""DynamicLossWeightingPlugin inside Avalanche's Naive strategy: the example script, tiny sizes."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_example(out: Path, *args: str) -> dict[str, dict]:
    """The example at tiny sizes (two experiences of 3 epochs); its results by method."""
    cmd = [sys.executable, str(ROOT / "examples" / "avalanche_multitask.py"), "--n-train", "48", "--n-test", "24",
           "--epochs", "3", "--batch-size", "16", "--out", str(out), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {r["method"]: r for r in json.loads(out.read_text())["results"]}


def test_example_runs_in_avalanche_naive(tmp_path):
    results = run_example(tmp_path / "av.json", "--methods", "dwa_ema_exp", "gradnorm", "uncertainty")
    # two experiences of 3 epochs: 6 periods, the plugin's history runs across experiences
    dwa = results["dwa_ema_exp"]
    assert dwa["periods"] == 6
    assert dwa["weight_history"][1]["weights"]["age"] == 1.0  # periods 1 and 2: fixed
    assert dwa["weight_history"][2]["weights"] != dwa["weight_history"][1]["weights"]  # dynamic from 3
    # GradNorm's weights learned inside Avalanche's loop (before_backward), renormalised to K = 9
    gn = results["gradnorm"]["loss_weights"]
    assert sum(gn.values()) == pytest.approx(9.0, abs=1e-3) and max(gn.values()) - min(gn.values()) > 1e-3
    # uncertainty's log-variances stepped by the plugin's own optimizer (after_update)
    assert max(abs(v) for v in results["uncertainty"]["log_vars"]) > 1e-3
    for r in results.values():
        assert set(r["headline"]) == {"landmarks", "pose", "smile", "age", "gender", "mask", "glasses",
                                      "attractiveness", "quality"}


@pytest.mark.slow  # tests/test_multitask_loss_terms.py covers the same mode in seconds with a fake strategy
def test_example_named_terms_mode_in_avalanche_naive(tmp_path):
    # the criterion returns {task: loss}; a Naive subclass exposes strategy.loss_terms; the plugin,
    # given no task list, reads the names at the first iteration and weighs the terms
    results = run_example(tmp_path / "terms.json", "--methods", "dwa_ema_exp_init", "gradnorm", "--named-terms")
    dwa = results["dwa_ema_exp_init"]
    assert dwa["mode"] == "named_terms" and dwa["periods"] == 6
    assert list(dwa["loss_weights"]) == ["landmarks", "pose", "smile", "age", "gender", "mask", "glasses",
                                         "attractiveness", "quality"]
    assert dwa["weight_history"][2]["weights"] != dwa["weight_history"][1]["weights"]
    gn = results["gradnorm"]["loss_weights"]
    assert sum(gn.values()) == pytest.approx(9.0, abs=1e-3) and max(gn.values()) - min(gn.values()) > 1e-3
