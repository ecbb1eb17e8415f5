"""Step A of METHODS section 2: training samples from a person's verification of the model's boxes.

The deployed detector predicts on transfer-scene images; its boxes with a score at or above the
confidence threshold are "its predictions". A person checks them and leaves, per image, the boxes of
the target objects (confirmed or drawn). Each image is put in one category by matching the confident
predictions one-to-one to the person's boxes (same class, IoU >= ``iou``; Hungarian matching with
scipy, so the number of matches is the largest possible):

- ``false_detection``: a confident prediction matches no box of the person (the model called
  something else a target). Annotation: the person's boxes only, so the falsely detected region is
  trained as background (a hard negative). Takes precedence over ``missed``: the annotation is the
  same, and the image's distinctive lesson is the negative.
- ``missed``: every prediction matched but a box of the person did not (the person drew it).
  Annotation: the person's boxes.
- ``correct``: everything matched. Annotation: for each box of the person, the model is run again and
  its boxes of that class *below* the confidence threshold whose IoU with the person's box exceeds
  ``candidate_iou`` are kept; the highest-scoring one becomes the annotation (the model's own box for
  the object, so training raises its confidence). NMS is off for that run, or the confident box would
  have suppressed exactly these candidates. When no such box exists the person's box is used and
  counted as ``user_box_fallback``.

Everything not used is counted, never dropped silently: predictions for images the person did not
verify, boxes clipped at the image border. Unknown image ids in the person's file, boxes outside their
image, predictions of classes the model does not have, and (by default) boxes of categories the model
does not know are errors naming the file, the entry and the value.

CLI: ``incremental feedback --model MODEL --images DIR --predictions PRED.json --verified USER.json
--out TRAIN.json`` writes a COCO instances file to train on (with a ``feedback`` section: category
per image, counts, thresholds) and ``TRAIN.counts.json``, and prints the counts.
"""
from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torchvision.ops import box_iou

from ..io import write_json
from .coco import CocoFormatError, check_instances, check_results, image_size_of, load_json, xywh_to_xyxy_checked

CATEGORIES = ("correct", "missed", "false_detection")

#: (image_id) -> (boxes (N, 4) xyxy, scores (N,), labels (N,)) of every box the model gives above a
#: minimal score, without NMS (see :func:`incremental.detection.model.all_candidate_boxes`).
CandidateFn = Callable[[int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


@dataclass
class FeedbackThresholds:
    """Thresholds of step A (all configurable from the CLI and configs)."""

    confidence: float = 0.5  # a box with score >= this is one of the model's predictions
    iou: float = 0.5  # prediction <-> person's box match
    candidate_iou: float = 0.5  # correct images: below-threshold box must overlap the person's box by more
    min_candidate_score: float = 0.001  # lowest score kept when the model is run again

    def validate(self) -> None:
        for name in ("confidence", "iou", "candidate_iou"):
            value = getattr(self, name)
            if not 0.0 < value <= 1.0:
                raise ValueError(f"feedback threshold {name} must be in (0, 1], got {value}")
        if not 0.0 <= self.min_candidate_score < self.confidence:
            raise ValueError(f"min_candidate_score must be in [0, confidence), got {self.min_candidate_score}")


# --------------------------------------------------------------------------- pure functions
def match_boxes(pred_boxes: torch.Tensor, pred_labels: torch.Tensor, user_boxes: torch.Tensor,
                user_labels: torch.Tensor, iou_threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One-to-one matching of predictions to the person's boxes: same label and IoU >= threshold.

    Returns boolean masks ``(pred_matched (P,), user_matched (U,))``. Solved as an assignment problem
    (scipy's Hungarian algorithm) with cost ``1 - IoU`` for admissible pairs and a cost larger than any
    sum of admissible costs for the others, so the number of matches is maximal first and the total
    IoU second; a greedy pass by score can leave a box unmatched that an optimal assignment matches.
    """
    from scipy.optimize import linear_sum_assignment

    pred_matched = torch.zeros(len(pred_boxes), dtype=torch.bool)
    user_matched = torch.zeros(len(user_boxes), dtype=torch.bool)
    if len(pred_boxes) == 0 or len(user_boxes) == 0:
        return pred_matched, user_matched
    iou = box_iou(pred_boxes.float(), user_boxes.float())
    ok = (iou >= iou_threshold) & (pred_labels[:, None] == user_labels[None, :])
    big = float(min(len(pred_boxes), len(user_boxes)) + 1)
    cost = torch.where(ok, 1.0 - iou, torch.full_like(iou, big)).numpy()
    rows, cols = linear_sum_assignment(cost)
    for r, c in zip(rows.tolist(), cols.tolist()):
        if bool(ok[r, c]):
            pred_matched[r] = True
            user_matched[c] = True
    return pred_matched, user_matched


def categorize(pred_matched: torch.Tensor, user_matched: torch.Tensor) -> str:
    """Image category from the matching: an unmatched confident prediction is a false detection, an
    unmatched box of the person (with every prediction matched) a miss, else correct."""
    if bool((~pred_matched).any()):
        return "false_detection"
    if bool((~user_matched).any()):
        return "missed"
    return "correct"


def correct_image_annotation(
    user_boxes: torch.Tensor,
    user_labels: torch.Tensor,
    cand_boxes: torch.Tensor,
    cand_scores: torch.Tensor,
    cand_labels: torch.Tensor,
    confidence: float,
    candidate_iou: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Annotations of a correct image (METHODS 2, step A): per box of the person, the model's
    highest-scoring box of the same class with score < ``confidence`` and IoU > ``candidate_iou``
    with it; the person's box where there is none.

    Returns ``(boxes (U, 4), labels (U,), from_model (U,) bool)``; labels are the person's.
    """
    boxes = user_boxes.clone().float()
    from_model = torch.zeros(len(user_boxes), dtype=torch.bool)
    if len(user_boxes) == 0 or len(cand_boxes) == 0:
        return boxes, user_labels.clone(), from_model
    below = cand_scores < confidence
    iou = box_iou(cand_boxes.float(), user_boxes.float())  # (C, U)
    ok = below[:, None] & (iou > candidate_iou) & (cand_labels[:, None] == user_labels[None, :])
    scores = torch.where(ok, cand_scores[:, None].float().expand_as(iou), torch.full_like(iou, -1.0))
    best_score, best = scores.max(dim=0)
    has = best_score >= 0
    boxes[has] = cand_boxes[best[has]].float()
    from_model[has] = True
    return boxes, user_labels.clone(), from_model


# --------------------------------------------------------------------------- reading the two files
@dataclass
class ImageFeedback:
    """One verified image: the person's boxes and the model's confident predictions (labels are the
    model's contiguous labels, 1-based)."""

    image_id: int
    entry: dict[str, Any]
    user_boxes: torch.Tensor
    user_labels: torch.Tensor
    pred_boxes: torch.Tensor
    pred_scores: torch.Tensor
    pred_labels: torch.Tensor


def _counter(counts: dict[str, int], key: str, n: int = 1) -> None:
    counts[key] = counts.get(key, 0) + n


def read_verified(verified: dict[str, Any], class_names: Sequence[str], source: str, counts: dict[str, int],
                  unknown_categories: str = "error", image_sizes: Callable[[dict[str, Any]], tuple[int, int]] | None = None,
                  ) -> tuple[dict[int, dict[str, Any]], dict[int, list[tuple[list[float], int]]], list[str]]:
    """The person's file: images by id, their boxes as ``(xyxy, label)``, and the class names (the
    model's, plus new ones when ``unknown_categories == "keep"``)."""
    check_instances(verified, source)
    names = list(class_names)
    label_of_cat: dict[int, int] = {}
    for cat in sorted(verified["categories"], key=lambda c: c["id"]):
        if cat["name"] in names:
            label_of_cat[int(cat["id"])] = names.index(cat["name"]) + 1
        elif unknown_categories == "keep":
            names.append(str(cat["name"]))
            label_of_cat[int(cat["id"])] = len(names)
        elif unknown_categories == "error":
            raise CocoFormatError(
                f"{source}: category {cat['name']!r} (id {cat['id']}) is not one of the model's classes {list(class_names)}; "
                "use --unknown-categories skip to leave its boxes out or keep to add it as a new class"
            )
    images: dict[int, dict[str, Any]] = {}
    for im in verified["images"]:
        entry = dict(im)
        if entry.get("width") is None or entry.get("height") is None:
            if image_sizes is None:
                raise CocoFormatError(f"{source}: image id {im['id']} has no width/height and no image directory was given")
            entry["width"], entry["height"] = image_sizes(entry)
        images[int(im["id"])] = entry
    boxes: dict[int, list[tuple[list[float], int]]] = {i: [] for i in images}
    cat_ids = {int(c["id"]) for c in verified["categories"]}
    for ann in verified["annotations"]:
        where = f"{source}: annotation id {ann['id']}"
        image_id = ann.get("image_id")
        if image_id not in images:
            raise CocoFormatError(f"{where}: image_id {image_id!r} is not in 'images'")
        if ann.get("category_id") not in cat_ids:
            raise CocoFormatError(f"{where}: category_id {ann.get('category_id')!r} is not in 'categories'")
        if int(ann["category_id"]) not in label_of_cat:
            _counter(counts, "skipped_user_boxes_unknown_category")
            continue
        entry = images[int(image_id)]
        box = xywh_to_xyxy_checked(ann.get("bbox"), entry["width"], entry["height"], where, counts)
        boxes[int(image_id)].append((box, label_of_cat[int(ann["category_id"])]))
    return images, boxes, names


def read_predictions(predictions: Any, images: Mapping[int, dict[str, Any]], model_category_ids: Sequence[int],
                     source: str, counts: dict[str, int]) -> dict[int, list[tuple[list[float], float, int]]]:
    """COCO results (``[{image_id, category_id, bbox, score}]``, category ids of the model) by image.

    Predictions for images the person did not verify are skipped and counted; a category the model
    does not have is an error (the file was not written by this model).
    """
    if not isinstance(predictions, list):
        raise CocoFormatError(f"{source}: predictions must be a list in the COCO results format, got {type(predictions).__name__}")
    label_of = {int(c): i + 1 for i, c in enumerate(model_category_ids)}
    out: dict[int, list[tuple[list[float], float, int]]] = {i: [] for i in images}
    for k, det in enumerate(predictions):
        where = f"{source}: prediction [{k}]"
        if not isinstance(det, dict) or not {"image_id", "category_id", "bbox", "score"} <= set(det):
            raise CocoFormatError(f"{where}: needs image_id, category_id, bbox and score, got {det!r}")
        if not isinstance(det["score"], (int, float)) or isinstance(det["score"], bool):
            raise CocoFormatError(f"{where}: score must be a number, got {det['score']!r}")
        if det["category_id"] not in label_of:
            raise CocoFormatError(f"{where}: category_id {det['category_id']!r} is not one of the model's categories "
                                  f"{sorted(label_of)}")
        if det["image_id"] not in images:
            _counter(counts, "skipped_predictions_unverified_image")
            continue
        entry = images[int(det["image_id"])]
        box = xywh_to_xyxy_checked(det["bbox"], entry["width"], entry["height"], where, counts)
        out[int(det["image_id"])].append((box, float(det["score"]), label_of[int(det["category_id"])]))
    return out


def _as_tensors(items: list[tuple[list[float], int]]) -> tuple[torch.Tensor, torch.Tensor]:
    if not items:
        return torch.zeros((0, 4)), torch.zeros(0, dtype=torch.long)
    return torch.tensor([b for b, _ in items], dtype=torch.float32), torch.tensor([l for _, l in items], dtype=torch.long)


# --------------------------------------------------------------------------- step A
def build_training_set(
    verified: dict[str, Any],
    predictions: Any,
    class_names: Sequence[str],
    candidates: CandidateFn | None,
    thresholds: FeedbackThresholds | None = None,
    *,
    model_category_ids: Sequence[int] | None = None,
    unknown_categories: str = "error",
    image_sizes: Callable[[dict[str, Any]], tuple[int, int]] | None = None,
    sources: tuple[str, str] = ("<verified>", "<predictions>"),
    correct_rule: str = "model_box",
) -> dict[str, Any]:
    """Step A on in-memory files: returns the training COCO dict with a ``feedback`` section.

    ``candidates(image_id)`` runs the model again (needed only for correct images; ``None`` makes a
    correct image an error). ``model_category_ids[i]`` is the COCO id of the model's class i + 1
    (default 1..C); the output uses these ids, and new classes (``unknown_categories="keep"``) get the
    next free ids. ``correct_rule="user_box"`` trains correct images on the person's boxes instead
    of the model's below-threshold boxes (an ablation of the METHODS rule).
    """
    th = thresholds or FeedbackThresholds()
    th.validate()
    if correct_rule not in ("model_box", "user_box"):
        raise ValueError(f"correct_rule must be model_box or user_box, got {correct_rule!r}")
    if unknown_categories not in ("error", "skip", "keep"):
        raise ValueError(f"unknown_categories must be error, skip or keep, got {unknown_categories!r}")
    model_ids = list(model_category_ids) if model_category_ids is not None else list(range(1, len(class_names) + 1))
    if len(model_ids) != len(class_names):
        raise ValueError(f"{len(model_ids)} category ids for {len(class_names)} classes")
    counts: dict[str, int] = {c: 0 for c in CATEGORIES}
    counts.update(annotations_model_box=0, annotations_user_box=0, user_box_fallback=0)
    images, user, names = read_verified(verified, class_names, sources[0], counts, unknown_categories, image_sizes)
    preds = read_predictions(predictions, images, model_ids, sources[1], counts)
    out_ids = model_ids + [max(model_ids + [0]) + 1 + k for k in range(len(names) - len(class_names))]

    annotations: list[dict[str, Any]] = []
    per_image: list[dict[str, Any]] = []
    for image_id, entry in images.items():
        ub, ul = _as_tensors(user[image_id])
        confident = [p for p in preds[image_id] if p[1] >= th.confidence]
        pb, pl = _as_tensors([(b, l) for b, _, l in confident])
        pred_matched, user_matched = match_boxes(pb, pl, ub, ul, th.iou)
        category = categorize(pred_matched, user_matched)
        counts[category] += 1
        from_model = torch.zeros(len(ub), dtype=torch.bool)
        boxes, labels = ub, ul
        if category == "correct" and len(ub) and correct_rule == "model_box":
            if candidates is None:
                raise ValueError(f"image {image_id} is correct: its annotation needs the model's below-threshold boxes "
                                 "(give the model)")
            cb, cs, cl = candidates(image_id)
            boxes, labels, from_model = correct_image_annotation(ub, ul, cb, cs, cl, th.confidence, th.candidate_iou)
            _counter(counts, "user_box_fallback", int((~from_model).sum()))
        _counter(counts, "annotations_model_box", int(from_model.sum()))
        _counter(counts, "annotations_user_box", int((~from_model).sum()))
        for box, label, mine in zip(boxes.tolist(), labels.tolist(), from_model.tolist()):
            x1, y1, x2, y2 = box
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": out_ids[int(label) - 1],
                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": 0,
                "source": "model_below_threshold" if mine else "user",
            })
        per_image.append({"image_id": image_id, "category": category, "confident_predictions": len(pb),
                          "user_boxes": len(ub), "matched": int(user_matched.sum()), "false_boxes": int((~pred_matched).sum()),
                          "missed_boxes": int((~user_matched).sum())})
    counts["images"] = len(images)
    return {
        "info": {"description": "training annotations from user feedback (incremental feedback, METHODS 2 step A)"},
        "images": list(images.values()),
        "annotations": annotations,
        "categories": [{"id": cid, "name": n} for cid, n in zip(out_ids, names)],
        "feedback": {"counts": counts, "thresholds": asdict(th), "correct_rule": correct_rule,
                     "unknown_categories": unknown_categories,
                     "new_classes": names[len(class_names):], "per_image": per_image},
    }


def format_counts(counts: Mapping[str, int]) -> str:
    """A small table: the three categories first, then annotation sources and skips."""
    total = max(int(counts.get("images", 0)), 1)
    lines = [f"{'category':<40}{'images':>8}{'share':>8}"]
    for c in CATEGORIES:
        lines.append(f"{c:<40}{counts.get(c, 0):>8}{counts.get(c, 0) / total:>8.0%}")
    lines.append(f"{'images':<40}{counts.get('images', 0):>8}")
    for key in sorted(k for k in counts if k not in CATEGORIES and k != "images"):
        lines.append(f"{key:<40}{counts[key]:>8}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- model side
def model_candidates(model: torch.nn.Module, image_loader: Callable[[int], torch.Tensor],
                     min_score: float = 0.001) -> CandidateFn:
    """A :data:`CandidateFn` that runs ``model`` (eval mode, NMS off) on the image of an id."""
    from .model import all_candidate_boxes, predict

    def run(image_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        with all_candidate_boxes(model, min_score=min_score):
            (p,) = predict(model, [image_loader(image_id)])
        return p["boxes"], p["scores"], p["labels"]

    return run


def predictions_to_results(predictions: Sequence[Mapping[str, torch.Tensor]], image_ids: Sequence[int],
                           category_ids: Sequence[int], min_score: float = 0.0) -> list[dict[str, Any]]:
    """torchvision predictions as COCO results (``bbox`` ``[x, y, w, h]``, the model's category ids)."""
    out: list[dict[str, Any]] = []
    for image_id, p in zip(image_ids, predictions):
        for box, score, label in zip(p["boxes"].tolist(), p["scores"].tolist(), p["labels"].tolist()):
            if score < min_score:
                continue
            x1, y1, x2, y2 = box
            out.append({"image_id": int(image_id), "category_id": int(category_ids[int(label) - 1]),
                        "bbox": [x1, y1, x2 - x1, y2 - y1], "score": float(score)})
    return out


# --------------------------------------------------------------------------- CLI
def add_parser(subparsers: Any) -> None:
    """Register ``incremental feedback`` (called by :func:`incremental.cli.build_parser`)."""
    d = FeedbackThresholds()
    p = subparsers.add_parser(
        "feedback",
        help="turn a person's verification of a detector's boxes into training annotations (METHODS 2 step A)",
        description="Categorise each verified image correct / missed / false detection and write the training "
                    "annotations METHODS section 2 step A prescribes, as a COCO instances file.",
    )
    p.add_argument("--model", required=True, help="detector model package (incremental package file)")
    p.add_argument("--images", required=True, help="directory of the images (file_name of the verified file)")
    p.add_argument("--predictions", required=True, help="the model's predictions, COCO results JSON")
    p.add_argument("--verified", required=True, help="the person's boxes, COCO instances JSON")
    p.add_argument("--out", required=True, help="training annotations to write (COCO instances JSON)")
    p.add_argument("--confidence", type=float, default=d.confidence, help=f"score threshold of a prediction (default {d.confidence})")
    p.add_argument("--iou", type=float, default=d.iou, help=f"IoU to match a prediction to a person's box (default {d.iou})")
    p.add_argument("--candidate-iou", type=float, default=d.candidate_iou,
                   help=f"correct images: IoU a below-threshold box needs with the person's box (default {d.candidate_iou})")
    p.add_argument("--min-candidate-score", type=float, default=d.min_candidate_score,
                   help=f"lowest score kept when the model runs again (default {d.min_candidate_score})")
    p.add_argument("--unknown-categories", choices=("error", "skip", "keep"), default="error",
                   help="boxes of categories the model does not know: error (default), skip (counted) or keep as new classes")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    p.set_defaults(handler=cmd_feedback, output_arg="out")  # one writer per --out (incremental.locking)


def cmd_feedback(args: argparse.Namespace) -> int:
    from ..cli import UsageError
    from .coco import read_image
    from .packaging import load_detector

    out = Path(args.out)
    if out.exists() and not args.force:
        raise UsageError(f"{out} exists; use --force to overwrite")
    images_dir = Path(args.images)
    if not images_dir.is_dir():
        raise UsageError(f"--images {images_dir} is not a directory")
    th = FeedbackThresholds(args.confidence, args.iou, args.candidate_iou, args.min_candidate_score)
    try:
        th.validate()
        model, info = load_detector(args.model)
        verified = load_json(args.verified)
        predictions = load_json(args.predictions)
        check_instances(verified, str(args.verified))
        check_results(predictions, str(args.predictions))
        files = {int(im["id"]): images_dir / str(im.get("file_name", "")) for im in verified["images"]}
        for image_id, path in files.items():
            if not path.is_file():
                raise UsageError(f"{args.verified}: image id {image_id}: {path} does not exist")
        candidates = model_candidates(model, lambda i: read_image(files[i]).float().div(255.0), th.min_candidate_score)
        result = build_training_set(
            verified, predictions, info["class_names"], candidates, th,
            model_category_ids=info.get("category_ids"), unknown_categories=args.unknown_categories,
            image_sizes=lambda entry: image_size_of(images_dir / str(entry.get("file_name", ""))),
            sources=(str(args.verified), str(args.predictions)),
        )
    except (CocoFormatError, ValueError) as exc:
        raise UsageError(str(exc)) from None
    write_json(out, result)
    counts_path = out.with_name(out.stem + ".counts.json")
    write_json(counts_path, result["feedback"]["counts"])
    print(format_counts(result["feedback"]["counts"]))
    print(f"wrote {out} ({len(result['annotations'])} annotations on {len(result['images'])} images) and {counts_path}")
    return 0
