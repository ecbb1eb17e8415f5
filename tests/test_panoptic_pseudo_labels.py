"""Pseudo-label steps (METHODS 3.3 a-f) and the distillation formulas, against hand computations."""
from __future__ import annotations

import math

import pytest
import torch

from incremental.panoptic.pseudo_labels import (
    PseudoLabelConfig,
    drop_masks_matching_ground_truth,
    drop_shrunk_masks,
    make_pseudo_labels,
    mask_ioa,
    mask_iou,
    merge_stuff_masks,
    pseudo_label_stages,
    remove_ground_truth_pixels,
    remove_noise_pixels,
    resolve_contested_pixels,
    select_old_class_queries,
)
from strategies.pseudo_label_distillation import (
    distillation_loss,
    divergence,
    fold_probabilities,
    mask_distillation_loss,
    no_object_weights,
    relabel_as_no_object,
    weighted_mean,
)


def b(rows: list[list[int]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.bool)


# ----------------------------------------------------------------------------- a
def test_select_old_class_queries_keeps_argmax_old_classes():
    # columns: class 0, class 1, no object. q0 -> class 0 (0.7), q1 -> no object, q2 -> class 1 (0.5)
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6], [0.2, 0.5, 0.3]])
    index, labels, scores = select_old_class_queries(probs, n_old_classes=2)
    assert index.tolist() == [0, 2]
    assert labels.tolist() == [0, 1]
    assert scores.tolist() == pytest.approx([0.7, 0.5])
    # with a score threshold of 0.6 only q0 stays
    assert select_old_class_queries(probs, 2, score_threshold=0.6)[0].tolist() == [0]


# ----------------------------------------------------------------------------- b
def test_mask_iou_by_hand():
    a = b([[1, 1, 0, 0]])[None]  # 2 px
    g = b([[0, 1, 1, 0]])[None]  # 2 px, 1 shared -> IoU = 1 / 3
    assert mask_iou(a, g).item() == pytest.approx(1 / 3)
    empty = torch.zeros(1, 1, 4, dtype=torch.bool)
    assert mask_iou(empty, empty).item() == 0.0


def test_drop_masks_matching_ground_truth():
    m0 = torch.zeros(4, 4, dtype=torch.bool)
    m0[:2, :2] = True  # top-left 2x2: 4 px
    m1 = torch.zeros(4, 4, dtype=torch.bool)
    m1[0] = True  # top row: 4 px
    gt = m0.clone()
    gt[2, 2] = True  # 5 px
    # IoU(m0, gt) = 4 / 5 = 0.8 > 0.5 -> dropped; IoU(m1, gt) = 2 / (4 + 5 - 2) = 2/7 -> kept
    keep = drop_masks_matching_ground_truth(torch.stack([m0, m1]), gt[None], iou_threshold=0.5)
    assert keep.tolist() == [False, True]
    # with a threshold of 0.8 the IoU 0.8 is not *above* it: both kept
    assert drop_masks_matching_ground_truth(torch.stack([m0, m1]), gt[None], 0.8).tolist() == [True, True]
    # no ground truth: nothing dropped
    assert drop_masks_matching_ground_truth(torch.stack([m0, m1]), gt[None][:0], 0.5).tolist() == [True, True]


def test_claim_by_intersection_over_the_mask_area():
    a = b([[1, 1, 0, 0]])[None]  # half of it inside g
    g = b([[0, 1, 1, 1]])[None]
    assert mask_ioa(a, g).item() == pytest.approx(0.5)  # IoU would be 1/4
    assert mask_ioa(torch.zeros(1, 1, 4, dtype=torch.bool), g).item() == 0.0
    assert drop_masks_matching_ground_truth(a, g, 0.4, claim="iou").tolist() == [True]
    assert drop_masks_matching_ground_truth(a, g, 0.4, claim="ioa").tolist() == [False]


# ----------------------------------------------------------------------------- c
def test_remove_noise_pixels():
    probs = torch.tensor([[[0.2, 0.5], [0.7, 0.49]]])
    assert remove_noise_pixels(probs, 0.5).tolist() == [[[False, True], [True, False]]]


# ----------------------------------------------------------------------------- d
def test_resolve_contested_pixels_gives_pixel_to_most_confident():
    masks = torch.stack([b([[1, 1, 0]]), b([[0, 1, 1]])])
    confidence = torch.tensor([[[0.9, 0.4, 0.0]], [[0.0, 0.6, 0.8]]])
    # pixel 1 is in 2 masks > 1: mask 1 (0.6) beats mask 0 (0.4)
    out = resolve_contested_pixels(masks, confidence, max_owners=1)
    assert out.tolist() == [[[True, False, False]], [[False, True, True]]]
    # with two owners allowed nothing is contested
    assert torch.equal(resolve_contested_pixels(masks, confidence, max_owners=2), masks)


def test_ground_truth_pixels_win():
    masks = b([[1, 1, 0]])[None]
    gt = b([[0, 1, 0]])[None]
    assert remove_ground_truth_pixels(masks, gt).tolist() == [[[True, False, False]]]


# ----------------------------------------------------------------------------- f
def test_drop_shrunk_masks():
    original = torch.zeros(3, 1, 5, dtype=torch.bool)
    original[0, 0, :5] = True
    original[1, 0, :5] = True
    resolved = original.clone()
    resolved[0, 0, 4] = False  # keeps 4 of 5 = 0.8 >= 0.8 -> kept
    resolved[1, 0, 3:] = False  # keeps 3 of 5 = 0.6 -> dropped
    # mask 2 is empty -> dropped
    assert drop_shrunk_masks(resolved, original, 0.8).tolist() == [True, False, False]


def test_merge_stuff_masks_unions_one_stuff_class():
    labels = torch.tensor([2, 0, 2])
    masks = torch.stack([b([[1, 0, 0]]), b([[0, 1, 0]]), b([[0, 0, 1]])])
    out_labels, out_masks = merge_stuff_masks(labels, masks, stuff_classes=[2])
    assert out_labels.tolist() == [0, 2]
    assert out_masks.tolist() == [[[False, True, False]], [[True, False, True]]]


# ----------------------------------------------------------------------------- a-f together
def test_make_pseudo_labels_by_hand():
    # 1x6 image, old classes 0 and 1 (column 2 = no object).
    class_probs = torch.tensor([
        [0.8, 0.1, 0.1],  # q0: class 0, score 0.8
        [0.1, 0.6, 0.3],  # q1: class 1, score 0.6
        [0.1, 0.1, 0.8],  # q2: no object -> not selected (a)
        [0.9, 0.05, 0.05],  # q3: class 0, but its mask is the ground truth's (b)
    ])
    mask_probs = torch.tensor([
        [0.9, 0.9, 0.9, 0.9, 0.6, 0.1],  # q0 -> pixels 0-4 (5 px) after c
        [0.1, 0.1, 0.1, 0.1, 0.9, 0.9],  # q1 -> pixels 4-5 (2 px)
        [0.9, 0.9, 0.9, 0.9, 0.9, 0.9],
        [0.0, 0.0, 0.0, 0.0, 0.0, 0.9],  # q3 -> pixel 5, IoU 1 with the ground truth -> dropped
    ])[:, None, :]
    gt = b([[0, 0, 0, 0, 0, 1]])[None]  # one new-class object at pixel 5
    # b: IoU(q1, gt) = 1/2, not above 0.5 -> kept.
    # d: pixel 4 is in q0 (confidence 0.8 * 0.6 = 0.48) and q1 (0.6 * 0.9 = 0.54): q1 keeps it.
    # ground truth wins: q1 loses pixel 5 -> q1 = {4} (1 of 2 px), q0 = {0,1,2,3} (4 of 5 px).
    # f: q0 keeps 0.8 >= 0.8 -> kept; q1 keeps 0.5 -> dropped.
    labels, masks = make_pseudo_labels(class_probs, mask_probs, gt, n_old_classes=2)
    assert labels.tolist() == [0]
    assert masks.tolist() == [[[True, True, True, True, False, False]]]


def test_pseudo_label_stages_show_what_each_step_removed():
    # the case of test_make_pseudo_labels_by_hand, stage by stage
    class_probs = torch.tensor([[0.8, 0.1, 0.1], [0.1, 0.6, 0.3], [0.1, 0.1, 0.8], [0.9, 0.05, 0.05]])
    mask_probs = torch.tensor([[0.9, 0.9, 0.9, 0.9, 0.6, 0.1], [0.1, 0.1, 0.1, 0.1, 0.9, 0.9],
                               [0.9, 0.9, 0.9, 0.9, 0.9, 0.9], [0.0, 0.0, 0.0, 0.0, 0.0, 0.9]])[:, None, :]
    gt = b([[0, 0, 0, 0, 0, 1]])[None]
    stages = pseudo_label_stages(class_probs, mask_probs, gt, n_old_classes=2)
    assert stages["a"][0].tolist() == [0, 1, 0]  # q0, q1, q3 (q2 is no object)
    assert stages["b"][0].tolist() == [0, 1]  # q3 is the ground truth's object
    assert stages["d"][1][:, 0].tolist() == [[True, True, True, True, False, False],
                                             [False, False, False, False, True, False]]
    assert stages["f"][0].tolist() == [0]  # q1 kept 1 of its 2 pixels
    # keeping masks that kept >= half their pixels keeps q1's fragment
    labels, _ = make_pseudo_labels(class_probs, mask_probs, gt, 2, PseudoLabelConfig(min_keep_fraction=0.5))
    assert labels.tolist() == [0, 1]
    # a score threshold of 0.7 drops q1 already at a
    assert pseudo_label_stages(class_probs, mask_probs, gt, 2, PseudoLabelConfig(score_threshold=0.7))["a"][0].tolist() == [0, 0]


def test_make_pseudo_labels_empty_when_old_model_sees_nothing():
    class_probs = torch.tensor([[0.1, 0.1, 0.8]])
    labels, masks = make_pseudo_labels(class_probs, torch.ones(1, 2, 2), torch.zeros(0, 2, 2, dtype=torch.bool), 2)
    assert labels.shape == (0,) and masks.shape == (0, 2, 2)


def test_pseudo_label_config_rejects_impossible_values():
    with pytest.raises(ValueError, match="iou_threshold"):
        PseudoLabelConfig(iou_threshold=1.5).validate()
    with pytest.raises(ValueError, match="max_owners"):
        PseudoLabelConfig(max_owners=0).validate()
    with pytest.raises(ValueError, match="claim"):
        PseudoLabelConfig(claim="dice").validate()  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- distillation
def test_no_object_weights():
    p = torch.tensor([0.1, 0.5, 1.0])
    assert no_object_weights(p, 1.0).tolist() == pytest.approx([0.9, 0.5, 0.0])
    assert no_object_weights(p, 2.0).tolist() == pytest.approx([0.81, 0.25, 0.0])  # CoMFormer's gamma


def test_fold_probabilities_mask2former_and_detector_layouts():
    # Mask2Former: old classes 0, 1; new class 2; no object last (3): [0.1, 0.2, 0.3 + 0.4]
    p = torch.tensor([0.1, 0.2, 0.3, 0.4])
    assert fold_probabilities(p, [0, 1], background=3).tolist() == pytest.approx([0.1, 0.2, 0.7])
    # Faster R-CNN: background first (0.5), old classes 1, 2, new class 3 (0.2): [0.2, 0.1, 0.5 + 0.2]
    p = torch.tensor([0.5, 0.2, 0.1, 0.2])
    assert fold_probabilities(p, [1, 2], background=0).tolist() == pytest.approx([0.2, 0.1, 0.7])
    with pytest.raises(ValueError, match="background"):
        fold_probabilities(p, [0, 1], background=0)


def test_divergences_by_hand():
    p, q = torch.tensor([0.5, 0.5]), torch.tensor([0.25, 0.75])
    # KL = 0.5 ln(0.5/0.25) + 0.5 ln(0.5/0.75) = 0.5 (0.693147) + 0.5 (-0.405465) = 0.143841
    assert divergence(p, q, "kl").item() == pytest.approx(0.143841, abs=1e-5)
    # CE = -(0.5 ln 0.25 + 0.5 ln 0.75) = 0.5 (1.386294) + 0.5 (0.287682) = 0.836988
    assert divergence(p, q, "ce").item() == pytest.approx(0.836988, abs=1e-5)
    assert divergence(p, p, "kl").item() == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(ValueError, match="unknown divergence"):
        divergence(p, q, "js")  # type: ignore[arg-type]


def test_weighted_mean():
    assert weighted_mean(torch.tensor([1.0, 3.0]), torch.tensor([0.25, 0.75])).item() == pytest.approx(2.5)
    zero = weighted_mean(torch.tensor([1.0, 3.0], requires_grad=True), torch.zeros(2))
    assert zero.item() == 0.0 and zero.requires_grad


def test_distillation_loss_by_hand():
    # old head: [class 0, no object]; q0 logits [ln 3, 0] -> p = [0.75, 0.25]; q1 [0, ln 3] -> [0.25, 0.75]
    old = torch.tensor([[math.log(3), 0.0], [0.0, math.log(3)]])
    # new head: [class 0, new class 1, no object]; q0 [ln 2, 0, 0] -> [0.5, 0.25, 0.25] -> folded [0.5, 0.5]
    # q1 [0, 0, 0] -> [1/3, 1/3, 1/3] -> folded [1/3, 2/3]
    new = torch.tensor([[math.log(2), 0.0, 0.0], [0.0, 0.0, 0.0]], requires_grad=True)
    # weights (gamma 1): 1 - 0.25 = 0.75 and 1 - 0.75 = 0.25 (sum 1)
    # KL q0 = 0.75 ln(0.75/0.5) + 0.25 ln(0.25/0.5) = 0.304099 - 0.173287 = 0.130812
    # KL q1 = 0.25 ln(0.25/(1/3)) + 0.75 ln(0.75/(2/3)) = -0.071921 + 0.088337 = 0.016417
    # loss = 0.75 * 0.130812 + 0.25 * 0.016417 = 0.102213
    loss = distillation_loss(old, new, old_columns=[0], old_background=1, new_background=2, gamma=1.0, kind="kl")
    assert loss.item() == pytest.approx(0.102213, abs=1e-5)
    loss.backward()
    assert new.grad is not None and new.grad.abs().sum() > 0
    # gamma 2: weights 0.5625 and 0.0625 (sum 0.625): (0.5625 * 0.130812 + 0.0625 * 0.016417) / 0.625 = 0.119372
    loss2 = distillation_loss(old, new.detach(), [0], 1, 2, gamma=2.0, kind="kl")
    assert loss2.item() == pytest.approx(0.119372, abs=1e-5)


def test_claimed_rows_are_distilled_towards_no_object_by_hand():
    relabelled = relabel_as_no_object(torch.tensor([[0.6, 0.4], [0.3, 0.7]]), torch.tensor([True, False]))
    assert relabelled.flatten().tolist() == pytest.approx([0.0, 1.0, 0.3, 0.7])
    # the case of test_distillation_loss_by_hand with q0's teacher replaced by "no object":
    # KL q0 = 1 ln(1 / 0.5) = 0.693147 at weight 0.75 (the old model saw an object there);
    # q1 unchanged: 0.016417 at weight 0.25 -> 0.75 * 0.693147 + 0.25 * 0.016417 = 0.523965
    old = torch.tensor([[math.log(3), 0.0], [0.0, math.log(3)]])
    new = torch.tensor([[math.log(2), 0.0, 0.0], [0.0, 0.0, 0.0]])
    loss = distillation_loss(old, new, [0], 1, 2, to_no_object=torch.tensor([True, False]))
    assert loss.item() == pytest.approx(0.523965, abs=1e-5)
    with pytest.raises(ValueError, match="last column"):
        distillation_loss(old, new, [1], 0, 2, to_no_object=torch.tensor([True, False]))


def test_mask_distillation_loss_by_hand():
    # row 0: old logits 0 -> target 0.5; new logits [0, ln 3]:
    # BCE(0, 0.5) = ln 2 = 0.693147; BCE(ln 3, 0.5) = ln 4 - 0.5 ln 3 = 0.836988 -> mean 0.765068
    # row 1: old logits 10 (target 0.99995), new 0 -> BCE = ln 2 = 0.693147
    old = torch.tensor([[0.0, 0.0], [10.0, 10.0]])
    new = torch.tensor([[0.0, math.log(3)], [0.0, 0.0]], requires_grad=True)
    assert mask_distillation_loss(old, new, torch.tensor([1.0, 0.0])).item() == pytest.approx(0.765068, abs=1e-5)
    loss = mask_distillation_loss(old, new, torch.tensor([1.0, 1.0]))
    assert loss.item() == pytest.approx((0.765068 + 0.693147) / 2, abs=1e-5)
    loss.backward()
    assert new.grad is not None and new.grad[1].abs().sum() > 0


def test_ground_truth_removal_after_the_shrink_test_keeps_the_fragment():
    # same case as test_make_pseudo_labels_by_hand with ground truth removed *after* f:
    # f: q0 keeps 4/5 (kept), q1 keeps {4, 5} = 2/2 (kept); then ground truth takes pixel 5 from q1.
    class_probs = torch.tensor([[0.8, 0.1, 0.1], [0.1, 0.6, 0.3]])
    mask_probs = torch.tensor([[0.9, 0.9, 0.9, 0.9, 0.6, 0.1], [0.1, 0.1, 0.1, 0.1, 0.9, 0.9]])[:, None, :]
    gt = b([[0, 0, 0, 0, 0, 1]])[None]
    cfg = PseudoLabelConfig(ground_truth_before_shrink=False)
    labels, masks = make_pseudo_labels(class_probs, mask_probs, gt, n_old_classes=2, config=cfg)
    assert labels.tolist() == [0, 1]
    assert masks[:, 0].tolist() == [[True, True, True, True, False, False], [False, False, False, False, True, False]]
