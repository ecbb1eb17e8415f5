"""The multi-task benchmark's masked-label budget sweep: ratios oriented so that 1 means "as good as all
labels", against the same budget and against the best all-label budget (hand-computed numbers)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import multitask_weighting as bench  # noqa: E402


def test_masked_budget_ratios(monkeypatch) -> None:
    # accuracy task "smile" (higher is better), error task "pose" (lower is better); every other task 1.0
    table = {(8, 0.0): {"smile": 0.80, "pose": 8.0}, (8, 0.5): {"smile": 0.72, "pose": 10.0},
             (16, 0.0): {"smile": 0.70, "pose": 9.0}, (16, 0.5): {"smile": 0.76, "pose": 8.4}}

    def run_one(cfg, raw, label, verbose):
        values = table[(cfg.train.epochs, cfg.scenario.missing_fraction)]
        return {"headline": {t: values.get(t, 1.0) for t in bench.TASKS}}

    monkeypatch.setattr(bench, "run_one", run_one)
    monkeypatch.setattr(bench, "raw_data", lambda cfg: None)
    args = argparse.Namespace(seeds=[0], n_train=10, n_test=10, epochs=8, missing=0.5, masked_budgets=[8, 16], quiet=True)
    out = bench.masked_budget_sweep(args)
    at8, at16 = out["budgets"]["8"], out["budgets"]["16"]
    assert at8["ratio_same_budget"]["smile"] == pytest.approx(0.9) and at8["ratio_same_budget"]["pose"] == pytest.approx(0.8)
    # all labels overfit at 16 epochs: the masked run beats them there, not the best all-label budget (8)
    assert at16["ratio_same_budget"]["smile"] == pytest.approx(0.76 / 0.70)
    assert at16["ratio_to_best_full"]["smile"] == pytest.approx(0.95) and at16["ratio_to_best_full"]["pose"] == pytest.approx(8 / 8.4)
    assert at8["tasks_at_95_same_budget"] == len(bench.TASKS) - 2  # smile 0.9 and pose 0.8 fall short


def test_masked_size_sweep_compares_equal_label_counts(monkeypatch) -> None:
    # pose error falls with the images (8 at 100, 6 at 200 with all labels); the masked run on 200 images
    # (100 pose labels) scores 7.5: 0.8 of all labels on 200, 8 / 7.5 against all labels on 100 images
    table = {(100, 0.0): 8.0, (100, 0.5): 10.0, (200, 0.0): 6.0, (200, 0.5): 7.5}

    def run_one(cfg, raw, label, verbose):
        pose = table[(cfg.scenario.n_train, cfg.scenario.missing_fraction)]
        return {"headline": {t: pose if t == "pose" else 1.0 for t in bench.TASKS}}

    monkeypatch.setattr(bench, "run_one", run_one)
    monkeypatch.setattr(bench, "raw_data", lambda cfg: None)
    args = argparse.Namespace(seeds=[0], n_train=10, n_test=10, epochs=8, missing=0.5, masked_budgets=[8],
                              masked_sizes=[100, 200], quiet=True)
    out = bench.masked_size_sweep(args)
    assert out["sizes"]["200"]["budgets"]["8"]["ratio_same_budget"]["pose"] == pytest.approx(0.8)
    assert out["sizes"]["100"]["budgets"]["8"]["ratio_same_budget"]["pose"] == pytest.approx(0.8)
    assert out["same_labels"] == {"200 masked vs 100 all labels": {t: pytest.approx(8 / 7.5 if t == "pose" else 1.0)
                                                                    for t in bench.TASKS}}
