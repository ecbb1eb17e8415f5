"""The multi-task runner through the CLI: SynthFaces, UTKFace folder, CSV file; config errors; resume."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from incremental.cli import main
from tests.tracking_helpers import assert_logged

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "synthfaces_multitask.yaml")
TINY = ["--set", "scenario.n_train=48", "--set", "scenario.n_test=24", "--set", "train.epochs=3",
        "--set", "model.channels=[4,8,8,8]", "--set", "train.batch_size=16", "--quiet"]


def run_cli(out: Path, *extra: str, config: str = CONFIG) -> dict:
    assert main(["run", config, "--out", str(out), "--force", *TINY, *extra]) == 0
    return json.loads((out / "results.json").read_text())


def test_synthfaces_run_writes_tasks_weights_and_curve(tmp_path):
    res = run_cli(tmp_path / "a", "--set", "scenario.missing_fraction=0.3")
    assert set(res["tasks"]) == {"landmarks", "pose", "smile", "age", "gender", "mask", "glasses",
                                 "attractiveness", "quality"}
    assert res["tasks"]["landmarks"]["nme"] > 0 and 0 <= res["tasks"]["smile"]["accuracy"] <= 1
    assert set(res["loss_weights"]) == set(res["tasks"])
    assert len(res["weight_history"]) == 3 and res["weight_history"][0]["weights"]["age"] == 1.0
    assert sum(res["loss_weights"].values()) == pytest.approx(9.0, abs=1e-4)  # dynamic from period 3
    assert res["data"]["label_coverage"]["age"] == pytest.approx(0.7, abs=0.03)
    assert res["time_per_epoch_s"] > 0 and res["weighting"] == "dwa_ema_exp_init"
    assert res["config"]["strategy"]["plugins"][0]["method"] == "dwa_ema_exp_init"
    assert (tmp_path / "a" / "loss_weights.png").read_bytes()[:4] == b"\x89PNG"
    assert_logged(tmp_path / "a", experiences=1)
    # same seed, same numbers
    again = run_cli(tmp_path / "b", "--set", "scenario.missing_fraction=0.3")
    assert again["tasks"] == res["tasks"] and again["loss_weights"] == res["loss_weights"]


def test_resume_after_the_last_experience_reproduces_results(tmp_path):
    strategy = ["--set", "strategy.plugins=[{name: dynamic_loss_weighting, method: uncertainty}, {name: replay}]",
                "--set", "strategy.history.mem_size=10"]
    first = run_cli(tmp_path, "--set", "scenario.n_experiences=2", *strategy)
    (tmp_path / "results.json").unlink()
    assert main(["run", CONFIG, "--out", str(tmp_path), "--resume", *TINY, "--set", "scenario.n_experiences=2",
                 *strategy]) == 0
    second = json.loads((tmp_path / "results.json").read_text())
    assert second["tasks"] == first["tasks"] and second["loss_weights"] == first["loss_weights"]
    assert len(first["evaluations"]) == 2


@pytest.mark.parametrize("override, message", [
    ("strategy.plugins=[{name: dynamic_loss_weighting, method: dwa2}]",
     "strategy.plugins[0].method: unknown weighting method 'dwa2'"),
    ("scenario.missing_fraction=1.0", "scenario.missing_fraction: must be in [0, 1)"),
    ("strategy.plugins=[{name: dynamic_loss_weighting, beta: 1.0}]", "strategy.plugins[0].beta"),
    ("scenario.colour=1", "scenario.colour: unknown key"),
    ("strategy.plugins=[{name: dynamic_loss_weighting, method: uncertainty, task_scales: inverse_baseline_loss}]",
     "strategy.plugins[0].task_scales"),
    ("strategy.plugins=[{name: dynamic_loss_weighting, fixed_weights: {eyes: 2}}]",
     "strategy.plugins[0].fixed_weights: unknown tasks ['eyes']"),
])
def test_config_errors_name_the_key(tmp_path, capsys, override, message):
    assert main(["run", CONFIG, "--out", str(tmp_path), "--set", override, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


def test_utkface_needs_a_path(tmp_path, capsys):
    assert main(["run", CONFIG, "--out", str(tmp_path), "--set", "scenario.name=utkface", "--quiet"]) == 2
    assert "scenario.path" in capsys.readouterr().err


def _images(folder: Path, names: list[str]) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        Image.new("RGB", (40, 40), (10 * i % 255, 100, 200)).save(folder / name)


def test_utkface_folder_run(tmp_path):
    names = [f"{20 + i}_{i % 2}_{i % 5}_2017011617452{i:04d}.jpg.chip.jpg" for i in range(12)] + ["bad_name.jpg"]
    _images(tmp_path / "utk", names)
    res = run_cli(tmp_path / "out", "--set", "scenario.name=utkface", "--set", f"scenario.path={tmp_path / 'utk'}",
                  "--set", "train.epochs=1", "--set", "scenario.test_fraction=0.25")
    assert set(res["tasks"]) == {"age", "gender", "race"}
    assert res["data"]["loaded"] == 12 and res["data"]["skipped"] == 1
    assert res["tasks"]["race"]["count"] == 3


def test_csv_run_with_declared_tasks(tmp_path):
    _images(tmp_path, [f"f{i}.png" for i in range(10)])
    rows = ["path,score,happy"] + [f"f{i}.png,{i / 2},{'' if i % 3 == 0 else i % 2}" for i in range(10)]
    (tmp_path / "data.csv").write_text("\n".join(rows) + "\n")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "scenario:\n  name: csv_multitask\n  path: " + str(tmp_path / "data.csv") + "\n  test_fraction: 0.3\n"
        "  tasks:\n    - {name: score, kind: regression, loss: l1}\n    - {name: happy, kind: binary}\n"
        "strategy:\n  weighting: gradnorm\n"  # the old flat form, still read (with a notice) for one release
    )
    res = run_cli(tmp_path / "out", "--set", "train.epochs=2", config=str(cfg))
    assert set(res["tasks"]) == {"score", "happy"} and res["data"]["loaded"] == 10
    assert sum(res["loss_weights"].values()) == pytest.approx(2.0, abs=1e-4)
