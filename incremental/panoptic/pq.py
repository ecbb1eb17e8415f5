"""Panoptic quality (PQ = SQ x RQ) per class and for groups of classes, with torchmetrics.

torchmetrics' ``PanopticQuality`` does the segment matching (IoU > 0.5, void handling). One trap:
pixels a prediction leaves unassigned must not be passed as an unknown category with
``allow_unknown_preds_category=True``: torchmetrics then treats them as *void*, subtracts them from
the union and drops every ground-truth segment that is mostly covered by them, so a model that
predicts nothing on a segment is not charged a false negative (one measured case: 1.0 instead of
the reference COCO panoptic evaluation's 0.0). The reference (panopticapi) counts such a segment as
a false negative. We therefore paint unassigned prediction pixels with a *dummy stuff class* that
no target has: its segments never match, ground truth under them is an ordinary false negative, and
the dummy class is left out of every mean. Ground-truth void (unlabelled pixels, classes not
evaluated, crowd) is passed as an unknown category, which torchmetrics ignores exactly as
panopticapi ignores VOID.

Means follow panopticapi: over the classes with at least one TP, FP or FN.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch
from torchmetrics.detection import PanopticQuality

from .inference import PanopticPrediction, panoptic_inference

#: Category id written for ground-truth void; anything not in things/stuffs is void to torchmetrics.
VOID_CATEGORY = -1


def target_category_instance_map(target: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """(H, W, 2) long ``(class, instance)`` of a target dict; uncovered pixels are void (-1, 0)."""
    masks = target["masks"].bool()
    h, w = masks.shape[-2:]
    out = torch.zeros(h, w, 2, dtype=torch.long)
    out[..., 0] = VOID_CATEGORY
    for k in range(masks.shape[0]):
        out[masks[k].cpu(), 0] = int(target["labels"][k])
        out[masks[k].cpu(), 1] = k + 1
    return out


def pq_from_counts(iou_sum: torch.Tensor, tp: torch.Tensor, fp: torch.Tensor, fn: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per class ``SQ = IoU_sum / TP``, ``RQ = TP / (TP + FP/2 + FN/2)``, ``PQ = SQ * RQ``
    (0 where undefined), Kirillov et al., CVPR 2019."""
    tp, fp, fn = tp.double(), fp.double(), fn.double()
    sq = torch.where(tp > 0, iou_sum.double() / tp.clamp(min=1), torch.zeros_like(tp))
    denominator = tp + 0.5 * fp + 0.5 * fn
    rq = torch.where(denominator > 0, tp / denominator.clamp(min=1e-12), torch.zeros_like(tp))
    return sq * rq, sq, rq


def group_mean(values: Mapping[int, float], present: Mapping[int, bool], classes: Sequence[int]) -> float | None:
    """Mean of ``values`` over ``classes`` that are ``present`` (have a TP, FP or FN); None if none."""
    chosen = [values[c] for c in classes if present.get(c, False)]
    return float(sum(chosen) / len(chosen)) if chosen else None


class PanopticQualityAccumulator:
    """PQ/SQ/RQ over an evaluation set: ``update(model outputs, targets)`` then ``result()``.

    ``class_names[i]`` names model class i; ``thing_classes`` are the countable ones (the rest are
    stuff). ``groups`` maps a name ("old", "new", "base", ...) to class indices whose mean is
    reported as ``pq_<name>``, ``sq_<name>``, ``rq_<name>``. Usable as the loop's eval accumulator
    (``update(mb_output, mb_y)``) or with ready panoptic predictions (``update_predictions``).
    """

    def __init__(self, class_names: Sequence[str], thing_classes: Sequence[int],
                 groups: Mapping[str, Sequence[int]] | None = None, *, object_threshold: float = 0.5,
                 overlap_threshold: float = 0.8, mask_threshold: float = 0.5) -> None:
        self.class_names = list(class_names)
        n = len(self.class_names)
        self.things = sorted(int(c) for c in thing_classes)
        self.stuffs = [c for c in range(n) if c not in set(self.things)]
        bad = [c for c in self.things if not 0 <= c < n]
        if bad:
            raise ValueError(f"thing classes {bad} are not class indices 0..{n - 1}")
        self.dummy = n  # dummy stuff class for unassigned prediction pixels; never in a mean
        self.groups = {k: [int(c) for c in v] for k, v in (groups or {}).items()}
        self.inference = dict(object_threshold=object_threshold, overlap_threshold=overlap_threshold,
                              mask_threshold=mask_threshold)
        self.metric = PanopticQuality(things=set(self.things), stuffs=set(self.stuffs) | {self.dummy},
                                      allow_unknown_preds_category=False, return_sq_and_rq=True,
                                      return_per_class=True)
        self.n_images = 0

    def prediction_map(self, prediction: PanopticPrediction) -> torch.Tensor:
        labels = {seg["label"] for seg in prediction.segments}
        unknown = sorted(labels - set(range(len(self.class_names))))
        if unknown:
            raise ValueError(f"the model predicted classes {unknown}, but only {len(self.class_names)} are evaluated")
        return prediction.category_instance_map(unassigned=(self.dummy, 0))

    def update_predictions(self, predictions: Sequence[PanopticPrediction], targets: Sequence[Mapping[str, Any]]) -> None:
        if len(predictions) != len(targets):
            raise ValueError(f"{len(predictions)} predictions for {len(targets)} targets")
        if not predictions:
            return
        preds = torch.stack([self.prediction_map(p) for p in predictions])
        gts = torch.stack([self.target_map(t) for t in targets])
        self.metric.update(preds, gts)
        self.n_images += len(predictions)

    def target_map(self, target: Mapping[str, Any]) -> torch.Tensor:
        out = target_category_instance_map(target)
        out[out[..., 0] >= len(self.class_names), 0] = VOID_CATEGORY  # classes not evaluated: void
        return out

    def update(self, outputs: dict[str, Any], targets: Sequence[Mapping[str, Any]]) -> None:
        size = tuple(targets[0]["masks"].shape[-2:])
        self.update_predictions(panoptic_inference(outputs, size, self.things, **self.inference), targets)

    def counts(self) -> dict[str, torch.Tensor]:
        """Per class (things then stuffs, torchmetrics' order) IoU sum, TP, FP, FN."""
        m = self.metric
        return {"iou_sum": m.iou_sum.clone(), "tp": m.true_positives.clone(), "fp": m.false_positives.clone(),
                "fn": m.false_negatives.clone()}

    def result(self) -> dict[str, Any]:
        c = self.counts()
        pq, sq, rq = pq_from_counts(c["iou_sum"], c["tp"], c["fp"], c["fn"])
        order = self.things + sorted(self.stuffs + [self.dummy])  # torchmetrics: things, then stuffs, sorted
        index = {cls: k for k, cls in enumerate(order)}
        per = {name: {} for name in ("pq", "sq", "rq")}
        present: dict[int, bool] = {}
        for cls in range(len(self.class_names)):
            k = index[cls]
            per["pq"][cls], per["sq"][cls], per["rq"][cls] = float(pq[k]), float(sq[k]), float(rq[k])
            present[cls] = bool(c["tp"][k] + c["fp"][k] + c["fn"][k] > 0)
        every = list(range(len(self.class_names)))
        out: dict[str, Any] = {"n_images": self.n_images}
        for metric in ("pq", "sq", "rq"):
            out[f"{metric}_all"] = group_mean(per[metric], present, every)
            out[f"{metric}_things"] = group_mean(per[metric], present, self.things)
            out[f"{metric}_stuff"] = group_mean(per[metric], present, self.stuffs)
            for name, classes in self.groups.items():
                out[f"{metric}_{name}"] = group_mean(per[metric], present, classes)
        for metric in ("pq", "sq", "rq"):
            out[f"{metric}_per_class"] = {self.class_names[cls]: (v if present[cls] else None)
                                          for cls, v in per[metric].items()}
        # cross-check with torchmetrics' own per-class PQ ((C, 3) rows: pq, sq, rq), against an order mix-up;
        # torchmetrics divides in float32, hence the tolerance
        tm = self.metric.compute()
        for cls in every:
            if present[cls] and not math.isclose(float(tm[index[cls], 0]), per["pq"][cls], abs_tol=1e-6):
                raise RuntimeError(f"PQ of class {self.class_names[cls]} disagrees with torchmetrics "
                                   f"({per['pq'][cls]} vs {float(tm[index[cls], 0])})")
        return out
