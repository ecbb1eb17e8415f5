"""The Split Fashion-MNIST benchmark's report: paired per-seed differences against hand-computed numbers,
and how runs that stopped (diverged or collapsed) are labelled and counted."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import split_fashion_mnist as bench  # noqa: E402


def _record(label: str, seed: int, acc: float, fgt: float, failed: bool = False) -> dict:
    r = {"label": label, "seed": seed, "epochs": 1, "mem": 200, "draw": None, "time_s": 1.0, "cpu_s": 1.0,
         "average_accuracy": acc, "forgetting": fgt}
    if failed:
        r["failed"] = "training diverged"
    return r


def test_paired_differences_match_a_hand_computation() -> None:
    records = [_record("gm", 0, 0.80, 0.10), _record("gm", 1, 0.78, 0.12), _record("gm", 2, 0.79, 0.20),
               _record("der", 0, 0.77, 0.20), _record("der", 1, 0.79, 0.22), _record("der", 2, 0.76, 0.10),
               _record("der", 3, 0.99, 0.00),  # a seed the reference lacks is not paired
               _record("lonely", 0, 0.5, 0.5)]  # one common seed: no interval, left out
    paired = bench.paired_table(records, 1, 200, "gm")
    assert set(paired) == {"der"}
    e = paired["der"]
    assert e["seeds"] == [0, 1, 2] and e["ahead"] == 2
    # differences 3, -1, 3 points: mean 5/3, sample std sqrt(((4/3)^2 * 2 + (8/3)^2) / 2) = sqrt(16/3)
    acc = e["average_accuracy"]
    assert acc["mean"] == pytest.approx(5 / 3) and acc["std"] == pytest.approx((16 / 3) ** 0.5)
    half = 4.302652729911275 * (16 / 3) ** 0.5 / 3 ** 0.5  # t(0.975, 2)
    assert acc["ci95"] == pytest.approx([5 / 3 - half, 5 / 3 + half])
    assert e["forgetting"]["mean"] == pytest.approx((-10 - 10 + 10) / 3)


def test_stopped_runs_stay_in_the_means_and_are_counted() -> None:
    records = [_record("gm", 0, 0.80, 0.10), _record("gm", 1, 0.10, 0.50, failed=True)]
    entry = bench.table(records, 1, 200)["gm"]
    assert entry["average_accuracy_mean"] == pytest.approx(0.45) and entry["failed"] == 1
    assert bench.shown("gm", entry) == "gm [1 stopped]" and bench.shown("gm", {"failed": 0}) == "gm"


def test_clip_labels_keep_memory_free_runs_in_every_memory_column(monkeypatch) -> None:
    monkeypatch.setattr(bench, "GRAD_CLIP", 5.0)
    assert bench.labelled("ours naive") == "ours naive (clip 5)"
    assert bench.base_label("ours naive (clip 5)") == "ours naive"
    records = [{**_record("ours naive (clip 5)", 0, 0.2, 0.9), "mem": 0}]
    assert "ours naive (clip 5)" in bench.table(records, 1, 500)


def test_gm_specs_carry_plugin_options_into_the_label() -> None:
    assert bench.parse_gm("similarity_der:herding:logit_weight=1.0") == ("similarity_der", "herding", {"logit_weight": 1.0})
    assert bench.parse_gm("sum_der") == ("sum_der", None, {})
    assert bench.gm_label("similarity_der:herding:logit_weight=1.0") == \
        "ours gradient mixing: similarity_der + herding [logit_weight=1]"
    assert bench.gm_label("similarity_der:herding") == "ours gradient mixing: similarity_der + herding"
    with pytest.raises(SystemExit, match="key=value"):
        bench.parse_gm("similarity_der:herding:logit_weight")


def test_library_draws_reach_this_projects_runs_with_their_options(monkeypatch) -> None:
    calls = []
    monkeypatch.setattr(bench, "ours", lambda *args, **kwargs: calls.append((args, kwargs)))
    _, rehearsal = bench.plan(["similarity_der:herding:logit_weight=1.0"], ["hand-written", "avalanche"])
    runs = dict(rehearsal)
    runs["ours replay"](0, 1, 200, draw=3)
    runs["ours gradient mixing: similarity_der + herding [logit_weight=1]"](0, 1, 200, draw=3)
    assert calls == [(("replay", 0, 1, 200), {"draw": 3}),
                     (("gradient_mixing", 0, 1, 200), {"rule": "similarity_der", "policy": "herding", "draw": 3,
                                                       "logit_weight": 1.0})]
