"""COCO mAP (pycocotools COCOeval) against hand-computed values."""
from __future__ import annotations

import pytest
import torch

from incremental.detection.evaluation import DetectionAccumulator, coco_map


def T(boxes, labels):
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), "labels": torch.tensor(labels, dtype=torch.long)}


def P(boxes, scores, labels):
    return {**T(boxes, labels), "scores": torch.tensor(scores, dtype=torch.float32)}


def test_perfect_predictions_give_100():
    targets = [T([[0, 0, 10, 10], [20, 20, 40, 30]], [1, 2])]
    preds = [P([[0, 0, 10, 10], [20, 20, 40, 30]], [0.9, 0.8], [1, 2])]
    r = coco_map(targets, preds, ["a", "b"])
    assert r["AP"] == pytest.approx(100.0) and r["AP50"] == pytest.approx(100.0)
    assert r["per_class"] == {"a": {"AP": pytest.approx(100.0), "AP50": pytest.approx(100.0)},
                              "b": {"AP": pytest.approx(100.0), "AP50": pytest.approx(100.0)}}


def test_one_hit_one_false_box_one_miss_by_hand():
    # Class "a", 2 ground-truth boxes; detections by score: exact hit (TP) then a false box (FP).
    # Precision/recall: (1.0, 0.5), (0.5, 0.5). COCO's interpolated precision at the 101 recall points
    # 0, 0.01, ..., 1: 1.0 for r <= 0.50 (51 points), 0 above (recall 0.5 is never exceeded).
    # AP = 51 / 101 = 0.50495 at every IoU threshold (the hit is exact) -> 50.495 points.
    targets = [T([[0, 0, 10, 10], [30, 30, 50, 50]], [1, 1])]
    preds = [P([[0, 0, 10, 10], [60, 60, 70, 70]], [0.9, 0.8], [1, 1])]
    r = coco_map(targets, preds, ["a"])
    assert r["AP"] == pytest.approx(100 * 51 / 101, abs=1e-6)
    assert r["AP50"] == pytest.approx(100 * 51 / 101, abs=1e-6)


def test_iou_sweep_by_hand():
    # GT [0,0,10,10], prediction [0,0,10,7.8]: IoU = 78 / 100 = 0.78. It matches at the IoU thresholds
    # 0.50, 0.55, ..., 0.75 (6 of 10) and not at 0.80..0.95: AP = 6/10 = 60 points, AP50 = 100.
    r = coco_map([T([[0, 0, 10, 10]], [1])], [P([[0, 0, 10, 7.8]], [0.7], [1])], ["a"])
    assert r["AP"] == pytest.approx(60.0)
    assert r["AP50"] == pytest.approx(100.0)


def test_old_new_means_and_classes_without_ground_truth():
    # class a: perfect (100); class b: the 51/101 case above (50.495); class c: no ground truth -> None,
    # left out of every mean. AP = (100 + 50.495) / 2; old = [a, c] -> AP_old = 100; new = [b] -> 50.495.
    targets = [T([[0, 0, 10, 10]], [1]), T([[0, 0, 10, 10], [30, 30, 50, 50]], [2, 2])]
    preds = [P([[0, 0, 10, 10], [40, 40, 50, 50]], [0.9, 0.3], [1, 3]),
             P([[0, 0, 10, 10], [60, 60, 70, 70]], [0.9, 0.8], [2, 2])]
    r = coco_map(targets, preds, ["a", "b", "c"], old_classes=["a", "c"])
    b = 100 * 51 / 101
    assert r["per_class"]["c"] == {"AP": None, "AP50": None}
    assert r["AP"] == pytest.approx((100 + b) / 2)
    assert r["AP_old"] == pytest.approx(100.0) and r["AP_new"] == pytest.approx(b)
    assert r["AP50_old"] == pytest.approx(100.0) and r["AP50_new"] == pytest.approx(b)


def test_no_detections_is_zero_and_no_ground_truth_is_none():
    r = coco_map([T([[0, 0, 10, 10]], [1])], [P([], [], [])], ["a", "b"])
    assert r["AP"] == 0.0 and r["per_class"]["b"]["AP"] is None
    r = coco_map([T([], [])], [P([[0, 0, 10, 10]], [0.9], [1])], ["a"])
    assert r["AP"] is None


def test_wrong_class_counts_as_false_and_miss():
    # the box is right but labelled b: class a has 0 recall (AP 0), class b has no ground truth
    r = coco_map([T([[0, 0, 10, 10]], [1])], [P([[0, 0, 10, 10]], [0.9], [2])], ["a", "b"])
    assert r["per_class"]["a"]["AP"] == 0.0 and r["AP"] == 0.0


def test_accumulator_collects_batches_like_one_call():
    targets = [T([[0, 0, 10, 10]], [1]), T([[0, 0, 10, 10], [30, 30, 50, 50]], [1, 1])]
    preds = [P([[0, 0, 10, 9]], [0.9], [1]), P([[0, 0, 10, 10], [60, 60, 70, 70]], [0.9, 0.8], [1, 1])]
    acc = DetectionAccumulator(["a"])
    acc.update(preds[:1], targets[:1])
    acc.update(preds[1:], targets[1:])
    assert acc.result() == coco_map(targets, preds, ["a"])


def test_length_mismatch_and_unknown_old_class_are_errors():
    with pytest.raises(ValueError, match="1 targets but 0 predictions"):
        coco_map([T([], [])], [], ["a"])
    with pytest.raises(ValueError, match="old classes \\['z'\\]"):
        coco_map([T([[0, 0, 1, 1]], [1])], [P([[0, 0, 1, 1]], [1.0], [1])], ["a"], old_classes=["z"])
