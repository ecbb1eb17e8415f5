"""The `incremental run` command: config validation (one-line errors, exit 2, nothing written),
overrides, results.json, plots, and resume after a kill between experiences."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from incremental.cli import main
from incremental.config import ConfigError, apply_overrides

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--set", "train.epochs=1", "--set", "scenario.n_experiences=3", "--set", "model.hidden_size=32", "--quiet"]


def run_cli(args, capsys):
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("override, key", [
    ("strategy.nme=3", "strategy.nme"),
    ("train.epochs=three", "train.epochs"),
    ("train.lr=-1", "train.lr"),
    ("scenario.n_experiences=11", "scenario.n_experiences"),
    ("scenario.class_order=[3,1,2,0]", "scenario.class_order"),
    ("strategy.name=magic", "strategy.name"),
    ("strategy.plugins=[{name: magic}]", "strategy.plugins[0].name"),
    ("strategy.plugins=[{name: replay, rule: sum}]", "strategy.plugins[0].rule"),
    ("scenario.name=imagenet", "scenario.name"),
    ("strategy.history.policy=fifo", "strategy.history.policy"),
])
def test_bad_config_is_a_one_line_error_exit_2_and_nothing_written(tmp_path, capsys, override, key):
    out = tmp_path / "run"
    code, _, err = run_cli(["run", str(ROOT / "configs/quickstart.yaml"), "--out", str(out), "--set", override], capsys)
    assert code == 2
    assert err.startswith(f"error: {key}") and err.count("\n") == 1
    assert not out.exists()


def test_missing_config_file(tmp_path, capsys):
    code, _, err = run_cli(["run", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "does not exist" in err


def test_overrides_are_parsed_as_yaml():
    data = apply_overrides({}, ["scenario.class_order=[3,1,2,0]", "train.lr=0.1", "strategy.name=naive", "a.b=true"])
    assert data == {"scenario": {"class_order": [3, 1, 2, 0]}, "train": {"lr": 0.1},
                    "strategy": {"name": "naive"}, "a": {"b": True}}
    with pytest.raises(ConfigError):
        apply_overrides({}, ["novalue"])


def test_run_writes_results_json_and_heatmap(tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, _ = run_cli(["run", str(ROOT / "configs/quickstart.yaml"), "--out", str(out), *TINY[:-1]], capsys)
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    for key in ("accuracy_matrix", "average_accuracy", "forgetting", "bwt", "wall_time_s", "seed", "config"):
        assert key in results
    assert len(results["accuracy_matrix"]) == 3 and len(results["accuracy_matrix"][0]) == 3
    assert results["config"]["strategy"]["plugins"][0]["name"] == "gradient_mixing"
    assert (out / "gradient_mixing_exp0.png").exists() or any(out.glob("gradient_mixing*.png"))
    assert (out / "accuracy_matrix.png").stat().st_size > 1000
    from incremental.package import load_model
    assert load_model(out / "model.pt").class_names == [str(c) for c in range(10)]
    assert "average_accuracy=" in stdout
    # a second run into the same directory refuses to overwrite
    code, _, err = run_cli(["run", str(ROOT / "configs/quickstart.yaml"), "--out", str(out), *TINY], capsys)
    assert code == 2 and "--resume" in err


@pytest.mark.parametrize("config", ["split_digits_naive", "split_digits_joint", "split_digits_cumulative"])
def test_every_strategy_config_runs(tmp_path, capsys, config):
    code, _, _ = run_cli(["run", str(ROOT / f"configs/{config}.yaml"), "--out", str(tmp_path), *TINY,
                          "--set", "train.epochs=3"], capsys)
    assert code == 0
    R = json.loads((tmp_path / "results.json").read_text())["accuracy_matrix"]
    if config == "split_digits_naive":
        assert R[-1][0] < 0.2  # fine-tuning forgets the first experience
    else:
        assert R[-1][0] > 0.5  # joint / cumulative keep it


def _cli(args, env=None):
    return subprocess.run([sys.executable, "-m", "incremental", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300)


def test_killed_run_resumes_to_identical_numbers(tmp_path):
    args = ["run", "configs/quickstart.yaml", *TINY, "--set", "scenario.n_experiences=4"]
    ref = _cli([*args, "--out", str(tmp_path / "ref")])
    assert ref.returncode == 0, ref.stderr
    killed = _cli([*args, "--out", str(tmp_path / "k")], env={"INCREMENTAL_KILL_AFTER_EXPERIENCE": "2"})
    assert killed.returncode == -9  # SIGKILL between experiences 2 and 3
    assert not (tmp_path / "k" / "results.json").exists()
    resumed = _cli([*args, "--out", str(tmp_path / "k"), "--resume"])
    assert resumed.returncode == 0, resumed.stderr
    a = json.loads((tmp_path / "ref" / "results.json").read_text())
    b = json.loads((tmp_path / "k" / "results.json").read_text())
    assert a["accuracy_matrix"] == b["accuracy_matrix"]
    assert a["average_accuracy"] == b["average_accuracy"]



def test_killed_run_with_shifted_history_resumes_to_identical_numbers(tmp_path):
    # gradient mixing's history_shift draws from its own generator: a resumed run must continue its draws
    import yaml

    from tests.data_fixtures import write_image_folder

    root = write_image_folder(tmp_path / "imgs", n_per_class=10, n_classes=4)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "seed": 0, "scenario": {"name": "class_incremental", "source": "imagefolder", "root": str(root),
                                "test_fraction": 0.25, "n_experiences": 4},
        "strategy": {"plugins": [{"name": "gradient_mixing", "history_shift": 1}], "history": {"mem_size": 12}},
        "train": {"epochs": 2, "batch_size": 8, "lr": 0.1}, "model": {"name": "mlp", "hidden_size": 16}}))
    args = ["run", str(config), "--quiet"]
    ref = _cli([*args, "--out", str(tmp_path / "ref")])
    assert ref.returncode == 0, ref.stderr
    killed = _cli([*args, "--out", str(tmp_path / "k")], env={"INCREMENTAL_KILL_AFTER_EXPERIENCE": "2"})
    assert killed.returncode == -9
    resumed = _cli([*args, "--out", str(tmp_path / "k"), "--resume"])
    assert resumed.returncode == 0, resumed.stderr
    a = json.loads((tmp_path / "ref" / "results.json").read_text())
    b = json.loads((tmp_path / "k" / "results.json").read_text())
    assert a["accuracy_matrix"] == b["accuracy_matrix"]

def test_truncated_checkpoint_is_refused_and_the_previous_one_used(tmp_path):
    args = ["run", "configs/quickstart.yaml", *TINY, "--set", "scenario.n_experiences=4"]
    ref = _cli([*args, "--out", str(tmp_path / "ref")])
    killed = _cli([*args, "--out", str(tmp_path / "k")], env={"INCREMENTAL_KILL_AFTER_EXPERIENCE": "3"})
    assert killed.returncode == -9
    newest = tmp_path / "k" / "checkpoints" / "exp_003.pt"
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2])  # truncated on disk
    resumed = _cli([*args, "--out", str(tmp_path / "k"), "--resume"])
    assert resumed.returncode == 0, resumed.stderr
    assert "exp_003.pt is truncated or corrupted" in resumed.stderr
    a = json.loads((tmp_path / "ref" / "results.json").read_text())
    b = json.loads((tmp_path / "k" / "results.json").read_text())
    assert a["accuracy_matrix"] == b["accuracy_matrix"]


def test_resume_with_a_different_config_is_refused(tmp_path):
    args = ["run", "configs/quickstart.yaml", *TINY]
    killed = _cli([*args, "--out", str(tmp_path)], env={"INCREMENTAL_KILL_AFTER_EXPERIENCE": "1"})
    assert killed.returncode == -9
    other = _cli([*args, "--set", "train.lr=0.2", "--out", str(tmp_path), "--resume"])
    assert other.returncode == 2 and "different config" in other.stderr
