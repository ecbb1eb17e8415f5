"""The Avalanche example: GradientMixingPlugin and PseudoLabelDistillationPlugin (Faster R-CNN adapter)
inside Avalanche's ObjectDetectionTemplate, on tiny data."""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "avalanche_detection.py"


def load_example():
    spec = importlib.util.spec_from_file_location("avalanche_detection_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_both_plugins_run_in_avalanches_detection_template():
    pytest.importorskip("strategies.gradient_mixing")
    pytest.importorskip("strategies.pseudo_label_distillation")
    r = load_example().run(quick=True)
    # part 1: 4 transfer images, minibatch 4 -> one step, mixed with the general-scene library
    gm = r["part1"]["gradient_mixing"]
    assert gm["iterations"] == 1 and -1.0 <= gm["mean_similarity"] <= 1.0 and gm["mean_norm_h"] > 0
    assert set(r["part1"]["after_exp1"]) == {"general", "transfer"}
    # part 2: the old detector's boxes (score >= 0.2 for the untrained quick model) became pseudo labels,
    # and the box-head distillation was computed on paired proposals
    p2 = r["part2"]
    assert p2["pseudo_labels"] > 0 and p2["distillation_steps"] == 1
    assert math.isfinite(p2["plugin"]["mean_distillation_loss"]) and p2["plugin"]["mean_distillation_loss"] >= 0
    assert set(p2["after"]) == {"AP", "AP50", "AP_old", "AP_new"}
