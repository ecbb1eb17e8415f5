"""The panoptic runner through ``incremental run``: results, pictures, config errors, determinism, resume."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from incremental.cli import main
from tests.tracking_helpers import assert_logged

TINY = {
    "seed": 0,
    "scenario": {"name": "panoptic_shapes", "steps": [["circle", "square", "sky", "ground"], ["cross"]],
                 "train_images": [8, 4], "test_images": 4, "image_size": 32},
    "strategy": {"name": "pseudo_distill"},
    "model": {"n_queries": 4, "hidden_dim": 16, "n_layers": 1, "n_heads": 2, "ffn_dim": 16, "mask_dim": 16,
              "backbone_channels": [8, 8, 8]},
    "train": {"base_epochs": 1, "step_epochs": 1, "batch_size": 4, "eval_batch_size": 4},
    "sample_images": 2,
}


def write_config(tmp_path: Path, config: dict) -> Path:
    """``config`` as a YAML file in ``tmp_path``, its generated data under ``tmp_path / "data"``."""
    cfg = json.loads(json.dumps(config))
    cfg["scenario"]["data_dir"] = str(tmp_path / "data")
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture()
def tiny_config(tmp_path: Path) -> Path:
    return write_config(tmp_path, TINY)


def run_cli(config: Path, out: Path, *extra: str) -> dict:
    assert main(["run", str(config), "--out", str(out), "--quiet", *extra]) == 0
    return json.loads((out / "results.json").read_text())


def test_run_writes_pq_after_every_step(tiny_config, tmp_path):
    res = run_cli(tiny_config, tmp_path / "out")
    assert res["steps"] == [["circle", "square", "sky", "ground"], ["cross"]]
    for key in ("pq_old", "pq_new", "pq_all"):
        assert len(res[key]) == 2
    assert res["pq_old"][0] is None  # nothing is old before the first update
    assert set(res["pq_per_class"][1]) == {"circle", "square", "sky", "ground", "cross"}
    assert res["step_results"][1]["plugin"]["pseudo_labels_per_image"] >= 0
    assert (tmp_path / "out" / "pq_per_class.png").stat().st_size > 0
    assert (tmp_path / "out" / "samples.png").stat().st_size > 0
    assert (tmp_path / "out" / "model_step0.pt").is_file() and (tmp_path / "out" / "model.pt").is_file()
    assert_logged(tmp_path / "out", experiences=2)


def test_same_seed_same_numbers_and_resume_continues_identically(tiny_config, tmp_path):
    first = run_cli(tiny_config, tmp_path / "a")
    second = run_cli(tiny_config, tmp_path / "b")
    assert first["pq_all"] == second["pq_all"] and first["pq_per_class"] == second["pq_per_class"]
    # kill after step 0: drop the step-1 checkpoint and results, resume
    for f in (tmp_path / "b" / "checkpoints").glob("exp_002.*"):
        f.unlink()
    (tmp_path / "b" / "results.json").unlink()
    resumed = run_cli(tiny_config, tmp_path / "b", "--resume")
    assert resumed["pq_all"] == first["pq_all"] and resumed["pq_per_class"] == first["pq_per_class"]
    assert_logged(tmp_path / "b", experiences=2)


def test_extension_options_reach_the_plugin(tiny_config, tmp_path):
    res = run_cli(tiny_config, tmp_path / "out", "--set", "strategy.lambda_mask=1", "--set", "strategy.distill_aux=true",
                  "--set", "strategy.claimed_queries=no_object", "--set", "strategy.unlabelled_queries=skip",
                  "--set", "strategy.pseudo.claim=ioa", "--set", "sample_images=0")
    summary = res["step_results"][1]["plugin"]
    assert summary["mean_mask_distillation_loss"] >= 0 and summary["mean_distillation_loss"] >= 0


@pytest.mark.parametrize("override, message", [
    # the old flat keys reach the plugin's entry: the error names the new key
    ("strategy.claimed_queries=drop", "strategy.plugins[0].claimed_queries: must be one of"),
    ("strategy.pseudo.claim=dice", "strategy.plugins[0].pseudo.claim: must be one of"),
    ("strategy.lambda_mask=-1", "strategy.plugins[0].lambda_mask: must be >= 0"),
    ("strategy.gamma=-1", "strategy.plugins[0].gamma: must be >= 0"),
    ("strategy={plugins: [{name: pseudo_label_distillation, pseudo: {claim: dice}}]}",
     "strategy.plugins[0].pseudo.claim: must be one of"),
    ("strategy={plugins: [{name: pseudo_label_distillation, lamda: 1}]}", "strategy.plugins[0].lamda: unknown option"),
    ("strategy={regime: cumulative}", "strategy.regime: panoptic runs take incremental"),
    ("scenario.steps=[[circle]]", "scenario.steps: needs the old classes and at least one new step"),
    ("scenario.steps=[[circle],[hexagon]]", "scenario.steps: unknown classes ['hexagon']"),
    ("scenario.train_images=[8]", "scenario.train_images: needs one count per step"),
    ("strategy.pseudo.iou_threshold=2", "strategy.pseudo.iou_threshold: must be in [0, 1]"),
    ("strategy.name=magic", "strategy.name: must be one of"),
    ("model.prompt_own_backbone=4", "model.prompt_own_backbone: must be 0-3"),
    ("strategy.lamda=1", "strategy.lamda: unknown key"),
])
def test_bad_config_values_are_one_line_errors(tiny_config, tmp_path, capsys, override, message):
    assert main(["run", str(tiny_config), "--out", str(tmp_path / "x"), "--quiet", "--set", override]) == 2
    assert message in capsys.readouterr().err


def test_old_strategy_names_become_plugins_and_regimes():
    from incremental.runners.panoptic import config_from

    def strategy(**old):
        return config_from({"strategy": old}).strategy

    assert strategy(name="finetune").plugins == [] and strategy(name="joint").regime == "joint"
    full = strategy(name="pseudo_distill", lambda_mask=2, pseudo={"claim": "ioa"}).plugins
    assert full == [{"name": "pseudo_label_distillation", "pseudo_labels": True, "distillation": True,
                     "lambda_mask": 2, "pseudo": {"claim": "ioa"}}]
    assert strategy(name="distillation").plugins[0]["pseudo_labels"] is False
    replayed = strategy(name="pseudo_labels", mem_size=8)
    assert replayed.history.mem_size == 8 and replayed.names() == ["replay", "pseudo_label_distillation"]


def test_repository_configs_are_valid():
    from incremental.cli import prepare_run

    root = Path(__file__).resolve().parents[1] / "configs"
    for name in ("panoptic_shapes_3-2.yaml", "panoptic_shapes_3-1-1.yaml", "coco_panoptic_3-2.yaml",
                 "panoptic_shapes_3-2_query_groups.yaml", "panoptic_shapes_3-1-1_query_groups.yaml"):
        _, cfg, _ = prepare_run(str(root / name), [])
        assert cfg.scenario.name in ("panoptic_shapes", "coco_panoptic") and len(cfg.scenario.steps) >= 2


def test_coco_panoptic_scenario_reads_coco_files(tmp_path):
    """coco_panoptic on COCO files (generated here): images go to the last step whose classes they show."""
    from incremental.panoptic.shapes import SplitSpec, generate_split

    train = generate_split(tmp_path, "train", SplitSpec(10, required=["circle", "cross"], n_required=(1, 2),
                                                        image_size=32), seed=0)
    test = generate_split(tmp_path, "val", SplitSpec(3, required=["circle", "cross"], image_size=32), seed=0)
    cfg = json.loads(json.dumps(TINY))
    cfg["scenario"] = {"name": "coco_panoptic", "steps": [["circle", "sky", "ground"], ["cross"]],
                       "train_json": str(train), "test_json": str(test), "image_size": 32}
    path = tmp_path / "coco.yaml"
    path.write_text(yaml.safe_dump(cfg))
    res = run_cli(path, tmp_path / "out")
    assert res["steps"] == [["circle", "sky", "ground"], ["cross"]] and len(res["pq_all"]) == 2
    meta = json.loads(train.read_text())
    has_cross = sum(any(s["category_id"] == 4 for s in a["segments_info"]) for a in meta["annotations"])
    assert [s["images"] for s in res["train_samples"]] == [10 - has_cross, has_cross]
