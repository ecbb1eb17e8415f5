"""PQ / SQ / RQ with torchmetrics and the dummy-stuff trick, against hand-computed COCO panoptic PQ."""
from __future__ import annotations

import pytest
import torch
from torchmetrics.detection import PanopticQuality

from incremental.panoptic.inference import PanopticPrediction
from incremental.panoptic.pq import PanopticQualityAccumulator, group_mean, pq_from_counts, target_category_instance_map

NAMES = ["a", "b", "s"]  # classes 0, 1 things; 2 stuff


def prediction(segment_map: list[list[int]], labels: dict[int, int]) -> PanopticPrediction:
    """Segment ids per pixel (0 = unassigned) and the class of each id (class 2 is stuff)."""
    sm = torch.tensor(segment_map)
    segs = [{"id": i, "label": c, "isthing": c != 2, "score": 1.0} for i, c in labels.items()]
    return PanopticPrediction(sm, segs)


def target(segment_map: list[list[int]], labels: dict[int, int]) -> dict[str, torch.Tensor]:
    sm = torch.tensor(segment_map)
    ids = sorted(labels)
    return {"labels": torch.tensor([labels[i] for i in ids]), "masks": torch.stack([sm == i for i in ids])}


def test_pq_from_counts_by_hand():
    # class 0: IoU sum 1.5 over 2 TP, 1 FP, 1 FN: SQ 0.75, RQ 2 / 3, PQ 0.5; class 1: nothing -> 0
    pq, sq, rq = pq_from_counts(torch.tensor([1.5, 0.0]), torch.tensor([2, 0]), torch.tensor([1, 0]),
                                torch.tensor([1, 0]))
    assert sq.tolist() == pytest.approx([0.75, 0.0])
    assert rq.tolist() == pytest.approx([2 / 3, 0.0])
    assert pq.tolist() == pytest.approx([0.5, 0.0])


def test_group_mean_skips_absent_classes():
    assert group_mean({0: 0.5, 1: 0.0, 2: 1.0}, {0: True, 1: False, 2: True}, [0, 1, 2]) == pytest.approx(0.75)
    assert group_mean({0: 0.5}, {0: False}, [0]) is None


def test_unassigned_prediction_pixels_are_false_negatives_not_void():
    # 1x4: ground truth a = pixels 0-1, b = pixels 2-3. The prediction finds a and leaves 2-3 unassigned.
    # COCO panoptic (panopticapi): a TP with IoU 1 -> PQ_a = 1; b has no prediction -> FN -> PQ_b = 0;
    # mean over the classes present = 0.5.
    gt = target([[1, 1, 2, 2]], {1: 0, 2: 1})
    pred = prediction([[1, 1, 0, 0]], {1: 0})
    acc = PanopticQualityAccumulator(NAMES, thing_classes=[0, 1])
    acc.update_predictions([pred], [gt])
    out = acc.result()
    assert out["pq_per_class"] == {"a": pytest.approx(1.0), "b": pytest.approx(0.0), "s": None}
    assert out["pq_all"] == pytest.approx(0.5)
    # The trap: unassigned pixels passed as an unknown category with allow_unknown_preds_category=True
    # become void, b's ground truth (all void in the prediction) is not counted, and the mean is 1.0.
    naive = PanopticQuality(things={0, 1}, stuffs={2}, allow_unknown_preds_category=True)
    p = pred.category_instance_map(unassigned=(99, 0))
    naive.update(p[None], target_category_instance_map(gt)[None])
    assert naive.compute().item() == pytest.approx(1.0)


def test_partial_overlap_false_positive_and_stuff_by_hand():
    # image 1 (1x10): gt a = 0-5 (6 px), s = 6-9 (4 px); pred a = 0-3 (4 px), s = 4-9 (6 px)
    #   a: IoU 4/6 = 0.667 > 0.5 -> TP; s: IoU 4/6 = 0.667 -> TP
    # image 2 (1x10): gt s = 0-9; pred a = 0-2 (3 px, no a in gt -> FP), s = 3-9: IoU 7/10 = 0.7 -> TP
    # a: TP 1 (IoU 0.667), FP 1 -> SQ 0.667, RQ 1/1.5 = 0.667, PQ 0.4444
    # s: TP 2, IoU sum 1.3667 -> SQ 0.6833, RQ 1, PQ 0.6833; b absent; mean = (0.4444 + 0.6833)/2 = 0.5639
    gt1 = target([[1] * 6 + [2] * 4], {1: 0, 2: 2})
    pr1 = prediction([[1] * 4 + [2] * 6], {1: 0, 2: 2})
    gt2 = target([[1] * 10], {1: 2})
    pr2 = prediction([[1] * 3 + [2] * 7], {1: 0, 2: 2})
    acc = PanopticQualityAccumulator(NAMES, thing_classes=[0, 1], groups={"old": [0], "new": [1, 2]})
    acc.update_predictions([pr1, pr2], [gt1, gt2])
    out = acc.result()
    assert out["pq_per_class"]["a"] == pytest.approx(4 / 9, abs=1e-4)
    assert out["sq_per_class"]["s"] == pytest.approx((4 / 6 + 0.7) / 2, abs=1e-4)
    assert out["rq_per_class"]["a"] == pytest.approx(2 / 3, abs=1e-4)
    assert out["pq_all"] == pytest.approx((4 / 9 + (4 / 6 + 0.7) / 2) / 2, abs=1e-4)
    assert out["pq_old"] == pytest.approx(4 / 9, abs=1e-4)
    assert out["pq_new"] == pytest.approx((4 / 6 + 0.7) / 2, abs=1e-4)  # b absent: only s counts
    assert out["pq_things"] == pytest.approx(4 / 9, abs=1e-4)


def test_ground_truth_void_is_ignored_like_panopticapi():
    # 1x10: gt a = 0-1, void elsewhere (e.g. a class not evaluated yet). pred a = 0-3 (2 px on void):
    # union = 4 - 2 (pred on void) + 2 - 2 = 2 -> IoU 1. A second pred a on 4-9 lies on void -> not an FP.
    gt = target([[1, 1] + [0] * 8], {1: 0})
    pred = prediction([[1] * 4 + [2] * 6], {1: 0, 2: 0})
    acc = PanopticQualityAccumulator(NAMES, thing_classes=[0, 1])
    acc.update_predictions([pred], [gt])
    out = acc.result()
    assert out["pq_per_class"]["a"] == pytest.approx(1.0)
    c = acc.counts()
    assert int(c["fp"].sum()) == 0 or int(c["fp"][-1]) == int(c["fp"].sum())  # only the dummy class may have FPs


def test_classes_not_evaluated_in_targets_become_void():
    # target class 3 is beyond the 3 evaluated classes (a later step): its pixels are void
    gt = target([[1, 1, 2, 2]], {1: 0, 2: 3})
    pred = prediction([[1, 1, 0, 0]], {1: 0})
    acc = PanopticQualityAccumulator(NAMES, thing_classes=[0, 1])
    acc.update_predictions([pred], [gt])
    assert acc.result()["pq_all"] == pytest.approx(1.0)


def test_prediction_of_unknown_class_is_an_error():
    acc = PanopticQualityAccumulator(NAMES, thing_classes=[0, 1])
    with pytest.raises(ValueError, match="predicted classes"):
        acc.update_predictions([prediction([[1]], {1: 7})], [target([[1]], {1: 0})])
