"""Faster R-CNN adapter for :class:`strategies.pseudo_label_distillation.PseudoLabelDistillationPlugin`.

METHODS section 3 on a detector whose box head has a background class (torchvision's Faster R-CNN,
background = column 0, old classes = columns 1..C_old, unchanged when the head grows):

- pseudo labels: the frozen old detector's boxes on the training images with score >= ``score``
  (old classes only, by construction), minus those that overlap a ground-truth box of the image with
  IoU > ``iou`` (the annotation wins), appended to the targets before the detector computes its loss;
- distillation pairs: the box head's class logits of the current model on the proposals it sampled
  for this step, and the old model's class logits on *the same proposals* over its own features of
  the same (transformed) images. The plugin weights each proposal by ``1 - p_old(background)``.

The current model's proposals and transformed images are only known inside its forward pass, so the
adapter keeps three forward hooks on it (the backbone's input, the RoI pooler's inputs, the box
predictor's output) and reads what the last training forward left there.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torchvision.ops import box_iou


@dataclass
class PseudoBoxConfig:
    score: float = 0.5  # old detector's boxes at or above this score become pseudo labels
    iou: float = 0.5  # a pseudo box overlapping a ground-truth box by more than this is dropped
    # Leave out of the distillation the proposals that overlap an annotated new-class box by more than
    # ``iou``: there the annotation says what the object is, and the old model, which has no such
    # class, would pull the new model towards an old class. Off by default (METHODS distils every
    # proposal, weighted by 1 - p_old(background)).
    skip_annotated_new: bool = False


def pseudo_boxes(old_boxes: torch.Tensor, old_scores: torch.Tensor, old_labels: torch.Tensor,
                 gt_boxes: torch.Tensor, score: float, iou: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Old-model boxes kept as pseudo labels: confident (score >= ``score``) and not already annotated
    (IoU <= ``iou`` with every ground-truth box, whatever its class: the annotation wins)."""
    keep = old_scores >= score
    if len(gt_boxes) and bool(keep.any()):
        overlap = box_iou(old_boxes.float(), gt_boxes.float()).max(dim=1).values
        keep &= overlap <= iou
    return old_boxes[keep].float(), old_labels[keep].long()


def annotated_new_mask(proposals: list[torch.Tensor], targets: list[dict[str, Any]], n_old: int, iou: float) -> torch.Tensor:
    """For the concatenated proposals of a batch: True where a proposal overlaps an annotated box of a
    new class (label > ``n_old``) by IoU > ``iou``."""
    masks = []
    for props, t in zip(proposals, targets):
        new_boxes = t["boxes"][t["labels"] > n_old]
        if len(props) == 0 or len(new_boxes) == 0:
            masks.append(torch.zeros(len(props), dtype=torch.bool))
            continue
        masks.append((box_iou(props.detach().float(), new_boxes.float().to(props.device)).max(dim=1).values > iou).cpu())
    return torch.cat(masks) if masks else torch.zeros(0, dtype=torch.bool)


class _Capture:
    """Forward hooks on one detector that keep what its last forward pass saw."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.images: torch.Tensor | None = None
        self.proposals: list[torch.Tensor] | None = None
        self.image_shapes: list[tuple[int, int]] | None = None
        self.class_logits: torch.Tensor | None = None
        self.handles = [
            model.backbone.register_forward_pre_hook(self._backbone_in),
            model.roi_heads.box_roi_pool.register_forward_pre_hook(self._roi_in),
            model.roi_heads.box_predictor.register_forward_hook(self._predictor_out),
        ]

    def _backbone_in(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        self.images = args[0]

    def _roi_in(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        _, self.proposals, self.image_shapes = args[:3]

    def _predictor_out(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        self.class_logits = output[0]

    def remove(self) -> None:
        for h in self.handles:
            h.remove()

    def __deepcopy__(self, memo: dict[int, Any]) -> "_Capture":
        # Deep-copying the hooked model (the plugin freezes a copy as the next old model) copies its
        # hooks and so this object; the captured tensors are mid-graph and cannot be deep-copied, and
        # the copy has no use for them: it gets an inert, empty capture.
        inert = object.__new__(_Capture)
        inert.model, inert.images, inert.proposals, inert.image_shapes, inert.class_logits = None, None, None, None, None
        inert.handles = []
        return inert


class FasterRCNNAdapter:
    """The plugin's adapter protocol (``predict``, ``pseudo_targets``, ``distillation_pairs``) for
    torchvision Faster R-CNN models (see the module docstring)."""

    def __init__(self, config: PseudoBoxConfig | None = None) -> None:
        self.config = config or PseudoBoxConfig()
        self._capture: _Capture | None = None

    def _watch(self, model: nn.Module) -> None:
        if self._capture is None or self._capture.model is not model:
            if self._capture is not None:
                self._capture.remove()
            self._capture = _Capture(model)

    def predict(self, old_model: nn.Module, strategy: Any) -> list[dict[str, torch.Tensor]]:
        """The old detector's boxes on ``strategy.mb_x`` (eval mode); also hooks the current model."""
        self._watch(strategy.model)
        old_model.eval()
        return old_model([x.float() / 255.0 if x.dtype == torch.uint8 else x for x in strategy.mb_x])

    def pseudo_targets(self, prediction: list[dict[str, torch.Tensor]], targets: list[dict[str, Any]],
                       old_model: nn.Module) -> list[dict[str, Any]]:
        out = []
        for p, t in zip(prediction, targets):
            boxes, labels = pseudo_boxes(p["boxes"], p["scores"], p["labels"], t["boxes"], self.config.score,
                                         self.config.iou)
            out.append({**t, "boxes": torch.cat([t["boxes"], boxes.to(t["boxes"])]),
                        "labels": torch.cat([t["labels"], labels.to(t["labels"].device)])})
        return out

    def distillation_pairs(self, prediction: Any, strategy: Any, old_model: nn.Module) -> Any:
        from strategies.pseudo_label_distillation import DistillationPairs

        cap = self._capture
        if cap is None or cap.class_logits is None or cap.proposals is None or cap.images is None:
            return None
        with torch.no_grad():
            features = old_model.backbone(cap.images)
            if isinstance(features, torch.Tensor):
                features = {"0": features}
            pooled = old_model.roi_heads.box_roi_pool(features, cap.proposals, cap.image_shapes)
            old_logits, _ = old_model.roi_heads.box_predictor(old_model.roi_heads.box_head(pooled))
        n_old = old_logits.shape[-1] - 1
        new_logits = cap.class_logits
        if self.config.skip_annotated_new:
            keep = annotated_new_mask(cap.proposals, list(strategy.mb_y), n_old, self.config.iou).to(new_logits.device)
            old_logits, new_logits = old_logits[~keep], new_logits[~keep]
        return DistillationPairs(old_logits, new_logits, list(range(1, n_old + 1)), 0, 0)

    def close(self) -> None:
        if self._capture is not None:
            self._capture.remove()
            self._capture = None
