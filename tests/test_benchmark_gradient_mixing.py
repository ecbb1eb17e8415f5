"""The gradient-mixing benchmark's transfer plan: extra rules with a logit weight, checked when the
command line is read."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gradient_mixing as bench  # noqa: E402


def test_fashion_rules_take_an_optional_logit_weight(monkeypatch) -> None:
    assert bench.fashion_rule("sum_der") == "sum_der" and bench.fashion_rule("similarity_der:1.0") == "similarity_der:1.0"
    for bad in ("nope", "similarity_der:-1", "similarity_der:heavy"):
        with pytest.raises(argparse.ArgumentTypeError):
            bench.fashion_rule(bad)
    monkeypatch.setattr(bench, "FASHION_RULES", ["similarity_der:1.0", "sum_der"])
    extra = dict(bench.transfer_plan("fashion_transfer", 10)[4:])
    assert extra == {"gradient mixing: similarity_der + herding [logit_weight=1]":
                     {"name": "gradient_mixing", "rule": "similarity_der", "logit_weight": 1.0},
                     "gradient mixing: sum_der + herding": {"name": "gradient_mixing", "rule": "sum_der"}}


def test_floor_part_times_every_phase_of_both_hand_written_steps() -> None:
    out = bench.floor_part(argparse.Namespace(floor_steps=10))
    for kind, phases in bench.FLOOR_PHASES.items():
        assert tuple(out["phase_us"][kind]) == phases
        assert all(v > 0 for v in out["phase_us"][kind].values())
        assert out["total_us"][kind] == pytest.approx(sum(out["phase_us"][kind].values()))
    assert out["ratio"] == pytest.approx(out["total_us"]["ghost"] / out["total_us"]["replay"])
    assert out["ratios"]["sum + history rows"] == pytest.approx(out["total_us"]["sum + history rows"] / out["total_us"]["replay"])
    assert out["sum_vs_ghost_relative_difference"] < 1e-5  # both constructions give the same mixed gradient


def test_cost_models_can_be_chosen_on_the_command_line(monkeypatch, tmp_path) -> None:
    seen = []
    monkeypatch.setattr(bench, "cost_part", lambda args: seen.append([n for n, _ in args.cost_models]) or {})
    monkeypatch.setattr(bench, "print_cost_table", lambda out: [])
    bench.main(["--parts", "cost", "--cost-models", "mlp", "--quiet", "--out", str(tmp_path / "c.json")])
    assert seen == [[next(iter(bench.COST_MODELS))]]


def test_time_training_reports_every_step_after_the_first() -> None:
    cpu, wall, steps = bench.time_training("mixing, auto", next(iter(bench.COST_MODELS)), 4)
    assert cpu > 0 and wall > 0 and len(steps) == 3 and all(s > 0 for s in steps)  # 4 steps: 3 intervals
    assert sum(steps) < wall


def test_transfer_plan_runs_the_shipped_config_beside_the_defaults() -> None:
    # digits_transfer.yaml gives the plugin history_weight 3: its own row, after the plugin's defaults
    plan = dict(bench.transfer_plan("digits_transfer", 5))
    assert plan["gradient mixing: shipped config [history_weight=3]"] == {"name": "gradient_mixing", "history_weight": 3.0}
    assert bench.shipped_mixing_options("fashion_transfer") == {}  # no options of its own: no extra row


def test_transfer_rows_pair_each_seed_with_fine_tuning() -> None:
    def row(transfer: float) -> dict:
        return {"general_before": 0.9, "general_after": 0.9, "transfer_before": 0.1, "transfer_after": transfer,
                "adapt_time_s": 1.0}

    fine, mixed = [row(0.80), row(0.70), row(0.75)], [row(0.78), row(0.70), row(0.72)]
    d = bench._mean_rows(mixed, fine)["transfer_minus_fine_tune"]
    # differences -0.02, 0, -0.03: mean -0.01667, std 0.01528, t(0.975, 2) = 4.303
    assert d["mean"] == pytest.approx(-0.05 / 3) and d["std"] == pytest.approx(0.015275, abs=1e-6)
    half = 4.302653 * 0.0152753 / 3 ** 0.5
    assert d["ci95"] == pytest.approx([-0.05 / 3 - half, -0.05 / 3 + half], abs=1e-6)
    assert bench._mean_rows(fine, fine)["transfer_minus_fine_tune"]["mean"] == 0.0
