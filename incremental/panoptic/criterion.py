"""Set criterion of Mask2Former: Hungarian matching, then class + BCE + dice losses.

For every decoder stage (deep supervision) and image, queries are matched one-to-one to the target
segments (ground truth, plus pseudo labels when the plugin added them). Matched queries learn the
target's class and mask; unmatched queries learn "no object", down-weighted by
``no_object_weight`` (0.1) because most queries are unmatched and would otherwise teach the model to
predict nothing. Mask losses are summed over matches and divided by the number of target segments
in the batch.

Targets of an incremental update may say where "no object" is not known to be right (the plugin of
``strategies/pseudo_label_distillation.py`` sets them; a target without them is trained as usual):
``"unlabelled_classes"`` (int K): the image may hold unlabelled objects of classes 0..K-1, so an
unmatched query is right with no object *or* any of them (the unbiased cross-entropy of MiB and
CoMFormer); ``"skip_queries"`` ((N,) bool): unmatched queries left out of the class loss.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F

from .matcher import hungarian_match


def class_weights(n_classes: int, no_object_weight: float, device: torch.device | None = None) -> torch.Tensor:
    """Cross-entropy class weights: 1 for every class, ``no_object_weight`` for the last output."""
    weights = torch.ones(n_classes + 1, device=device)
    weights[-1] = no_object_weight
    return weights


def sigmoid_bce_loss(mask_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(M,) mean per-pixel binary cross-entropy of each mask; inputs (M, P)."""
    return F.binary_cross_entropy_with_logits(mask_logits, targets, reduction="none").mean(-1)


def dice_loss(mask_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(M,) ``1 - (2 |p t| + 1) / (|p| + |t| + 1)`` per mask with p = sigmoid(logits); inputs (M, P)."""
    probs = mask_logits.sigmoid()
    return 1 - (2 * (probs * targets).sum(-1) + 1) / (probs.sum(-1) + targets.sum(-1) + 1)


def upsample_masks(mask_logits: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Mask logits (..., h, w) -> (..., H, W) bilinearly (predictions live at stride 4)."""
    if tuple(mask_logits.shape[-2:]) == tuple(size):
        return mask_logits
    lead = mask_logits.shape[:-2]
    flat = mask_logits.reshape(-1, 1, *mask_logits.shape[-2:])
    return F.interpolate(flat, size=tuple(size), mode="bilinear", align_corners=False).reshape(*lead, *size)


def downsample_targets(targets: list[dict[str, Any]], size: Sequence[int]) -> list[torch.Tensor]:
    """Target masks (K, H, W) -> (K, h, w) soft masks (fraction of each cell covered), for matching."""
    out = []
    for t in targets:
        masks = t["masks"].float()
        if tuple(masks.shape[-2:]) != tuple(size) and masks.shape[0]:
            masks = F.adaptive_avg_pool2d(masks[:, None], tuple(size))[:, 0]
        elif masks.shape[0] == 0:
            masks = masks.new_zeros(0, *size)
        out.append(masks)
    return out


def query_class_loss(logits: torch.Tensor, target_classes: torch.Tensor, weights: torch.Tensor,
                     unmatched: torch.Tensor | None = None, unlabelled_classes: torch.Tensor | None = None,
                     skip: torch.Tensor | None = None) -> torch.Tensor:
    """Weighted cross-entropy over queries, ``sum_q w_q l_q / sum_q w_q`` with ``w_q = weights[target_q]``
    (``F.cross_entropy``'s weighted mean), where for an ``unmatched`` query (target = no object) of image
    b the loss is ``-log(p(no object) + sum_{c < unlabelled_classes[b]} p(c))`` and a ``skip`` query
    has weight 0.

    ``logits`` (B, N, C+1), ``target_classes`` (B, N), ``weights`` (C+1,), ``unmatched`` and ``skip``
    (B, N) bool, ``unlabelled_classes`` (B,) long (0: plain cross-entropy for that image).
    """
    log_p = logits.float().log_softmax(-1)
    nll = -log_p.gather(-1, target_classes[..., None])[..., 0]
    w = weights[target_classes]
    if unmatched is not None and unlabelled_classes is not None and bool((unlabelled_classes > 0).any()):
        n_classes = logits.shape[-1] - 1
        column = torch.arange(n_classes + 1, device=logits.device)
        allowed = (column[None, :] < unlabelled_classes[:, None]) | (column[None, :] == n_classes)  # (B, C+1)
        log_either = torch.logsumexp(log_p.masked_fill(~allowed[:, None, :], float("-inf")), -1)
        nll = torch.where(unmatched & (unlabelled_classes[:, None] > 0), -log_either, nll)
    if skip is not None and unmatched is not None:
        w = w * ~(skip & unmatched)
    total = w.sum()
    if float(total) <= 0.0:
        return (nll * 0.0).sum()
    return (w * nll).sum() / total


class SetCriterion:
    """``criterion(outputs, targets) -> loss``: the loop's criterion for the panoptic model.

    ``targets`` is a list of dicts with ``labels`` (K,) and ``masks`` (K, H, W). ``last_losses``
    keeps the parts of the last call (floats) for logging.
    """

    def __init__(self, no_object_weight: float = 0.1, weight_class: float = 2.0, weight_bce: float = 5.0,
                 weight_dice: float = 5.0, deep_supervision: bool = True) -> None:
        self.no_object_weight = no_object_weight
        self.weight_class = weight_class
        self.weight_bce = weight_bce
        self.weight_dice = weight_dice
        self.deep_supervision = deep_supervision
        self.last_losses: dict[str, float] = {}

    def match(self, logits: torch.Tensor, masks: torch.Tensor, small_targets: list[torch.Tensor],
              targets: list[dict[str, Any]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per image (query indices, target indices), at the predictions' resolution."""
        return [hungarian_match(logits[b], masks[b], t["labels"], small_targets[b],
                                self.weight_class, self.weight_bce, self.weight_dice)
                for b, t in enumerate(targets)]

    def stage_loss(self, logits: torch.Tensor, mask_logits: torch.Tensor, targets: list[dict[str, Any]],
                   small_targets: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Losses of one decoder stage. Matching runs at the prediction resolution (stride 4) against
        area-downsampled targets; the mask losses of the matched pairs run at the targets' full
        resolution (only the matched masks are upsampled, which keeps the cost low)."""
        n_classes = logits.shape[-1] - 1
        matches = self.match(logits.detach(), mask_logits.detach(), small_targets, targets)
        target_classes = torch.full(logits.shape[:2], n_classes, dtype=torch.long, device=logits.device)
        src_masks, tgt_masks = [], []
        for b, (qi, ti) in enumerate(matches):
            if len(qi) == 0:
                continue
            qi, ti = qi.to(logits.device), ti.to(logits.device)
            target_classes[b, qi] = targets[b]["labels"][ti]
            src_masks.append(mask_logits[b, qi])
            tgt_masks.append(targets[b]["masks"][ti])
        weights = class_weights(n_classes, self.no_object_weight, logits.device)
        if any("unlabelled_classes" in t or "skip_queries" in t for t in targets):
            unmatched = target_classes == n_classes
            unlabelled = torch.tensor([int(t.get("unlabelled_classes", 0)) for t in targets], device=logits.device)
            skip = torch.stack([t["skip_queries"].to(logits.device) if "skip_queries" in t
                                else torch.zeros(logits.shape[1], dtype=torch.bool, device=logits.device)
                                for t in targets])
            loss_class = query_class_loss(logits, target_classes, weights, unmatched, unlabelled, skip)
        else:
            loss_class = F.cross_entropy(logits.transpose(1, 2), target_classes, weights)
        n_targets = max(sum(len(t["labels"]) for t in targets), 1)
        if src_masks:
            tgt = torch.cat(tgt_masks)
            src = upsample_masks(torch.cat(src_masks), tgt.shape[-2:]).flatten(1)
            tgt = tgt.flatten(1).to(src.dtype)
            loss_bce = sigmoid_bce_loss(src, tgt).sum() / n_targets
            loss_dice = dice_loss(src, tgt).sum() / n_targets
        else:
            loss_bce = loss_dice = mask_logits.sum() * 0.0
        return {"class": loss_class, "bce": loss_bce, "dice": loss_dice}

    def __call__(self, outputs: dict[str, Any], targets: list[dict[str, Any]]) -> torch.Tensor:
        stages = [outputs]
        if self.deep_supervision:
            stages = [*outputs.get("aux_outputs", []), outputs]
        total = outputs["pred_logits"].new_zeros(())
        parts = {"class": 0.0, "bce": 0.0, "dice": 0.0}
        small = downsample_targets(targets, outputs["pred_masks"].shape[-2:])
        for stage in stages:
            losses = self.stage_loss(stage["pred_logits"], stage["pred_masks"], targets, small)
            total = total + (self.weight_class * losses["class"] + self.weight_bce * losses["bce"]
                             + self.weight_dice * losses["dice"])
            for k in parts:
                parts[k] += float(losses[k].detach())
        self.last_losses = parts
        return total
