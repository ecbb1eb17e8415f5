"""COCO mAP with pycocotools' COCOeval: AP, AP50, per class, and old / new class means.

The reference implementation does the matching, the 101-point interpolation and the IoU sweep; this
module only converts torchvision-style targets and predictions to COCO dicts and reads COCOeval's
``precision`` array for per-class numbers. Avalanche's ``DetectionMetrics`` is not used: it imports
the ``lvis`` package even for COCO data and fails where that is missing.

Numbers are in AP points (0-100), as COCO results are usually quoted. A class without ground truth
in the evaluated images has no AP (``None``) and is left out of every mean, as COCOeval does.
"""
from __future__ import annotations

import contextlib
import io
import math
from typing import Any, Mapping, Sequence

import numpy as np
import torch


def _coco_dicts(targets: Sequence[Mapping[str, torch.Tensor]], predictions: Sequence[Mapping[str, torch.Tensor]],
                n_classes: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Ground truth as a COCO dict and detections in the COCO results format (image k has id k + 1;
    category id = contiguous label)."""
    images, anns, dets = [], [], []
    for k, (t, p) in enumerate(zip(targets, predictions)):
        image_id = k + 1
        images.append({"id": image_id})
        for box, label in zip(t["boxes"].tolist(), t["labels"].tolist()):
            x1, y1, x2, y2 = box
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": int(label),
                         "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": 0})
        for box, score, label in zip(p["boxes"].tolist(), p["scores"].tolist(), p["labels"].tolist()):
            x1, y1, x2, y2 = box
            dets.append({"image_id": image_id, "category_id": int(label), "bbox": [x1, y1, x2 - x1, y2 - y1],
                         "score": float(score)})
    gt = {"images": images, "annotations": anns,
          "categories": [{"id": i, "name": str(i)} for i in range(1, n_classes + 1)]}
    return gt, dets


def _mean(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


def coco_map(
    targets: Sequence[Mapping[str, torch.Tensor]],
    predictions: Sequence[Mapping[str, torch.Tensor]],
    class_names: Sequence[str],
    old_classes: Sequence[str] | None = None,
) -> dict[str, Any]:
    """COCO box mAP of ``predictions`` against ``targets`` (lists in the same image order).

    Returns ``AP`` (mean over IoU 0.50:0.95), ``AP50``, ``per_class`` ``{name: {"AP", "AP50"}}`` and,
    when ``old_classes`` is given, ``AP_old`` / ``AP50_old`` / ``AP_new`` / ``AP50_new`` (mean over
    the per-class values of that group: the same mean COCOeval takes over all classes).
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if len(targets) != len(predictions):
        raise ValueError(f"coco_map: {len(targets)} targets but {len(predictions)} predictions")
    n_classes = len(class_names)
    gt_dict, dets = _coco_dicts(targets, predictions, n_classes)
    has_gt = {a["category_id"] for a in gt_dict["annotations"]}
    per_class: dict[str, dict[str, float | None]] = {}
    if not gt_dict["annotations"]:
        per_class = {n: {"AP": None, "AP50": None} for n in class_names}
    elif not dets:  # COCO.loadRes cannot take an empty list; nothing detected is AP 0
        per_class = {n: ({"AP": 0.0, "AP50": 0.0} if i + 1 in has_gt else {"AP": None, "AP50": None})
                     for i, n in enumerate(class_names)}
    else:
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
            gt = COCO()
            gt.dataset = gt_dict
            gt.createIndex()
            dt = gt.loadRes(dets)
            ev = COCOeval(gt, dt, iouType="bbox")
            ev.params.catIds = list(range(1, n_classes + 1))
            ev.evaluate()
            ev.accumulate()
        # precision: [IoU thresholds (10), recall points (101), classes, area ranges, max dets]
        precision = ev.eval["precision"][:, :, :, 0, -1]  # area "all", 100 detections
        for k, name in enumerate(class_names):
            p = precision[:, :, k]
            if k + 1 not in has_gt:
                per_class[name] = {"AP": None, "AP50": None}
                continue
            valid = p[p > -1]
            p50 = p[0][p[0] > -1]
            per_class[name] = {"AP": 100.0 * float(valid.mean()) if valid.size else 0.0,
                               "AP50": 100.0 * float(p50.mean()) if p50.size else 0.0}
    result: dict[str, Any] = {
        "AP": _mean([v["AP"] for v in per_class.values()]),
        "AP50": _mean([v["AP50"] for v in per_class.values()]),
        "per_class": per_class,
        "images": len(targets),
    }
    if old_classes is not None:
        old = set(old_classes)
        unknown = old - set(class_names)
        if unknown:
            raise ValueError(f"coco_map: old classes {sorted(unknown)} are not in class_names {list(class_names)}")
        for group, names in (("old", [n for n in class_names if n in old]), ("new", [n for n in class_names if n not in old])):
            result[f"AP_{group}"] = _mean([per_class[n]["AP"] for n in names])
            result[f"AP50_{group}"] = _mean([per_class[n]["AP50"] for n in names])
    return result


class DetectionAccumulator:
    """Collects predictions and targets over an evaluation experience; ``result()`` is :func:`coco_map`.

    The loop's evaluation calls ``update(mb_output, mb_y)`` per minibatch (``Trainer(eval_accumulator=
    lambda s: DetectionAccumulator(class_names))``).
    """

    def __init__(self, class_names: Sequence[str], old_classes: Sequence[str] | None = None) -> None:
        self.class_names = list(class_names)
        self.old_classes = list(old_classes) if old_classes is not None else None
        self.targets: list[dict[str, torch.Tensor]] = []
        self.predictions: list[dict[str, torch.Tensor]] = []

    def update(self, output: Sequence[Mapping[str, torch.Tensor]], targets: Sequence[Mapping[str, torch.Tensor]]) -> None:
        for p, t in zip(output, targets):
            self.predictions.append({k: p[k].detach().cpu() for k in ("boxes", "scores", "labels")})
            self.targets.append({k: t[k].detach().cpu() for k in ("boxes", "labels")})

    def result(self) -> dict[str, Any]:
        return coco_map(self.targets, self.predictions, self.class_names, self.old_classes)


def ap_summary(result: Mapping[str, Any]) -> dict[str, float | None]:
    """The headline numbers of a :func:`coco_map` result (``AP``, ``AP50`` and old/new if present)."""
    keys = ("AP", "AP50", "AP_old", "AP50_old", "AP_new", "AP50_new")
    return {k: result[k] for k in keys if k in result}


def fmt_ap(value: float | None) -> str:
    return "  -  " if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:5.1f}"
