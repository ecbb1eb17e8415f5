"""`incremental run` on detection_scenes: results, resume, config errors (tiny sizes)."""
from __future__ import annotations

import json

import pytest

from incremental.cli import main
from tests.tracking_helpers import assert_logged

TINY = ["--set", "scenario.image_size=64", "--set", "scenario.general_train=6", "--set", "scenario.general_test=3",
        "--set", "scenario.transfer_test=3", "--set", "feedback.n_images=4", "--set", "meta.epochs=1",
        "--set", "adapt.epochs=1", "--set", "adapt.min_steps=1",
        "--set", "meta.batch_size=3", "--set", "adapt.batch_size=2", "--set", "model.width=8",
        "--set", "model.representation_size=32", "--quiet"]


HISTORY = ["--set", "strategy.history.mem_size=4"]


def run(out, *extra):
    return main(["run", "configs/detection_feedback.yaml", "--out", str(out), *TINY, *HISTORY, *extra])


def test_run_writes_ap_before_after_and_feedback_counts(tmp_path):
    assert run(tmp_path / "a") == 0
    r = json.loads((tmp_path / "a" / "results.json").read_text())
    for key in ("ap_general", "ap_transfer"):
        for when in ("before", "after"):
            assert set(r[key][when]) == {"AP", "AP50"}
    counts = r["feedback_counts"]
    assert counts["images"] == 4 and sum(counts[c] for c in ("correct", "missed", "false_detection")) == 4
    assert r["strategy"] == "gradient_mixing" and r["adaptation"]["steps"] == 2
    assert sorted(p.name for p in (tmp_path / "a" / "checkpoints").glob("*.pt")) == ["exp_001.pt", "exp_002.pt"]
    assert r["config"]["feedback"]["n_images"] == 4 and r["seed"] == 0
    assert (tmp_path / "a" / "ap_before_after.png").is_file() and (tmp_path / "a" / "meta_model.pt").is_file()
    assert r["meta_model_reused"] is False
    assert_logged(tmp_path / "a", experiences=2)
    # killed after the meta model: --resume adapts it and ends with the same numbers
    import os

    os.environ["INCREMENTAL_KILL_AFTER_EXPERIENCE"] = "1"
    try:
        import subprocess
        import sys

        killed = subprocess.run([sys.executable, "-m", "incremental", "run", "configs/detection_feedback.yaml",
                                 "--out", str(tmp_path / "k"), *TINY, *HISTORY], capture_output=True, text=True)
    finally:
        del os.environ["INCREMENTAL_KILL_AFTER_EXPERIENCE"]
    assert killed.returncode != 0 and not (tmp_path / "k" / "results.json").exists()
    assert run(tmp_path / "k", "--resume") == 0
    again = json.loads((tmp_path / "k" / "results.json").read_text())
    assert again["ap_general"] == r["ap_general"] and again["ap_transfer"] == r["ap_transfer"]
    assert again["feedback_counts"] == counts
    assert_logged(tmp_path / "k", experiences=2)  # the resumed run's logs hold each iteration once


@pytest.mark.parametrize("override, message", [
    ("strategy.name=magic", "strategy.name: must be one of"),
    ("strategy.plugins=[{name: gradient_mixing, pseudo_score: 0.3}]", "strategy.plugins[0].pseudo_score: unknown option"),
    ("strategy={plugins: [{name: pseudo_label_distillation, pseudo_score: 2}], history: {mem_size: 0}}",
     "strategy.plugins[0].pseudo_score: must be in [0, 1]"),
    ("feedback.confidence=0", "feedback.confidence: must be in (0, 1]"),
    ("strategy.history.mem_size=0", "strategy.history.mem_size: plugin 'gradient_mixing' uses the loop's history"),
    ("scenario.image_size=16", "scenario.image_size: must be in [32, 512]"),
    ("adapt.epochs=0", "adapt.epochs: must be >= 1"),
    ("feedback.typo=1", "feedback.typo: unknown key"),
    ("strategy.plugins=[{name: gradient_mixing, rule: nope}]", "strategy.plugins[0]"),
])
def test_bad_configs_exit_2_naming_the_key(tmp_path, capsys, override, message):
    assert run(tmp_path / "b", "--set", override) == 2
    assert message in capsys.readouterr().err


def test_new_class_variant_splits_old_and_new(tmp_path):
    code = main(["run", "configs/detection_new_classes.yaml", "--out", str(tmp_path / "nc"), *TINY])
    assert code == 0
    r = json.loads((tmp_path / "nc" / "results.json").read_text())
    assert set(r["ap_transfer"]["after"]) == {"AP", "AP50", "AP_old", "AP50_old", "AP_new", "AP50_new"}
    assert r["new_classes"] == ["star", "cross"]
    assert r["feedback_counts"]["images"] == 4 and r["feedback_counts"]["unlabelled_old_class_boxes"] > 0
    assert set(r["adaptation"]["pseudo_label_distillation"]) == {"pseudo_labels_per_image", "mean_distillation_loss"}
    assert set(r["per_class"]["transfer"]["after"]) == {"circle", "square", "triangle", "star", "cross"}


def test_all_three_plugins_stack_on_one_detector(tmp_path):
    """The showcase config: every plugin runs in the one adaptation loop and reports its own numbers."""
    code = main(["run", "configs/detection_all_three.yaml", "--out", str(tmp_path / "all"), *TINY, *HISTORY])
    assert code == 0
    r = json.loads((tmp_path / "all" / "results.json").read_text())
    assert r["strategy"] == "pseudo_label_distillation+dynamic_loss_weighting+gradient_mixing"
    adaptation = r["adaptation"]
    assert set(adaptation["pseudo_label_distillation"]) == {"pseudo_labels_per_image", "mean_distillation_loss"}
    assert set(adaptation["loss_weights"]) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    assert adaptation["gradient_mixing"]["iterations"] == adaptation["steps"] == 2
    assert set(r["ap_transfer"]["after"]) >= {"AP_old", "AP_new"}
