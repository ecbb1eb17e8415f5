"""``incremental update`` with a panoptic model package and new-class COCO panoptic data."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from incremental.cli import main
from incremental.package import load_model, save_model
from incremental.panoptic.model import build_panoptic_model
from incremental.panoptic.shapes import SplitSpec, generate_split
from incremental.panoptic.update import package_extra

TINY = dict(n_queries=4, hidden_dim=16, n_layers=1, n_heads=2, ffn_dim=16, mask_dim=16, backbone_channels=[8, 8, 8])
OLD = ["circle", "square", "sky", "ground"]


@pytest.fixture()
def package(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    model = build_panoptic_model(n_classes=len(OLD), **TINY)
    return save_model(tmp_path / "base.pt", model, kind="panoptic", architecture="panoptic_tiny",
                      arch_kwargs={"n_classes": len(OLD), **TINY}, class_names=OLD,
                      extra=package_extra(OLD, [0, 1], 32))


def new_class_data(root: Path, annotate: list[str]) -> Path:
    """Images with crosses (new) and circles / squares (old); only ``annotate`` is labelled."""
    spec = SplitSpec(6, required=["cross"], n_required=(1, 2), others=["circle", "square"], n_other=(0, 2),
                     image_size=32, annotate=annotate)
    return generate_split(root, "new", spec, seed=1).parent


def test_update_learns_new_class_and_writes_a_bigger_package(package, tmp_path):
    data = new_class_data(tmp_path / "data", ["cross"])
    full = json.loads((data / "panoptic.json").read_text())
    assert {s["category_id"] for a in full["annotations"] for s in a["segments_info"]} == {4}  # cross only
    out = tmp_path / "updated"
    assert main(["update", "--model", str(package), "--data", str(data), "--out", str(out), "--epochs", "1",
                 "--batch-size", "4", "--strategy", "replay", "--quiet"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["kind"] == "panoptic" and report["new_classes"] == ["cross"]
    assert report["strategy"] == "pseudo_distill"  # the panoptic updater's default (no --strategy given)
    assert report["n_train"] == 5 and report["n_holdout"] == 1 and report["steps"] == 2
    for when in ("before", "after"):
        assert set(report[when]) >= {"old_pq", "new_pq", "on_holdout", "on_old_data"}
    updated = load_model(out / "model.pt")
    assert updated.class_names == [*OLD, "cross"] and updated.extra["thing_classes"] == ["circle", "square", "cross"]
    model = updated.build()
    assert model.n_classes == 5 and model(torch.rand(1, 3, 32, 32))["pred_logits"].shape[-1] == 6
    assert (out / "report.png").stat().st_size > 0


def test_old_data_measures_the_old_classes(package, tmp_path):
    data = new_class_data(tmp_path / "data", ["cross"])
    old = generate_split(tmp_path / "data", "old", SplitSpec(3, required=["circle", "square"], image_size=32), seed=2)
    # the generated old-class file also annotates sky/ground, which the package knows too
    report_dir = tmp_path / "u"
    assert main(["update", "--model", str(package), "--data", str(data), "--out", str(report_dir), "--epochs", "1",
                 "--batch-size", "4", "--strategy", "naive", "--old-data", str(old.parent), "--quiet"]) == 0
    report = json.loads((report_dir / "report.json").read_text())
    assert report["n_old_data"] == 3 and report["before"]["on_old_data"] is not None
    assert report["strategy"] == "naive" and report["plugin"] == {}


def test_data_without_new_class_is_a_usage_error(package, tmp_path, capsys):
    data = new_class_data(tmp_path / "data", ["circle", "square"])
    assert main(["update", "--model", str(package), "--data", str(data), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    assert "no new class" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_missing_data_is_a_usage_error(package, tmp_path, capsys):
    assert main(["update", "--model", str(package), "--data", str(tmp_path / "nothing"), "--out", str(tmp_path / "o"),
                 "--quiet"]) == 2
    assert "does not exist" in capsys.readouterr().err
