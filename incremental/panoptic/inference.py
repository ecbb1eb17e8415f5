"""Standard Mask2Former panoptic inference: queries -> one non-overlapping segment map per image.

1. keep queries whose most likely output is a real class with probability > ``object_threshold``;
2. every pixel goes to the kept query with the highest ``score x mask probability``;
3. a query's segment is the pixels it owns where its own mask probability is >= ``mask_threshold``,
   kept only if it owns at least ``overlap_threshold`` times the area of its original (>= 0.5) mask,
   so a segment mostly covered by others is dropped rather than reported as a fragment;
4. the segments of one stuff class are merged into one.
Pixels no kept segment owns are left unassigned (segment id 0).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Collection

import torch

from .criterion import upsample_masks


@dataclass
class PanopticPrediction:
    """One image: ``segment_map`` (H, W) long (0 = unassigned) and ``segments``: list of
    ``{"id", "label", "isthing", "score"}``."""

    segment_map: torch.Tensor
    segments: list[dict[str, Any]]

    def category_instance_map(self, unassigned: tuple[int, int] = (-1, 0)) -> torch.Tensor:
        """(H, W, 2) long ``(class, instance)`` per pixel, ``unassigned`` where no segment is."""
        out = torch.empty(*self.segment_map.shape, 2, dtype=torch.long)
        out[..., 0] = unassigned[0]
        out[..., 1] = unassigned[1]
        for seg in self.segments:
            where = self.segment_map == seg["id"]
            out[where, 0] = seg["label"]
            out[where, 1] = seg["id"] if seg["isthing"] else 0
        return out


@torch.no_grad()
def panoptic_from_queries(logits: torch.Tensor, mask_logits: torch.Tensor, thing_classes: Collection[int],
                          object_threshold: float = 0.5, overlap_threshold: float = 0.8,
                          mask_threshold: float = 0.5) -> PanopticPrediction:
    """One image: ``logits`` (N, C+1), ``mask_logits`` (N, H, W) already at the output size."""
    probs = logits.softmax(-1)
    n_classes = probs.shape[-1] - 1
    scores, labels = probs.max(-1)
    keep = (labels != n_classes) & (scores > object_threshold)
    height, width = mask_logits.shape[-2:]
    segment_map = torch.zeros(height, width, dtype=torch.long)
    segments: list[dict[str, Any]] = []
    if not bool(keep.any()):
        return PanopticPrediction(segment_map, segments)
    scores, labels = scores[keep], labels[keep]
    mask_probs = mask_logits[keep].sigmoid()
    owner = (scores[:, None, None] * mask_probs).argmax(0)
    stuff_segment: dict[int, int] = {}
    things = set(int(c) for c in thing_classes)
    for k in range(len(scores)):
        label = int(labels[k])
        original = mask_probs[k] >= 0.5
        owned = owner == k
        mine = owned & (mask_probs[k] >= mask_threshold)
        area, original_area = int(owned.sum()), int(original.sum())
        if area == 0 or original_area == 0 or not bool(mine.any()) or area / original_area < overlap_threshold:
            continue
        isthing = label in things
        if not isthing and label in stuff_segment:
            segment_map[mine] = stuff_segment[label]
            continue
        segment_id = len(segments) + 1
        segment_map[mine] = segment_id
        segments.append({"id": segment_id, "label": label, "isthing": isthing, "score": float(scores[k])})
        if not isthing:
            stuff_segment[label] = segment_id
    return PanopticPrediction(segment_map, segments)


def panoptic_inference(outputs: dict[str, Any], image_size: tuple[int, int], thing_classes: Collection[int],
                       object_threshold: float = 0.5, overlap_threshold: float = 0.8,
                       mask_threshold: float = 0.5) -> list[PanopticPrediction]:
    """Panoptic predictions for a batch of model outputs (masks upsampled to ``image_size``)."""
    masks = upsample_masks(outputs["pred_masks"].detach(), image_size)
    return [panoptic_from_queries(outputs["pred_logits"][b].detach(), masks[b], thing_classes,
                                  object_threshold, overlap_threshold, mask_threshold)
            for b in range(masks.shape[0])]
