"""A simulated person who verifies a detector's boxes from the ground truth, with configurable errors.

With ``error_rate = 0`` the person's file is the ground truth: every target object has its box (the
confident predictions that are right are confirmed, the missed objects are drawn, the false boxes are
rejected). With ``error_rate = e`` each ground-truth object independently, with probability ``e``,
suffers one error drawn uniformly from ``error_kinds``:

- ``miss``: the person overlooks the object (no box);
- ``jitter``: the person's box is sloppy: each side moves by up to ``jitter`` times the box's
  width / height (uniformly, kept inside the image and at least 1 pixel wide);
- ``label``: the person picks another class (uniform among the other categories of the file);

and each confident false prediction (no ground-truth box of its class with IoU >= ``iou``) is, with
probability ``e``, confirmed by mistake (``accept_false``: its box joins the person's boxes).

Draws come from a generator seeded with ``(seed, image_id)``, so an image's verification does not
depend on which other images are verified or in what order. The returned file says, in ``info``,
what was simulated and how many errors of each kind were made.
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
from torchvision.ops import box_iou

ERROR_KINDS = ("miss", "jitter", "label")


@dataclass
class SimulatedUser:
    """Settings of the simulated person (see the module docstring)."""

    error_rate: float = 0.0
    error_kinds: Sequence[str] = field(default_factory=lambda: list(ERROR_KINDS))
    jitter: float = 0.25
    accept_false: bool = True
    confidence: float = 0.5
    iou: float = 0.5
    seed: int = 0

    def validate(self) -> None:
        if not 0.0 <= self.error_rate <= 1.0:
            raise ValueError(f"simulated user error_rate must be in [0, 1], got {self.error_rate}")
        unknown = [k for k in self.error_kinds if k not in ERROR_KINDS]
        if unknown or not self.error_kinds:
            raise ValueError(f"simulated user error_kinds must be a non-empty subset of {list(ERROR_KINDS)}, got {list(self.error_kinds)}")
        if not 0.0 <= self.jitter <= 1.0:
            raise ValueError(f"simulated user jitter must be in [0, 1], got {self.jitter}")

    def verify(self, ground_truth: dict[str, Any], predictions: Sequence[dict[str, Any]] = ()) -> dict[str, Any]:
        """The person's COCO instances file for the images of ``ground_truth``.

        ``predictions`` (COCO results, category ids of ``ground_truth``) are needed only for the
        ``accept_false`` error.
        """
        return simulate_verification(ground_truth, predictions, self)


def _jitter_box(box: list[float], amount: float, width: float, height: float, rng: np.random.Generator) -> list[float]:
    x, y, w, h = box
    d = rng.uniform(-amount, amount, size=4) * np.array([w, h, w, h])
    x1, y1, x2, y2 = x + d[0], y + d[1], x + w + d[2], y + h + d[3]
    x1, x2 = float(np.clip(min(x1, x2), 0, width - 1)), float(np.clip(max(x1, x2), 0, width))
    y1, y2 = float(np.clip(min(y1, y2), 0, height - 1)), float(np.clip(max(y1, y2), 0, height))
    x2, y2 = max(x2, x1 + 1.0), max(y2, y1 + 1.0)
    return [x1, y1, x2 - x1, y2 - y1]


def simulate_verification(ground_truth: dict[str, Any], predictions: Sequence[dict[str, Any]],
                          user: SimulatedUser) -> dict[str, Any]:
    """See :class:`SimulatedUser`; returns a new COCO instances dict (the input is not modified)."""
    user.validate()
    cat_ids = [int(c["id"]) for c in ground_truth["categories"]]
    by_image_gt: dict[int, list[dict[str, Any]]] = {int(im["id"]): [] for im in ground_truth["images"]}
    for ann in ground_truth["annotations"]:
        by_image_gt.setdefault(int(ann["image_id"]), []).append(ann)
    by_image_pred: dict[int, list[dict[str, Any]]] = {}
    for det in predictions:
        if float(det["score"]) >= user.confidence:
            by_image_pred.setdefault(int(det["image_id"]), []).append(det)
    errors = {"miss": 0, "jitter": 0, "label": 0, "accept_false": 0}
    annotations: list[dict[str, Any]] = []
    for im in ground_truth["images"]:
        image_id = int(im["id"])
        rng = np.random.default_rng([int(user.seed), image_id])
        width, height = float(im.get("width") or 1e9), float(im.get("height") or 1e9)
        for ann in by_image_gt.get(image_id, []):
            if ann.get("iscrowd", 0):
                continue
            bbox, cat = list(map(float, ann["bbox"])), int(ann["category_id"])
            if rng.uniform() < user.error_rate:
                kind = str(user.error_kinds[int(rng.integers(0, len(user.error_kinds)))])
                if kind == "miss":
                    errors["miss"] += 1
                    continue
                if kind == "jitter":
                    bbox = _jitter_box(bbox, user.jitter, width, height, rng)
                    errors["jitter"] += 1
                elif kind == "label" and len(cat_ids) > 1:
                    others = [c for c in cat_ids if c != cat]
                    cat = others[int(rng.integers(0, len(others)))]
                    errors["label"] += 1
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": cat, "bbox": bbox,
                                "area": bbox[2] * bbox[3], "iscrowd": 0})
        if user.accept_false and user.error_rate > 0:
            preds = by_image_pred.get(image_id, [])
            gts = by_image_gt.get(image_id, [])
            for det in preds:
                if _is_false(det, gts, user.iou) and rng.uniform() < user.error_rate:
                    bbox = list(map(float, det["bbox"]))
                    annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": int(det["category_id"]),
                                        "bbox": bbox, "area": bbox[2] * bbox[3], "iscrowd": 0})
                    errors["accept_false"] += 1
    info = dict(ground_truth.get("info", {}))
    info["simulated_user"] = {**asdict(user), "error_kinds": list(user.error_kinds), "errors": errors}
    return {
        "info": info,
        "images": copy.deepcopy(ground_truth["images"]),
        "annotations": annotations,
        "categories": copy.deepcopy(ground_truth["categories"]),
    }


def _is_false(det: dict[str, Any], gts: Sequence[dict[str, Any]], iou: float) -> bool:
    """A prediction with no ground-truth box of its class at IoU >= ``iou``."""
    same = [g for g in gts if int(g["category_id"]) == int(det["category_id"]) and not g.get("iscrowd", 0)]
    if not same:
        return True
    def xyxy(b: Sequence[float]) -> list[float]:
        return [b[0], b[1], b[0] + b[2], b[1] + b[3]]
    ious = box_iou(torch.tensor([xyxy(det["bbox"])]), torch.tensor([xyxy(g["bbox"]) for g in same]))
    return bool(ious.max() < iou)
