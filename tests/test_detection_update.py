"""New classes on Faster R-CNN: pseudo boxes, paired box-head logits, and `incremental update`."""
from __future__ import annotations

import json

import pytest
import torch

from incremental.cli import main
from incremental.data import Experience
from incremental.detection.coco import samples_from_coco
from incremental.detection.distillation import FasterRCNNAdapter, PseudoBoxConfig, pseudo_boxes
from incremental.detection.model import build_detector, frozen_copy, num_foreground_classes
from incremental.detection.scenes import OLD_CLASSES, generate_scene
from incremental.detection.trainer import DetectionTrainer

SMALL = {"image_size": 64, "width": 8, "representation_size": 32}
B = lambda rows: torch.tensor(rows, dtype=torch.float32).reshape(-1, 4)  # noqa: E731


def test_pseudo_boxes_by_hand():
    # old boxes: o1 [0,0,10,10] s.9 (IoU with gt [0,0,10,9] = 90/100 = .9 > .5: already annotated, dropped),
    # o2 [20,20,30,30] s.8 (no overlap: kept), o3 [40,40,50,50] s.3 (below score .5: dropped),
    # o4 [20,25,30,35] s.6 (IoU with gt = 0: kept; its overlap with o2 does not matter)
    boxes, labels = pseudo_boxes(B([[0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50], [20, 25, 30, 35]]),
                                 torch.tensor([0.9, 0.8, 0.3, 0.6]), torch.tensor([1, 2, 3, 1]),
                                 B([[0, 0, 10, 9]]), score=0.5, iou=0.5)
    assert boxes.tolist() == [[20, 20, 30, 30], [20, 25, 30, 35]] and labels.tolist() == [2, 1]
    boxes, labels = pseudo_boxes(B([[0, 0, 10, 10]]), torch.tensor([0.9]), torch.tensor([1]), B([]), 0.5, 0.5)
    assert labels.tolist() == [1]  # no ground truth: every confident old box is a pseudo label


def test_adapter_extends_targets_without_touching_them():
    adapter = FasterRCNNAdapter(PseudoBoxConfig(score=0.5, iou=0.5))
    target = {"boxes": B([[0, 0, 10, 9]]), "labels": torch.tensor([4]), "image_id": torch.tensor(1)}
    pred = [{"boxes": B([[0, 0, 10, 10], [20, 20, 30, 30]]), "scores": torch.tensor([0.9, 0.8]), "labels": torch.tensor([1, 2])}]
    (out,) = adapter.pseudo_targets(pred, [target], None)
    assert out["labels"].tolist() == [4, 2] and out["boxes"].tolist() == [[0, 0, 10, 9], [20, 20, 30, 30]]
    assert target["labels"].tolist() == [4] and out["image_id"] is target["image_id"]


def test_annotated_new_mask_by_hand():
    from incremental.detection.distillation import annotated_new_mask

    # image 0: proposals p0 [0,0,10,10], p1 [0,0,10,6], p2 [20,20,30,30]; annotated: new class 4 at
    # [0,0,10,10] and old class 2 at [20,20,30,30] (old classes 1..3).
    # IoU(p0, new) = 1 > .5 -> True; IoU(p1, new) = 60/100 = .6 > .5 -> True; p2 overlaps only the old
    # box -> False. Image 1 has no new-class box -> False.
    mask = annotated_new_mask([B([[0, 0, 10, 10], [0, 0, 10, 6], [20, 20, 30, 30]]), B([[0, 0, 5, 5]])],
                              [{"boxes": B([[0, 0, 10, 10], [20, 20, 30, 30]]), "labels": torch.tensor([4, 2])},
                               {"boxes": B([[0, 0, 5, 5]]), "labels": torch.tensor([1])}], n_old=3, iou=0.5)
    assert mask.tolist() == [True, True, False, False]


def scene_data(n, classes, names, seed=0):
    s = generate_scene("transfer", n, seed=seed, image_size=64, classes=classes)
    return samples_from_coco(s.coco, {im["id"]: a for im, a in zip(s.coco["images"], s.images)}, names)


def run_plugin_step(old_model, model, data, names, config=None, **plugin_kw):
    from strategies.pseudo_label_distillation import PseudoLabelDistillationPlugin

    adapter = FasterRCNNAdapter(config or PseudoBoxConfig(score=0.0))
    plugin = PseudoLabelDistillationPlugin(old_model, adapter=adapter, **plugin_kw)
    captured = {}

    class Spy:
        def before_backward(self, strategy, **kw):
            captured["pairs"] = adapter.distillation_pairs(plugin._prediction, strategy, plugin.old_model)
            captured["targets"] = strategy.mbatch[1]

    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    trainer = DetectionTrainer(model, opt, class_names=names, train_mb_size=2, train_epochs=1, seed=0, plugins=[Spy(), plugin])
    trainer.classes_seen = {1, 2, 3}
    trainer.train(Experience(data.samples, 0, sorted({1, 2, 3} | {int(l) for _, t, _ in data.samples.samples for l in t["labels"]})))
    adapter.close()
    return plugin, captured


def test_distillation_pairs_are_the_same_proposals_through_both_models():
    pytest.importorskip("strategies.pseudo_label_distillation")
    from strategies.pseudo_label_distillation import distillation_loss

    data = scene_data(2, OLD_CLASSES, OLD_CLASSES)
    torch.manual_seed(0)
    model = build_detector(num_classes=3, **SMALL)
    # old model = an identical copy: on the same proposals the logits must agree exactly, KL = 0
    plugin, cap = run_plugin_step(frozen_copy(model), model, data, OLD_CLASSES)
    pairs = cap["pairs"]
    assert pairs.old_logits.shape == pairs.new_logits.shape and pairs.old_logits.shape[1] == 4
    assert torch.allclose(pairs.old_logits, pairs.new_logits, atol=1e-5)
    assert pairs.old_columns == [1, 2, 3] and pairs.old_background == 0 and pairs.new_background == 0
    assert float(distillation_loss(pairs.old_logits, pairs.new_logits, [1, 2, 3], 0, 0)) == pytest.approx(0.0, abs=1e-6)
    assert pairs.new_logits.requires_grad
    # a different old model gives a positive divergence
    torch.manual_seed(1)
    other = build_detector(num_classes=3, **SMALL)
    _, cap = run_plugin_step(frozen_copy(other), model, data, OLD_CLASSES)
    p = cap["pairs"]
    assert float(distillation_loss(p.old_logits, p.new_logits, [1, 2, 3], 0, 0)) > 0


def test_pseudo_labels_reach_the_detector_targets_with_a_grown_head():
    pytest.importorskip("strategies.pseudo_label_distillation")
    names = OLD_CLASSES + ["star", "cross"]
    data = scene_data(2, ["star", "cross"], names)
    torch.manual_seed(0)
    old = build_detector(num_classes=3, box_score_thresh=0.0, **SMALL)  # every box is confident at score 0
    model = build_detector(num_classes=3, **SMALL)
    model.load_state_dict(old.state_dict())
    plugin, cap = run_plugin_step(old, model, data, names)
    assert num_foreground_classes(model) == 5
    added = plugin.stats["pseudo_labels"]
    assert added > 0 and sum(len(t["labels"]) for t in cap["targets"]) == added + sum(
        len(t["labels"]) for _, t, _ in data.samples.samples)
    assert cap["pairs"].old_logits.shape[1] == 4 and cap["pairs"].new_logits.shape[1] == 6
    # the option that leaves annotated new-class proposals out of the distillation pairs fewer rows
    # (torchvision adds the ground-truth boxes to the sampled proposals, so some always overlap)
    model2 = build_detector(num_classes=3, **SMALL)
    model2.load_state_dict(old.state_dict())
    _, cap2 = run_plugin_step(old, model2, data, names, PseudoBoxConfig(score=0.0, skip_annotated_new=True))
    assert 0 < len(cap2["pairs"].old_logits) < len(cap["pairs"].old_logits)


# ----------------------------------------------------------------------------- incremental update
@pytest.fixture(scope="module")
def packages(tmp_path_factory):
    from incremental.detection.packaging import save_detector

    root = tmp_path_factory.mktemp("upd")
    torch.manual_seed(0)
    save_detector(root / "base.pt", build_detector(num_classes=3, **SMALL), OLD_CLASSES, [1, 2, 3])
    generate_scene("transfer", 4, seed=0, image_size=64, classes=["star", "cross"]).write(root / "new")
    generate_scene("general", 3, seed=0, image_size=64, split="test").write(root / "old")
    return root


def test_update_learns_new_classes_end_to_end(packages, tmp_path, capsys):
    root = packages
    code = main(["update", "--model", str(root / "base.pt"), "--data", str(root / "new"), "--out", str(tmp_path / "u"),
                 "--epochs", "1", "--batch-size", "2", "--lr", "0.001", "--old-data", str(root / "old" / "instances.json"),
                 "--quiet"])
    assert code == 0
    report = json.loads((tmp_path / "u" / "report.json").read_text())
    assert report["kind"] == "detector" and report["new_classes"] == ["star", "cross"]
    assert report["strategy"] == "pseudo_distill"  # the detector updater's default (no --strategy given)
    assert report["n_train"] == 3 and report["n_holdout"] == 1 and report["n_old_data"] == 3
    assert set(report["before"]) >= {"old_AP", "new_AP", "on_holdout", "on_old_data"}
    assert report["category_ids"] == {"circle": 1, "square": 2, "triangle": 3, "star": 4, "cross": 5}
    from incremental.detection.packaging import load_detector

    model, info = load_detector(tmp_path / "u" / "model.pt")
    assert info["class_names"] == OLD_CLASSES + ["star", "cross"] and num_foreground_classes(model) == 5
    assert (tmp_path / "u" / "report.png").is_file()


def test_update_naive_and_bad_data(packages, tmp_path, capsys):
    root = packages
    from incremental.detection.update import update
    from incremental.package import load_model

    report = update(load_model(root / "base.pt"), root / "new", tmp_path, {"strategy": "naive", "epochs": 1,
                                                                            "min_steps": 1, "batch_size": 4})
    assert report["strategy"] == "naive" and report["steps"] == 1 and report["plugin"] == {}
    # no new class: the old-class scene
    assert main(["update", "--model", str(root / "base.pt"), "--data", str(root / "old"), "--out", str(tmp_path / "x")]) == 2
    assert "no new class" in capsys.readouterr().err
    # a clash of names up to case
    coco = json.loads((root / "new" / "instances.json").read_text())
    coco["categories"][0]["name"] = "Circle"
    (root / "new" / "clash.json").write_text(json.dumps(coco))
    assert main(["update", "--model", str(root / "base.pt"), "--data", str(root / "new" / "clash.json"),
                 "--out", str(tmp_path / "y")]) == 2
    assert "clashes with the model's class 'circle'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown update strategy 'magic'"):
        update(load_model(root / "base.pt"), root / "new", tmp_path, {"strategy": "magic"})
