"""The small Faster R-CNN, its growing box head, packages, and the detection loop (tiny sizes)."""
from __future__ import annotations

import pytest
import torch

from incremental.buffer import HistoryLibrary
from incremental.data import Experience
from incremental.detection.coco import samples_from_coco
from incremental.detection.model import (
    GrowingBoxPredictor,
    all_candidate_boxes,
    build_detector,
    detector_kwargs,
    num_foreground_classes,
    predict,
)
from incremental.detection.scenes import generate_scene
from incremental.detection.trainer import DetectionLoss, DetectionTrainer

SMALL = {"image_size": 64, "width": 8, "representation_size": 32}


def scene_data(scene="general", n=4, seed=0, classes=None, names=None):
    s = generate_scene(scene, n, seed=seed, image_size=64, classes=classes)
    return samples_from_coco(s.coco, {im["id"]: a for im, a in zip(s.coco["images"], s.images)}, names)


def test_build_detector_checks_arguments():
    with pytest.raises(ValueError, match="unknown argument\\(s\\) \\['depth'\\]"):
        build_detector(depth=3)
    with pytest.raises(ValueError, match="num_classes must be >= 1"):
        build_detector(num_classes=0)
    m = build_detector(num_classes=2, **SMALL)
    assert num_foreground_classes(m) == 2 and detector_kwargs(m)["image_size"] == 64


def test_box_predictor_grows_keeping_old_rows():
    head = GrowingBoxPredictor(6, 3)
    x = torch.rand(5, 6)
    w_before = head.cls_score.weight.detach().clone()
    cls_before, box_before = head(x)
    head.grow_to(5)
    cls_after, box_after = head(x)
    assert cls_after.shape == (5, 5) and box_after.shape == (5, 20)
    assert torch.equal(head.cls_score.weight[:3], w_before)
    assert torch.allclose(cls_after[:, :3], cls_before, atol=1e-6) and torch.allclose(box_after[:, :12], box_before, atol=1e-6)
    head.grow_to(2)  # never shrinks
    assert head.num_outputs == 5


def test_detection_loss_weights_by_hand():
    # {rpn: 2, box: 3} with weight 0.5 on rpn: 0.5 * 2 + 1 * 3 = 4
    terms = DetectionLoss({"rpn": 0.5})({"rpn": torch.tensor(2.0), "box": torch.tensor(3.0)})
    assert {k: float(v) for k, v in terms.items()} == {"rpn": 1.0, "box": 3.0}  # named terms; the loop sums them
    with pytest.raises(KeyError, match="loss weights for \\['typo'\\]"):
        DetectionLoss({"typo": 1.0})({"rpn": torch.tensor(2.0)})
    with pytest.raises(TypeError, match="expects the detector's loss dict"):
        DetectionLoss()([{"boxes": torch.zeros(0, 4)}])


def make_trainer(model, names, **kw):
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    return DetectionTrainer(model, opt, class_names=names, train_mb_size=2, train_epochs=1, seed=0, **kw)


def test_trainer_trains_and_evaluates_deterministically():
    data = scene_data(n=4)
    results = []
    for _ in range(2):
        torch.manual_seed(0)
        model = build_detector(num_classes=3, **SMALL)
        before = [p.detach().clone() for p in model.parameters()]
        trainer = make_trainer(model, data.class_names)
        trainer.train(Experience(data.samples, 0, [1, 2, 3]))
        assert trainer.clock.train_iterations == 2
        assert set(trainer.detection_loss_dict) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
        assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
        r = trainer.eval(Experience(data.samples, 0, [1, 2, 3]))
        assert set(r) == {0} and "AP" in r[0] and "per_class" in r[0] and r[0]["images"] == 4
        results.append((float(trainer.loss), [p.detach().clone() for p in model.parameters()]))
    assert results[0][0] == results[1][0]
    assert all(torch.equal(a, b) for a, b in zip(results[0][1], results[1][1]))


def test_new_labels_grow_the_head_and_optimizer():
    data = scene_data("transfer", n=2, classes=["star", "cross"], names=["circle", "square", "triangle", "star", "cross"])
    torch.manual_seed(0)
    model = build_detector(num_classes=3, **SMALL)
    trainer = make_trainer(model, data.class_names)
    trainer.classes_seen = {1, 2, 3}
    trainer.train(Experience(data.samples, 0, [4, 5]))
    assert num_foreground_classes(trainer.model) == 5
    head = trainer.model.roi_heads.box_predictor.cls_score.weight
    assert any(p is head for g in trainer.optimizer.param_groups for p in g["params"])


def test_replay_concatenates_history_and_uint8_images_become_floats():
    data = scene_data(n=2)
    history = HistoryLibrary(4, "reservoir")
    history.update(scene_data("transfer", n=4, seed=1).samples)
    torch.manual_seed(0)
    trainer = make_trainer(build_detector(num_classes=3, **SMALL), data.class_names, history=history)
    sizes = []
    trainer.add_plugin(type("Spy", (), {"before_forward": lambda self, s, **k: sizes.append(len(s.mb_x))})())
    trainer.train(Experience(data.samples, 0, [1, 2, 3]))
    assert sizes == [4]  # 2 training + 2 history images in one minibatch
    assert all(x.dtype == torch.float32 for x in trainer.mbatch[0])


def test_gradient_mixing_plugin_runs_on_detection_batches():
    gm = pytest.importorskip("strategies.gradient_mixing")
    data = scene_data("transfer", n=2)
    history = HistoryLibrary(4, "reservoir")
    history.update(scene_data(n=4, seed=1).samples)
    torch.manual_seed(0)
    plugin = gm.GradientMixingPlugin(rule="similarity")
    trainer = make_trainer(build_detector(num_classes=3, **SMALL), data.class_names, history=history, plugins=[plugin])
    seen = []
    trainer.add_plugin(type("Spy", (), {"before_forward": lambda self, s, **k: seen.append(len(s.mb_x))})())
    trainer.train(Experience(data.samples, 0, [1, 2, 3]))
    assert seen == [2]  # the history batch is not concatenated: the plugin takes its own gradient
    stats = plugin.stats[0]
    assert len(stats) == 1 and -1.0 <= stats[0]["similarity"] <= 1.0 and stats[0]["norm_h"] > 0


def test_candidate_boxes_context_disables_nms_and_restores():
    torch.manual_seed(0)
    model = build_detector(num_classes=3, **SMALL).eval()
    x = [scene_data(n=1).images()[0]]
    saved = (model.roi_heads.score_thresh, model.roi_heads.nms_thresh, model.roi_heads.detections_per_img)
    normal = predict(model, x)[0]
    with all_candidate_boxes(model, min_score=0.0, max_per_image=10_000):
        everything = predict(model, x)[0]
    assert (model.roi_heads.score_thresh, model.roi_heads.nms_thresh, model.roi_heads.detections_per_img) == saved
    assert len(everything["boxes"]) > len(normal["boxes"])
    # with NMS off every proposal keeps a box per class: 3 x (number of proposals) at score >= 0
    assert len(everything["boxes"]) % 3 == 0


def test_package_round_trip_and_kind_check(tmp_path):
    from incremental.detection.packaging import load_detector, save_detector
    from incremental.package import PackageError, save_model

    torch.manual_seed(0)
    model = build_detector(num_classes=3, **SMALL)
    model.roi_heads.box_predictor.grow_to(5)  # a grown head is saved with num_classes 4
    path = save_detector(tmp_path / "det.pt", model, ["a", "b", "c", "d"], [1, 2, 3, 9])
    loaded, info = load_detector(path)
    assert info["class_names"] == ["a", "b", "c", "d"] and info["category_ids"] == [1, 2, 3, 9]
    x = scene_data(n=2).images()
    for p, q in zip(predict(model, x), predict(loaded, x)):
        assert torch.equal(p["boxes"], q["boxes"]) and torch.equal(p["scores"], q["scores"])
    with pytest.raises(PackageError, match="3 class names for a detector with 4 classes"):
        save_detector(tmp_path / "x.pt", model, ["a", "b", "c"])
    other = save_model(tmp_path / "clf.pt", torch.nn.Linear(2, 2), kind="classifier", architecture="mlp",
                       arch_kwargs={}, class_names=["x", "y"])
    with pytest.raises(PackageError, match="not a detector"):
        load_detector(other)
