"""Model, growing class head, Hungarian matcher, set criterion and panoptic inference."""
from __future__ import annotations

import math

import pytest
import torch

from incremental.panoptic.criterion import SetCriterion, class_weights, dice_loss, query_class_loss, sigmoid_bce_loss
from incremental.panoptic.inference import panoptic_from_queries
from incremental.panoptic.matcher import bce_cost, class_cost, dice_cost, hungarian_match
from incremental.panoptic.model import NoObjectClassHead, build_panoptic_model

TINY = dict(n_queries=4, hidden_dim=16, n_layers=2, n_heads=2, ffn_dim=16, mask_dim=16, backbone_channels=[8, 8, 8])


def test_model_outputs_and_deep_supervision_shapes():
    torch.manual_seed(0)
    model = build_panoptic_model(n_classes=3, **TINY)
    out = model(torch.rand(2, 3, 32, 32))
    assert out["pred_logits"].shape == (2, 4, 4)  # 3 classes + no object
    assert out["pred_masks"].shape == (2, 4, 8, 8)  # stride 4
    assert len(out["aux_outputs"]) == 2  # the prediction before the first layer and after layer 1
    out["pred_logits"].sum().backward()
    assert model.class_head.linear.weight.grad is not None


def test_head_grows_between_old_classes_and_no_object():
    torch.manual_seed(0)
    head = NoObjectClassHead(8, 2)
    old_w, old_b = head.linear.weight.detach().clone(), head.linear.bias.detach().clone()
    assert head.grow_to(4) is True
    w, bias = head.linear.weight.detach(), head.linear.bias.detach()
    assert head.n_classes == 4 and w.shape == (5, 8)
    assert torch.equal(w[:2], old_w[:2]) and torch.equal(bias[:2], old_b[:2])  # old classes unchanged
    assert torch.equal(w[-1], old_w[-1]) and torch.equal(bias[-1], old_b[-1])  # no object stays last
    assert head.grow_to(3) is False  # never shrinks


def test_trainer_model_adaptation_grows_the_panoptic_head():
    from incremental.trainer import Trainer

    model = build_panoptic_model(n_classes=2, **TINY)
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1))
    trainer.classes_seen = {0, 1, 2}
    trainer.model_adaptation()
    assert model.n_classes == 3 and model(torch.rand(1, 3, 32, 32))["pred_logits"].shape[-1] == 4


def test_model_rejects_bad_sizes():
    with pytest.raises(ValueError, match="multiple of n_heads"):
        build_panoptic_model(n_classes=2, hidden_dim=10, n_heads=4)


# ----------------------------------------------------------------------------- matcher
def test_costs_by_hand():
    logits = torch.tensor([[math.log(3), 0.0]])  # p = [0.75, 0.25]
    assert class_cost(logits, torch.tensor([0, 1]))[0].tolist() == pytest.approx([-0.75, -0.25])
    mask_logits = torch.zeros(1, 2)  # sigmoid 0.5; BCE(0, t) = ln 2 for t = 0 and t = 1
    targets = torch.tensor([[1.0, 0.0]])
    assert bce_cost(mask_logits, targets).item() == pytest.approx(math.log(2))
    # dice: 1 - (2 * 0.5 + 1) / (0.5 + 0.5 + 1 + 1) = 1 - 2/3 = 1/3
    assert dice_cost(mask_logits, targets).item() == pytest.approx(1 / 3)


def test_hungarian_match_pairs_queries_with_their_objects():
    masks = torch.zeros(2, 4, 4)
    masks[0, :2] = 1  # target 0: top half
    masks[1, 2:] = 1  # target 1: bottom half
    mask_logits = torch.stack([masks[1] * 20 - 10, masks[0] * 20 - 10, torch.zeros(4, 4)])  # q0 ~ t1, q1 ~ t0
    logits = torch.zeros(3, 3)
    q, t = hungarian_match(logits, mask_logits, torch.tensor([0, 1]), masks)
    assert dict(zip(q.tolist(), t.tolist())) == {0: 1, 1: 0}
    q, t = hungarian_match(logits, mask_logits, torch.zeros(0, dtype=torch.long), masks[:0])
    assert len(q) == 0 and len(t) == 0


# ----------------------------------------------------------------------------- criterion
def test_loss_pieces_by_hand():
    assert class_weights(2, 0.1).tolist() == pytest.approx([1.0, 1.0, 0.1])
    logits = torch.zeros(1, 16)
    tgt = torch.zeros(1, 16)
    tgt[0, :8] = 1
    assert sigmoid_bce_loss(logits, tgt).item() == pytest.approx(math.log(2))
    # dice: sum p = 8, sum t = 8, sum p t = 4 -> 1 - (8 + 1) / (16 + 1) = 8/17
    assert dice_loss(logits, tgt).item() == pytest.approx(8 / 17)


def test_criterion_by_hand():
    outputs = {"pred_logits": torch.zeros(1, 2, 2), "pred_masks": torch.zeros(1, 2, 4, 4), "aux_outputs": []}
    crit = SetCriterion(no_object_weight=0.1, deep_supervision=False)
    # no targets: both queries learn "no object": CE = ln 2 each, weighted mean ln 2; x weight 2
    empty = [{"labels": torch.zeros(0, dtype=torch.long), "masks": torch.zeros(0, 4, 4, dtype=torch.bool)}]
    assert crit(outputs, empty).item() == pytest.approx(2 * math.log(2))
    # one target, class 0, half the pixels: class CE ln 2 (weights 1 and 0.1 -> weighted mean ln 2),
    # BCE ln 2 per pixel, dice 8/17 (one target): 2 ln 2 + 5 ln 2 + 5 * 8/17 = 7.204971
    mask = torch.zeros(1, 4, 4, dtype=torch.bool)
    mask[0, :2] = True
    one = [{"labels": torch.tensor([0]), "masks": mask}]
    assert crit(outputs, one).item() == pytest.approx(7 * math.log(2) + 40 / 17, abs=1e-5)
    # deep supervision adds the same loss for every auxiliary stage
    outputs["aux_outputs"] = [{"pred_logits": torch.zeros(1, 2, 2), "pred_masks": torch.zeros(1, 2, 4, 4)}]
    deep = SetCriterion(no_object_weight=0.1, deep_supervision=True)
    assert deep(outputs, one).item() == pytest.approx(2 * (7 * math.log(2) + 40 / 17), abs=1e-5)


def test_query_class_loss_unbiased_and_skipped_by_hand():
    # classes 0, 1, no object (2). q0 [ln 2, 0, 0] -> p = [0.5, 0.25, 0.25], matched to class 0;
    # q1 [0, 0, 0] -> p = 1/3 each, unmatched (no object, weight 0.1)
    logits = torch.tensor([[[math.log(2), 0.0, 0.0], [0.0, 0.0, 0.0]]])
    target = torch.tensor([[0, 2]])
    weights = class_weights(2, 0.1)
    unmatched = target == 2
    # plain: (1 * ln 2 + 0.1 * ln 3) / 1.1 = 0.729099, what F.cross_entropy gives
    plain = query_class_loss(logits, target, weights)
    assert plain.item() == pytest.approx((math.log(2) + 0.1 * math.log(3)) / 1.1, abs=1e-6)
    assert plain.item() == pytest.approx(torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, weights).item())
    # unbiased, class 0 may be unlabelled: q1's loss is -ln(p0 + p_no_object) = -ln(2/3) = 0.405465
    unbiased = query_class_loss(logits, target, weights, unmatched, torch.tensor([1]))
    assert unbiased.item() == pytest.approx((math.log(2) + 0.1 * math.log(1.5)) / 1.1, abs=1e-6)
    # 0 unlabelled classes = plain
    assert query_class_loss(logits, target, weights, unmatched, torch.tensor([0])).item() == pytest.approx(plain.item())
    # q1 skipped: only q0 is left, ln 2; a skipped *matched* query still counts
    skipped = query_class_loss(logits, target, weights, unmatched, None, torch.tensor([[False, True]]))
    assert skipped.item() == pytest.approx(math.log(2), abs=1e-6)
    assert query_class_loss(logits, target, weights, unmatched, None, torch.tensor([[True, False]])).item() \
        == pytest.approx(plain.item())


def test_criterion_reads_the_unlabelled_keys_of_targets():
    outputs = {"pred_logits": torch.zeros(1, 2, 3), "pred_masks": torch.zeros(1, 2, 4, 4), "aux_outputs": []}
    crit = SetCriterion(no_object_weight=0.1, deep_supervision=False)
    empty = {"labels": torch.zeros(0, dtype=torch.long), "masks": torch.zeros(0, 4, 4, dtype=torch.bool)}
    # both queries unmatched; plain: ln 3 each; unbiased with 1 old class: -ln(2/3); x class weight 2
    assert crit(outputs, [empty]).item() == pytest.approx(2 * math.log(3), abs=1e-6)
    assert crit(outputs, [{**empty, "unlabelled_classes": 1}]).item() == pytest.approx(2 * math.log(1.5), abs=1e-6)
    # one query skipped: the other one's ln 3 is the mean; both skipped: 0
    assert crit(outputs, [{**empty, "skip_queries": torch.tensor([True, False])}]).item() == pytest.approx(2 * math.log(3))
    assert crit(outputs, [{**empty, "skip_queries": torch.tensor([True, True])}]).item() == 0.0


def test_criterion_trains_on_full_resolution_targets():
    torch.manual_seed(0)
    model = build_panoptic_model(n_classes=2, **TINY)
    masks = torch.zeros(2, 32, 32, dtype=torch.bool)
    masks[0, :16] = True
    masks[1, 16:] = True
    targets = [{"labels": torch.tensor([0, 1]), "masks": masks}]
    loss = SetCriterion()(model(torch.rand(1, 3, 32, 32)), targets)
    loss.backward()
    assert torch.isfinite(loss) and model.backbone.stem[0][0].weight.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- inference
def test_panoptic_inference_by_hand():
    # classes: 0 thing, 1 stuff; column 2 = no object. 2x2 image.
    top = torch.tensor([[10.0, 10.0], [-10.0, -10.0]])
    logits = torch.tensor([
        [5.0, 0.0, 0.0],  # q0: thing 0, top row
        [0.0, 5.0, 0.0],  # q1: stuff 1, bottom row
        [0.0, 0.0, 5.0],  # q2: no object -> dropped
        [3.0, 0.0, 0.0],  # q3: thing 0 again on the top row, lower score -> owns nothing -> dropped
    ])
    masks = torch.stack([top, -top, top, top])
    pred = panoptic_from_queries(logits, masks, thing_classes=[0])
    assert pred.segment_map.tolist() == [[1, 1], [2, 2]]
    assert [(s["label"], s["isthing"]) for s in pred.segments] == [(0, True), (1, False)]
    cat = pred.category_instance_map()
    assert cat[..., 0].tolist() == [[0, 0], [1, 1]] and cat[1, 0, 1].item() == 0  # stuff instance 0
    # an object threshold above every score keeps nothing: every pixel unassigned
    assert panoptic_from_queries(logits, masks, [0], object_threshold=0.999).segment_map.sum() == 0


def test_panoptic_inference_merges_stuff_and_filters_overlap():
    left = torch.tensor([[10.0, -10.0], [10.0, -10.0]])
    logits = torch.tensor([[0.0, 5.0, 0.0], [0.0, 5.0, 0.0]])  # two stuff-1 queries
    pred = panoptic_from_queries(logits, torch.stack([left, -left]), thing_classes=[0])
    assert pred.segment_map.tolist() == [[1, 1], [1, 1]] and len(pred.segments) == 1
    # overlap filter: q1's mask (>= 0.5) covers the whole image but it owns only the right column
    # (q0 is more confident on the left): 2 of 4 px = 0.5 < 0.8 -> dropped
    everything = torch.full((2, 2), 10.0)
    logits = torch.tensor([[5.0, 0.0, 0.0], [3.0, 0.0, 0.0]])
    pred = panoptic_from_queries(logits, torch.stack([left, everything]), thing_classes=[0])
    assert pred.segment_map.tolist() == [[1, 0], [1, 0]]
