"""`incremental grid` and `incremental report`: grid files and cell names, skip / resume / failure
handling, the report's numbers against the cells' results.json, and the submitit launcher."""
from __future__ import annotations

import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from incremental.cli import main
from incremental.config import ConfigError
from incremental.grids import runner as grid_runner
from incremental.grids.collect import find_runs, group_runs
from incremental.grids.report import write_report
from incremental.grids.runner import GridError, plan_grid, prepare_cells, threads_per_cell
from incremental.grids.spec import load_grid, short_names, value_token

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "configs" / "quickstart.yaml"
TINY_SET = {"train.epochs": 1, "scenario.n_experiences": 2, "model.hidden_size": 16}


def write_grid(path: Path, **sections) -> Path:
    path.write_text(yaml.safe_dump({"base": str(QUICKSTART), **sections}, sort_keys=False))
    return path


# ---------------------------------------------------------------------------------------------- grid files
def test_cells_are_the_product_of_axes_with_zipped_axes_moving_together(tmp_path):
    spec = load_grid(write_grid(tmp_path / "g.yaml", set={"train.epochs": 2},
                                grid={"strategy.plugins": [[{"name": "replay"}], [{"name": "gradient_mixing", "rule": "pcgrad"}]],
                                      "strategy.history.mem_size": [200, 500]},
                                zip={"seed": [0, 1], "scenario.class_order": [list(range(10)), list(range(9, -1, -1))]}))
    cells = spec.cells()
    assert len(cells) == 2 * 2 * 2
    first = cells[0]
    assert first.name == "plugins=replay,mem_size=200,seed=0,class_order=0-1-2-3-4-5-6-7-8-9"
    assert cells[-1].name.startswith("plugins=gradient_mixing_rule=pcgrad,mem_size=500,seed=1")
    assert first.overrides == {"train.epochs": 2, "strategy.plugins": [{"name": "replay"}],
                               "strategy.history.mem_size": 200, "seed": 0, "scenario.class_order": list(range(10))}
    # the class order always comes with its seed
    assert {(c.overrides["seed"], c.overrides["scenario.class_order"][0]) for c in cells} == {(0, 0), (1, 9)}
    assert first.set_args()[-1] == "scenario.class_order=[0, 1, 2, 3, 4, 5, 6, 7, 8, 9]"


def test_cell_names_are_safe_and_short():
    assert short_names(["strategy.name", "model.hidden_size", "a.size", "b.size"]) == {
        "strategy.name": "strategy", "model.hidden_size": "hidden_size", "a.size": "a.size", "b.size": "b.size"}
    assert value_token(0.1) == "0.1" and value_token("a b/c") == "a_b_c" and value_token([]) == "none"
    assert value_token([{"name": "lwf", "alpha": 1}, {"name": "replay"}]) == "lwf_alpha=1+replay"
    long = value_token(list(range(40)))
    assert len(long) <= 21 and long != value_token(list(range(41)))


@pytest.mark.parametrize("sections, message", [
    ({"grid": {"seed": 3}}, "non-empty list"),
    ({"zip": {"seed": [0, 1], "scenario.class_order": [[0]]}}, "equal lengths"),
    ({"grid": {"seed": [0, 1]}, "zip": {"seed": [2, 3]}}, "more than one axis"),
    ({"grid": {"seed": [0, 1]}, "set": {"seed": 4}}, "both an axis"),
    ({"grdi": {"seed": [0]}}, "unknown key"),
    ({"grid": {"train.lr": ["0.1", 0.1]}}, "share the directory name"),
])
def test_bad_grid_files_are_one_line_errors(tmp_path, sections, message):
    with pytest.raises(ConfigError, match=message) as err:
        load_grid(write_grid(tmp_path / "g.yaml", **sections))
    assert "\n" not in str(err.value)


def test_bad_cell_config_fails_before_anything_runs(tmp_path, capsys):
    grid = write_grid(tmp_path / "g.yaml", grid={"train.lr": [0.1, -1.0]})
    code = main(["grid", str(grid), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "train.lr" in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


#: Grids on configs/split_fashion_mnist.yaml whose reports were measured before it clipped the gradient.
MEASURED_WITHOUT_CLIPPING = {f"split_fashion_mnist_{name}" for name in
                             ("float_noise", "rehearsal", "replay", "rules", "rules_heldout")}


@pytest.mark.parametrize("grid_file", sorted((ROOT / "configs" / "grids").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_grid_prepares_its_cells(grid_file):
    cells = prepare_cells(load_grid(grid_file))
    assert cells and len({c.name for c in cells}) == len(cells)
    if grid_file.stem in MEASURED_WITHOUT_CLIPPING:
        # a grid stays what its committed report says when the base config changes
        assert {c.resolved["train"]["grad_clip"] for c in cells} == {None}


def test_threads_per_cell_never_oversubscribe():
    assert threads_per_cell(jobs=2, cores=16) == 8
    assert threads_per_cell(jobs=3, nproc=2, cores=16) == 2
    assert threads_per_cell(jobs=4, cores=2) == 1


# ---------------------------------------------------------------------------------------------- planning
def _fake_results(cell_dir: Path, config: dict, **metrics) -> None:
    cell_dir.mkdir(parents=True, exist_ok=True)
    (cell_dir / "results.json").write_text(json.dumps({"config": config, "seed": config.get("seed"), **metrics}))


def test_a_changed_grid_is_an_error_unless_forced(tmp_path):
    out = tmp_path / "out"
    spec = load_grid(write_grid(tmp_path / "g.yaml", set=TINY_SET, grid={"seed": [0, 1]}))
    cells = prepare_cells(spec)
    (out / "grid.json").parent.mkdir()
    (out / "grid.json").write_text(json.dumps({"cells": {c.name: {"config": c.resolved} for c in cells}}))
    _fake_results(out / "seed=0", cells[0].resolved)
    plan = plan_grid(out, cells, force=False)
    assert plan.states == {"seed=0": "done", "seed=1": "new"} and plan.stale == []
    changed = prepare_cells(load_grid(write_grid(tmp_path / "g.yaml", set={**TINY_SET, "train.lr": 0.05},
                                                 grid={"seed": [0, 1, 2]})))
    with pytest.raises(GridError) as err:
        plan_grid(out, changed, force=False)
    assert "1 cells added" in str(err.value) and "train.lr 0.1 -> 0.05" in str(err.value) and "--force" in str(err.value)
    forced = plan_grid(out, changed, force=True)
    assert forced.states["seed=0"] == "new" and sorted(forced.stale) == ["seed=0", "seed=1"]


# ---------------------------------------------------------------------------------------------- the report
def test_report_means_and_stds_over_seeds(tmp_path):
    configs = {}
    accs = {("replay", 0): 0.80, ("replay", 1): 0.84, ("replay", 2): 0.83, ("gradient_mixing", 0): 0.90,
            ("gradient_mixing", 1): 0.94, ("gradient_mixing", 2): 0.91}
    for (strategy, seed), acc in accs.items():
        order = list(range(10))[seed:] + list(range(10))[:seed]  # a class order that moves with the seed
        config = {"seed": seed, "strategy": {"name": strategy}, "scenario": {"class_order": order},
                  "logging": {"csv": seed != 1}}  # logging never makes a setting
        configs[(strategy, seed)] = config
        _fake_results(tmp_path / f"{strategy}-{seed}", config, average_accuracy=acc, forgetting=1 - acc, bwt=acc - 1,
                      wall_time_s=10.0 + seed, accuracy_matrix=[[1.0, 0.0], [acc, acc]])
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "results.json").write_text("{}")
    keys, groups = group_runs(find_runs(tmp_path))
    assert keys == ["strategy.name"] and len(groups) == 2
    _, files = write_report(tmp_path, tmp_path / "rep")
    report = json.loads((tmp_path / "rep" / "report.json").read_text())
    for row in report["rows"]:
        values = [a for (s, _), a in accs.items() if s == row["strategy.name"]]
        assert row["n"] == 3 and row["seeds"] == [0, 1, 2]
        assert row["avg_acc_mean"] == pytest.approx(statistics.mean(values))
        assert row["avg_acc_std"] == pytest.approx(statistics.stdev(values))
        assert row["time_s_mean"] == pytest.approx(11.0)
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "| strategy | n | avg acc (%)" in md and "82.3 ± 2.1" in md
    assert {f.name for f in files} >= {"report.csv", "accuracy_bars.png", "per_experience.png"}


def test_report_plots_accuracy_against_a_numeric_key_and_handles_single_runs(tmp_path):
    for mem in (100, 200, 500):
        for strategy in ("replay", "gradient_mixing"):
            _fake_results(tmp_path / f"{strategy}-{mem}", {"seed": 0, "strategy": {"name": strategy, "mem_size": mem}},
                          average_accuracy=mem / 1000)
    table, files = write_report(tmp_path)
    assert (tmp_path / "report" / "accuracy_vs_strategy_mem_size.png") in files
    rows = json.loads((tmp_path / "report" / "report.json").read_text())["rows"]
    assert all(r["n"] == 1 and r["avg_acc_std"] is None for r in rows)
    assert "| 50.0 |" in table


def test_report_pools_replicate_axes_with_the_seeds(tmp_path, capsys):
    accs = {(0, 1): 0.80, (0, 2): 0.76, (1, 1): 0.84, (1, 2): 0.86}  # (seed, threads)
    for (seed, threads), acc in accs.items():
        _fake_results(tmp_path / f"s{seed}-t{threads}", {"seed": seed, "train": {"threads": threads}},
                      average_accuracy=acc)
    keys, groups = group_runs(find_runs(tmp_path))
    assert keys == ["train.threads"] and len(groups) == 2
    assert main(["report", str(tmp_path), "--pool", "train.threads", "--no-plots"]) == 0
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    (row,) = report["rows"]
    assert row["n"] == 4 and row["seeds"] == [0, 0, 1, 1] and report["pooled"] == ["train.threads"]
    assert row["avg_acc_mean"] == pytest.approx(0.815)
    assert row["avg_acc_std"] == pytest.approx(statistics.stdev(accs.values()))
    assert "over seeds and train.threads" in capsys.readouterr().out
    assert main(["report", str(tmp_path), "--pool", "train.thread"]) == 2
    assert "--pool train.thread: no run" in capsys.readouterr().err



def test_report_pairs_a_key_seed_by_seed_against_its_first_value(tmp_path, capsys):
    # accuracy / forgetting per (shift, mem, seed); the seed 3 run of shift 1, memory 200 is missing
    runs = {(0, 200, 0): (0.70, 0.20), (0, 200, 1): (0.80, 0.10), (0, 200, 2): (0.75, 0.15), (0, 200, 3): (0.9, 0.1),
            (1, 200, 0): (0.72, 0.17), (1, 200, 1): (0.81, 0.12), (1, 200, 2): (0.79, 0.10),
            (0, 500, 0): (0.80, 0.10), (0, 500, 1): (0.82, 0.08),
            (1, 500, 0): (0.79, 0.10), (1, 500, 1): (0.80, 0.10)}
    for (shift, mem, seed), (acc, fgt) in runs.items():
        _fake_results(tmp_path / f"{shift}-{mem}-{seed}", {"seed": seed, "shift": shift, "mem": mem},
                      average_accuracy=acc, forgetting=fgt)
    assert main(["report", str(tmp_path), "--paired", "shift", "--no-plots"]) == 0
    pairs = json.loads((tmp_path / "report" / "report.json").read_text())["paired"]
    assert [(p["mem"], p["shift"], p["reference"]) for p in pairs] == [(200, 1, 0), (500, 1, 0)]
    acc200 = pairs[0]["average_accuracy"]
    # differences +2, +1, +4 points (seed 3 has no partner): mean 2.333, std 1.528, t(0.975, 2) = 4.303
    assert acc200["n"] == 3 and acc200["higher"] == 3
    assert acc200["mean"] == pytest.approx(7 / 3) and acc200["std"] == pytest.approx(statistics.stdev([2, 1, 4]))
    half = 4.302653 * statistics.stdev([2, 1, 4]) / math.sqrt(3)
    assert acc200["ci95"] == pytest.approx([7 / 3 - half, 7 / 3 + half], rel=1e-5)
    fgt500 = pairs[1]["forgetting"]  # 0 and +2 points
    assert fgt500["mean"] == pytest.approx(1.0) and fgt500["higher"] == 1
    out = capsys.readouterr().out
    assert "Paired by seed against shift = 0" in out and "| 200 | 1 − 0 | +2.33 ± 1.53 | [-1.46, +6.13] | 3 of 3 |" in out
    assert main(["report", str(tmp_path), "--paired", "threads"]) == 2
    assert "--paired threads: not a setting key" in capsys.readouterr().err

def test_report_of_an_empty_folder_is_a_one_line_error(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "no results.json" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- running (fake cells)
FAKE_CELL = r"""
import json, os, sys, pathlib
d = pathlib.Path(sys.argv[1])
cfg = json.loads((d.parent / "grid.json").read_text())["cells"][d.name]["config"]
if cfg["strategy"]["plugins"][0]["name"] == "gradient_mixing" and cfg["seed"] == 1:
    print("error: strategy.name: boom")
    sys.exit(2)
acc = 0.5 + 0.1 * cfg["seed"]
(d / "results.json").write_text(json.dumps({"config": cfg, "seed": cfg["seed"], "average_accuracy": acc,
                                            "threads": os.environ["OMP_NUM_THREADS"]}))
"""


def test_grid_runs_cells_in_parallel_reports_failures_and_skips_finished_cells(tmp_path, monkeypatch, capsys):
    """The runner's logic with a stand-in for `incremental run` (a few ms per cell instead of seconds)."""
    monkeypatch.setattr(grid_runner, "cell_command", lambda cell_dir, torchrun=None: [sys.executable, "-c", FAKE_CELL, str(cell_dir)])
    grid = write_grid(tmp_path / "g.yaml", grid={"strategy.plugins": [[{"name": "replay"}], [{"name": "gradient_mixing"}]],
                                                 "seed": [0, 1]})
    out = tmp_path / "out"
    code = main(["grid", str(grid), "--out", str(out), "--jobs", "2", "--quiet"])
    stdout = capsys.readouterr().out
    assert code == 1
    assert "4 cells: 3 ran, 1 failed" in stdout
    assert "FAILED plugins=gradient_mixing,seed=1 (exit 2): error: strategy.name: boom" in stdout
    status = json.loads((out / "grid_status.json").read_text())
    assert status["finished"] and status["cells"]["plugins=gradient_mixing,seed=1"]["status"] == "failed"
    assert json.loads((out / "plugins=replay,seed=0" / "results.json").read_text())["threads"] == str(threads_per_cell(2))
    assert (out / "plugins=replay,seed=0" / "config.yaml").is_file()
    # re-running: the three finished cells are skipped, the failed one runs again (and fails again)
    code = main(["grid", str(grid), "--out", str(out), "--jobs", "2", "--quiet"])
    assert code == 1 and "4 cells: 3 skipped, 1 failed" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------- running (real cells)
def _grid_process(grid: Path, out: Path, *extra: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "incremental", "grid", str(grid), "--out", str(out), "--quiet", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env={**os.environ, **(env or {})})


@pytest.mark.slow  # ~8 real runs (2-3 minutes on 2 busy cores); the runner's logic is covered by the fake-cell tests
def test_grid_kill_resume_and_report_end_to_end(tmp_path):
    """2 seeds x 2 strategies of real runs: the grid is killed after its first cell; a second run (--jobs 2)
    skips that cell while every other cell dies after its first experience (fault injection) and is
    reported; a third run resumes those cells from their checkpoints; the report's means and stds are
    those of the cells' results.json, and every cell's CSV log holds each iteration once."""
    grid = write_grid(tmp_path / "g.yaml", set=TINY_SET, zip={"seed": [0, 1]},
                      grid={"strategy.plugins": [[{"name": "replay"}], [{"name": "gradient_mixing"}]]})
    out = tmp_path / "out"
    first_cell = out / "plugins=replay,seed=0"
    proc = _grid_process(grid, out, "--jobs", "1")
    deadline = time.time() + 300
    while not (first_cell / "results.json").is_file():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[0]
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    first_results = (first_cell / "results.json").read_text()

    killed = _grid_process(grid, out, "--jobs", "2", env={"INCREMENTAL_KILL_AFTER_EXPERIENCE": "1"})
    output = killed.communicate(timeout=600)[0]
    assert killed.returncode == 1, output
    assert "4 cells: 1 skipped, 3 failed" in output and output.count("FAILED") == 3
    status = json.loads((out / "grid_status.json").read_text())["cells"]
    assert status["plugins=replay,seed=0"]["action"] == "skipped"

    resumed = _grid_process(grid, out, "--jobs", "2")
    output = resumed.communicate(timeout=600)[0]
    assert resumed.returncode == 0, output
    assert "4 cells: 1 skipped, 3 resumed" in output
    assert (first_cell / "results.json").read_text() == first_results
    assert (first_cell / "run.log").read_text().count("=== ") == 1  # the first cell ran once

    cells = [json.loads(p.read_text()) for p in sorted(out.glob("*/results.json"))]
    assert len(cells) == 4
    report = json.loads((out / "report" / "report.json").read_text())
    assert [r["strategy.plugins"] for r in report["rows"]] == [[{"name": "replay"}], [{"name": "gradient_mixing"}]]
    for row in report["rows"]:
        mine = [c for c in cells if c["config"]["strategy"]["plugins"] == row["strategy.plugins"]]
        accs = [c["average_accuracy"] for c in mine]
        forgetting = [c["forgetting"] for c in mine]
        assert row["avg_acc_mean"] == pytest.approx(statistics.mean(accs))
        assert row["avg_acc_std"] == pytest.approx(statistics.stdev(accs))
        assert row["forgetting_mean"] == pytest.approx(statistics.mean(forgetting))
    import csv

    for cell_dir in out.glob("plugins=*"):
        with open(cell_dir / "logs" / "iterations.csv", newline="") as handle:
            iterations = [int(r["iteration"]) for r in csv.DictReader(handle)]
        assert iterations == list(range(len(iterations))) and iterations  # resumed cells: each iteration once


def test_submitit_launcher_with_fake_cells(tmp_path, monkeypatch, capsys):
    """submitit's in-process ``debug`` cluster: the same map_array / poll / result path, in milliseconds."""
    pytest.importorskip("submitit")
    monkeypatch.setattr(grid_runner, "cell_command", lambda cell_dir, torchrun=None: [sys.executable, "-c", FAKE_CELL, str(cell_dir)])
    grid = write_grid(tmp_path / "g.yaml", grid={"strategy.plugins": [[{"name": "gradient_mixing"}]], "seed": [0, 1]},
                      submitit={"cluster": "debug"})
    code = main(["grid", str(grid), "--out", str(tmp_path / "out"), "--launcher", "submitit", "--quiet"])
    assert code == 1 and "2 cells: 1 ran, 1 failed" in capsys.readouterr().out


@pytest.mark.slow  # two real runs in submitit's local job processes (~1 minute on 2 busy cores)
def test_submitit_local_executor_runs_a_two_cell_grid(tmp_path, capsys):
    pytest.importorskip("submitit")
    grid = write_grid(tmp_path / "g.yaml", set=TINY_SET, grid={"seed": [0, 1]},
                      submitit={"cluster": "local", "timeout_min": 10})
    out = tmp_path / "out"
    code = main(["grid", str(grid), "--out", str(out), "--launcher", "submitit", "--jobs", "2", "--quiet"])
    stdout = capsys.readouterr().out
    assert code == 0, stdout
    assert "2 cells: 2 ran" in stdout
    assert sorted(p.parent.name for p in out.glob("*/results.json")) == ["seed=0", "seed=1"]
    assert any((out / ".submitit").rglob("*_result.pkl"))  # the cells went through submitit's jobs
    assert len(find_runs(out)) == 2  # submitit's own folder is not a run
