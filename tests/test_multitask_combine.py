"""Combining Δm% over the seeds of several multi-task benchmark files: one pooled single-task reference,
pairing by seed, refusals."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import multitask_combine as mc  # noqa: E402

SETTINGS = {"n_train": 1200, "n_test": 1000, "epochs": 8, "missing": 0.5, "default": "dwa_ema_exp_init"}
HIGHER = {"acc": True, "err": False}


def result(tmp_path: Path, name: str, single: dict[int, tuple[float, float]],
           runs: dict[str, dict[int, tuple[float, float]]], **settings) -> Path:
    """A result file: per seed (acc, err) of the single-task networks and of each method's run."""
    path = tmp_path / name
    path.write_text(json.dumps({
        "settings": {**SETTINGS, **settings, "seeds": sorted(single)}, "higher_is_better": HIGHER,
        "single_task": {t: {str(s): v[i] for s, v in single.items()} for i, t in enumerate(HIGHER)},
        "runs": {m: {str(s): {"headline": dict(zip(HIGHER, v))} for s, v in by_seed.items()} for m, by_seed in runs.items()},
    }))
    return path


def test_delta_m_against_the_pooled_reference_paired_seed_by_seed(tmp_path, capsys) -> None:
    # single-task acc 0.8, 0.6 (file a) and 1.0 (file b): pooled 0.8 (file a alone would say 0.7); err 2.0
    a = result(tmp_path, "a.json", {0: (0.8, 1.0), 1: (0.6, 3.0)},
               {"equal": {0: (0.8, 2.0), 1: (0.72, 2.0)}, "dwa": {0: (0.88, 2.0), 1: (0.8, 2.0)}})
    b = result(tmp_path, "b.json", {2: (1.0, 2.0)},
               {"equal": {2: (0.8, 2.2)}, "dwa": {2: (0.8, 1.8)}, "gradnorm": {2: (0.88, 2.0)}})
    out = tmp_path / "c.json"
    assert mc.main([str(a), str(b), "--ratio", "dwa", "equal", "--out", str(out)]) == 0
    written = json.loads(out.read_text())
    table = written["methods"]
    # seed means: dwa acc 0.8267 / equal 0.7733; err: equal 2.0667 / dwa 1.9333 (errors: full over part)
    assert written["score_ratios"]["dwa / equal"] == pytest.approx({"acc": 0.82667 / 0.77333, "err": 2.06667 / 1.93333}, rel=1e-4)
    # Δm = 50 (drop_acc + drop_err): equal 0, 5, 5; dwa -5, 0, -5; differences -5, -5, -10
    assert table["equal"]["delta_m_mean"] == pytest.approx(10 / 3)
    assert table["dwa"]["delta_m_mean"] == pytest.approx(-10 / 3)
    assert table["dwa"]["minus_equal"]["mean"] == pytest.approx(-20 / 3)
    assert table["dwa"]["minus_equal"]["std"] == pytest.approx((25 / 3) ** 0.5)
    assert table["dwa"]["lower_than_equal_on"] == 3 and table["dwa"]["seeds"] == [0, 1, 2]
    # a method of one file pairs only on the seeds both have
    assert table["gradnorm"]["minus_equal"]["n"] == 1 and table["gradnorm"]["minus_equal"]["mean"] == pytest.approx(-10.0)
    # seed means: dwa acc 0.8267 and err 1.9333, each 3.33% better than the pooled reference
    assert table["dwa"]["relative_drop_pct"] == pytest.approx({"acc": -10 / 3, "err": -10 / 3})
    # gradnorm: acc 10% better, err level: its worst task is err
    assert (table["gradnorm"]["worst_task"], table["gradnorm"]["worst_drop_pct"]) == ("err", pytest.approx(0.0))
    assert "lower on" in capsys.readouterr().out


def test_files_of_other_settings_or_disagreeing_seeds_are_refused(tmp_path) -> None:
    a = result(tmp_path, "a.json", {0: (0.8, 1.0)}, {"equal": {0: (0.8, 1.0)}})
    longer = result(tmp_path, "b.json", {1: (0.8, 1.0)}, {"equal": {1: (0.8, 1.0)}}, epochs=16)
    with pytest.raises(SystemExit, match=r"b\.json: settings\.epochs is 16"):
        mc.main([str(a), str(longer)])
    again = result(tmp_path, "c.json", {0: (0.8, 1.0)}, {"equal": {0: (0.7, 1.0)}})
    with pytest.raises(SystemExit, match=r"c\.json: equal seed 0 reads"):
        mc.main([str(a), str(again)])
    with pytest.raises(SystemExit, match="--baseline 'nope' is in no file"):
        mc.main([str(a), "--baseline", "nope"])
    with pytest.raises(SystemExit, match="--ratio: 'nope' is in no file"):
        mc.main([str(a), "--ratio", "nope", "equal"])
    broken = tmp_path / "d.json"
    broken.write_text("{}")
    with pytest.raises(SystemExit, match=r"d\.json: not a multitask_weighting\.py result"):
        mc.main([str(broken)])


def test_one_file_reproduces_the_benchmarks_own_summary() -> None:
    path = ROOT / "benchmarks" / "results" / "multitask_weighting.json"
    pooled = mc.collect([path])
    summary = json.loads(path.read_text())["summary"]
    for method, entry in summary.items():
        score = pooled.score(method)
        by_seed = score["delta_m_by_seed"]
        assert [by_seed[s] for s in sorted(by_seed)] == pytest.approx(entry["delta_m_per_seed"])
        assert score["relative_drop_pct"] == pytest.approx(entry["relative_drop_pct"])
