"""benchmarks/panoptic_combine.py: shares of a method run alone against joint runs of other files."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from panoptic_combine import collect, main, summarise  # noqa: E402


def run_file(path: Path, seeds: dict[int, tuple[float, dict[str, tuple[float, float]]]]) -> Path:
    """A result file shaped like the benchmark's: seed -> (step-0 PQ, {method: (PQ all, PQ base)})."""
    runs = [{"seed": seed, "before_update": {"pq_all": before},
             "methods": {m: {"pq_all": [before, all_], "pq_base": [before, base]} for m, (all_, base) in methods.items()}}
            for seed, (before, methods) in seeds.items()]
    path.write_text(json.dumps({"scenarios": {"3-2": {"seeds": runs}}}))
    return path


def test_shares_by_hand_and_a_seed_from_another_deployed_model_left_out(tmp_path, capsys):
    new = run_file(tmp_path / "new.json", {0: (0.8, {"query_groups": (0.66, 0.76)}),
                                           1: (0.8, {"query_groups": (0.60, 0.72)}),
                                           2: (0.7, {"query_groups": (0.50, 0.60)})})
    old = run_file(tmp_path / "old.json", {0: (0.8, {"query_groups": (0.1, 0.1), "joint": (0.75, 0.80)}),
                                           1: (0.8, {"joint": (0.80, 0.80)}),
                                           2: (0.9, {"joint": (0.70, 0.90)})})
    summary = summarise(collect([new, old], "query_groups"))["3-2"]
    # the first file listed wins for the method: seed 0's 0.66 from new.json, not old.json's 0.1
    assert summary["seeds"][0]["pq_all"] == 0.66
    assert summary["seeds"][0]["kept"] == pytest.approx(0.76 / 0.8) and summary["seeds"][0]["of_joint"] == pytest.approx(0.88)
    assert summary["seeds"][1]["kept"] == pytest.approx(0.9) and summary["seeds"][1]["of_joint"] == pytest.approx(0.75)
    assert 2 in summary["left_out"] and 2 not in summary["seeds"]  # step-0 PQ 0.7 here, 0.9 there
    assert summary["of_joint"]["mean"] == pytest.approx(0.815) and summary["of_joint"]["std"] == pytest.approx(0.065)
    assert summary["kept"]["min"] == pytest.approx(0.9) and summary["kept"]["n"] == 2
    out = tmp_path / "summary.json"
    assert main([str(new), str(old), "--out", str(out)]) == 0
    assert "of joint 81.5% ± 6.5%" in capsys.readouterr().out
    assert json.loads(out.read_text())["scenarios"]["3-2"]["seeds"]["1"]["of_joint"] == pytest.approx(0.75)


def test_a_missing_file_is_named(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main([str(tmp_path / "nope.json")])
    assert "nope.json" in capsys.readouterr().err


def test_a_file_that_is_not_a_result_is_one_line_naming_it(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text('{"scenarios": {"3-2": {"seeds": [{"seed": 0}]}}}')  # no before_update
    with pytest.raises(SystemExit):
        main([str(bad)])
    err = capsys.readouterr().err
    assert f"{bad}: not a result file" in err and "Traceback" not in err
