"""Pseudo labels for old classes from the frozen old model (METHODS.md section 3, step 3).

In an incremental step the training images carry ground truth for the new classes only; the old
classes' objects in them are unlabelled, so plain fine-tuning teaches the model that they are "no
object" (forgetting). The old model labels them instead. Each sub-step is a pure function of
tensors for one image, in the order of METHODS 3.3:

a. :func:`select_old_class_queries`: queries whose predicted class is an old class;
b. :func:`drop_masks_matching_ground_truth`: drop masks that match a ground-truth mask (IoU above
   a threshold, or, with ``claim="ioa"``, most of the mask inside one ground-truth segment): the
   ground truth already labels that object (often a new-class object the old model mistook for an
   old class): the ground truth *claims* the query;
c. :func:`remove_noise_pixels`: keep only pixels whose mask probability reaches the threshold;
d. :func:`resolve_contested_pixels`: a pixel in more than ``max_owners`` masks goes only to the mask
   with the highest confidence = class probability x mask probability at that pixel;
   :func:`remove_ground_truth_pixels`: ground-truth pixels always win over pseudo labels;
e. each pseudo mask keeps its query's class;
f. :func:`drop_shrunk_masks`: drop masks left empty or with less than ``min_keep_fraction`` of the
   pixels of the mask they came from (the output of c).

:func:`pseudo_label_stages` chains them and returns the candidates after every step (what
``benchmarks/panoptic_pseudo_labels.py`` measures); :func:`make_pseudo_labels` returns the last. METHODS leaves open where "ground truth wins" goes; by
default ground-truth pixels are removed before f, so a pseudo mask mostly covered by ground truth is
dropped rather than kept as a fragment (``ground_truth_before_shrink=False`` removes them after f).
Measured on the 3-2 step-1 images with the step-0 model (``benchmarks/panoptic_pseudo_labels.py``):
before f gives fewer, cleaner pseudo labels; after f recovers more old objects but labels many
fragments of new-class objects with old classes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import torch

from ..config import check


@dataclass
class PseudoLabelConfig:
    """Thresholds of the pseudo-label steps (defaults: METHODS 3.3 and Mask2Former's values)."""

    score_threshold: float = 0.0  # extra: minimum class probability of a selected query (0 = METHODS as written)
    mask_threshold: float = 0.5  # c: pixels below this mask probability are noise
    iou_threshold: float = 0.5  # b: an old mask with IoU above this with a ground-truth mask is dropped
    max_owners: int = 1  # d: a pixel may belong to at most this many pseudo masks
    min_keep_fraction: float = 0.8  # f: keep a mask when >= this fraction of its pixels survive
    ground_truth_before_shrink: bool = True  # ground-truth pixels removed before f (True) or after it
    claim: Literal["iou", "ioa"] = "iou"  # b: overlap measure of "the ground truth labels this object"

    def validate(self) -> None:
        for name in ("score_threshold", "mask_threshold", "iou_threshold", "min_keep_fraction"):
            value = getattr(self, name)
            check(0.0 <= value <= 1.0, f"strategy.pseudo.{name}", f"must be in [0, 1], got {value}")
        check(self.max_owners >= 1, "strategy.pseudo.max_owners", f"must be >= 1, got {self.max_owners}")
        check(self.claim in ("iou", "ioa"), "strategy.pseudo.claim", f"must be 'iou' or 'ioa', got {self.claim!r}")


def select_old_class_queries(class_probs: torch.Tensor, n_old_classes: int, score_threshold: float = 0.0
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """a. Queries whose most probable output is an old class (not "no object").

    ``class_probs`` (N, n_old_classes + 1), last column = no object (the old model's head). Returns
    (query indices, their classes, their class probabilities = confidence), all (M,).
    """
    scores, labels = class_probs.max(-1)
    keep = (labels < n_old_classes) & (scores >= score_threshold)
    index = torch.nonzero(keep).flatten()
    return index, labels[index], scores[index]


def mask_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(M, K) IoU between boolean masks ``a`` (M, H, W) and ``b`` (K, H, W); 0 when both are empty."""
    a = a.flatten(1).float()
    b = b.flatten(1).float()
    inter = a @ b.T
    union = a.sum(-1)[:, None] + b.sum(-1)[None, :] - inter
    return torch.where(union > 0, inter / union.clamp(min=1), torch.zeros_like(inter))


def mask_ioa(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(M, K) intersection over the area of ``a``: the fraction of mask m inside mask k (0 for empty m)."""
    a = a.flatten(1).float()
    inter = a @ b.flatten(1).float().T
    area = a.sum(-1)[:, None]
    return torch.where(area > 0, inter / area.clamp(min=1), torch.zeros_like(inter))


def drop_masks_matching_ground_truth(masks: torch.Tensor, gt_masks: torch.Tensor, iou_threshold: float,
                                     claim: str = "iou") -> torch.Tensor:
    """b. Boolean keep flag (M,): False for a mask a ground-truth mask claims: IoU above ``iou_threshold``
    (``claim="iou"``) or more than that fraction of the mask inside it (``claim="ioa"``: also catches a
    mask that covers only part of a new object, which IoU misses). ``masks`` (M, H, W), ``gt_masks``
    (K, H, W) boolean."""
    if masks.shape[0] == 0 or gt_masks.shape[0] == 0:
        return torch.ones(masks.shape[0], dtype=torch.bool, device=masks.device)
    overlap = mask_ioa if claim == "ioa" else mask_iou
    return ~(overlap(masks, gt_masks.to(masks.device)) > iou_threshold).any(-1)


def remove_noise_pixels(mask_probs: torch.Tensor, mask_threshold: float) -> torch.Tensor:
    """c. Modified masks: the pixels whose mask probability is >= ``mask_threshold`` (boolean)."""
    return mask_probs >= mask_threshold


def resolve_contested_pixels(masks: torch.Tensor, confidence: torch.Tensor, max_owners: int = 1) -> torch.Tensor:
    """d. Where a pixel is in more than ``max_owners`` masks, only the most confident mask keeps it.

    ``masks`` (M, H, W) boolean, ``confidence`` (M, H, W) = class probability x mask probability.
    Pixels in at most ``max_owners`` masks are left as they are.
    """
    if masks.shape[0] == 0:
        return masks
    owners = masks.sum(0)
    contested = owners > max_owners
    best = torch.where(masks, confidence, torch.full_like(confidence, -1.0)).argmax(0)
    winner = torch.arange(masks.shape[0], device=masks.device)[:, None, None] == best[None]
    return torch.where(contested[None], masks & winner, masks)


def remove_ground_truth_pixels(masks: torch.Tensor, gt_masks: torch.Tensor) -> torch.Tensor:
    """Ground truth wins: pseudo masks lose every pixel a ground-truth mask covers."""
    if gt_masks.shape[0] == 0 or masks.shape[0] == 0:
        return masks
    return masks & ~gt_masks.to(masks.device).any(0)[None]


def drop_shrunk_masks(masks: torch.Tensor, original: torch.Tensor, min_keep_fraction: float) -> torch.Tensor:
    """f. Boolean keep flag (M,): False for empty masks and for masks that kept less than
    ``min_keep_fraction`` of the pixels of ``original`` (the mask each came from)."""
    kept = masks.flatten(1).sum(-1).float()
    before = original.flatten(1).sum(-1).float()
    return (kept > 0) & (kept >= min_keep_fraction * before)


def merge_stuff_masks(labels: torch.Tensor, masks: torch.Tensor, stuff_classes: Sequence[int]
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Union of the pseudo masks of each stuff class into one (a panoptic target has one segment per
    stuff class); thing masks are kept as they are, in their order, stuff masks follow."""
    stuff = set(int(c) for c in stuff_classes)
    is_stuff = torch.tensor([int(c) in stuff for c in labels.tolist()], dtype=torch.bool)
    if not bool(is_stuff.any()):
        return labels, masks
    out_labels = [labels[~is_stuff]]
    out_masks = [masks[~is_stuff]]
    for c in sorted(set(labels[is_stuff].tolist())):
        same = labels == c
        out_labels.append(labels[same][:1])
        out_masks.append(masks[same].any(0, keepdim=True))
    return torch.cat(out_labels), torch.cat(out_masks)


Stage = tuple[torch.Tensor, torch.Tensor]  # (classes (P,), boolean masks (P, H, W))


def pseudo_label_stages(class_probs: torch.Tensor, mask_probs: torch.Tensor, gt_masks: torch.Tensor,
                        n_old_classes: int, config: PseudoLabelConfig | None = None,
                        stuff_classes: Sequence[int] = ()) -> dict[str, Stage]:
    """The candidate pseudo labels after each step for one image: ``"a"`` (old-class queries, masks
    thresholded as in c), ``"b"`` (minus those the ground truth claims), ``"d"`` (contested pixels
    resolved; ground-truth pixels removed unless ``ground_truth_before_shrink=False``), ``"f"`` (the
    pseudo labels: shrunk masks dropped, stuff masks merged).

    ``class_probs`` (N, n_old_classes + 1) and ``mask_probs`` (N, H, W) are the old model's
    prediction at the ground truth's size; ``gt_masks`` (K, H, W) the image's ground truth.
    """
    cfg = config or PseudoLabelConfig()
    h, w = mask_probs.shape[-2:]
    gt = gt_masks.bool()
    index, labels, scores = select_old_class_queries(class_probs, n_old_classes, cfg.score_threshold)  # a
    probs = mask_probs[index]
    masks = remove_noise_pixels(probs, cfg.mask_threshold)  # c (b's overlap needs it)
    stages: dict[str, Stage] = {"a": (labels, masks)}
    keep = drop_masks_matching_ground_truth(masks, gt, cfg.iou_threshold, cfg.claim) & masks.flatten(1).any(-1)  # b
    labels, scores, probs, masks = labels[keep], scores[keep], probs[keep], masks[keep]
    stages["b"] = (labels, masks)
    resolved = resolve_contested_pixels(masks, scores[:, None, None] * probs, cfg.max_owners)  # d
    if cfg.ground_truth_before_shrink:
        resolved = remove_ground_truth_pixels(resolved, gt)
    stages["d"] = (labels, resolved)
    keep = drop_shrunk_masks(resolved, masks, cfg.min_keep_fraction)  # f
    if not cfg.ground_truth_before_shrink:
        resolved = remove_ground_truth_pixels(resolved, gt)
        keep &= resolved.flatten(1).any(-1)
    if not bool(keep.any()):
        stages["f"] = (labels.new_zeros(0), torch.zeros(0, h, w, dtype=torch.bool, device=mask_probs.device))
    else:
        stages["f"] = merge_stuff_masks(labels[keep], resolved[keep], stuff_classes)  # e: masks keep their class
    return stages


def make_pseudo_labels(class_probs: torch.Tensor, mask_probs: torch.Tensor, gt_masks: torch.Tensor,
                       n_old_classes: int, config: PseudoLabelConfig | None = None,
                       stuff_classes: Sequence[int] = ()) -> Stage:
    """Pseudo labels (classes (P,), boolean masks (P, H, W)) for one image, steps a-f
    (:func:`pseudo_label_stages`); masks of one ``stuff_classes`` class are merged at the end."""
    return pseudo_label_stages(class_probs, mask_probs, gt_masks, n_old_classes, config, stuff_classes)["f"]
