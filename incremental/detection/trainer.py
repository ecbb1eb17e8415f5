"""The loop for detection batches: lists of images and target dicts in, loss dicts out.

torchvision's detectors compute their losses inside ``forward`` when they are in training mode and
given targets, and return predictions in eval mode. :class:`DetectionTrainer` keeps every callback and
strategy attribute of :class:`incremental.Trainer` and overrides only the steps whose shapes differ,
as Avalanche's ``ObjectDetectionTemplate`` does:

- ``forward()``: training -> the model's loss dict (also kept on ``detection_loss_dict``), evaluation
  -> the list of prediction dicts;
- ``criterion()``: training -> the weighted sum of the loss dict (:class:`DetectionLoss`),
  evaluation -> 0 (metrics are computed from ``mb_output`` by :class:`DetectionAccumulator`).

A plugin that computes a loss on another batch (gradient mixing's history batch) swaps it into
``mbatch`` and calls ``forward()`` + ``criterion()``, which works here unchanged because the model is
in training mode whenever ``is_training`` is set.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import nn

from ..trainer import Trainer
from .evaluation import DetectionAccumulator


class DetectionLoss:
    """A detector's loss dict as named loss terms ``w_k · L_k`` (missing weights are 1); the loop sums
    them into ``strategy.loss`` and exposes them as ``strategy.loss_terms`` (what dynamic loss
    weighting reweights).

    Called as the loop's ``_criterion(mb_output, mb_y)``; the targets are not needed because the
    detector already compared its outputs with them. A weight for a loss the model does not return is
    an error (a typo would otherwise silently train with weight 1).
    """

    def __init__(self, weights: Mapping[str, float] | None = None) -> None:
        self.weights = dict(weights or {})

    def __call__(self, loss_dict: Mapping[str, torch.Tensor], targets: Any = None) -> dict[str, torch.Tensor]:
        if not isinstance(loss_dict, Mapping):
            raise TypeError(f"DetectionLoss expects the detector's loss dict, got {type(loss_dict).__name__} "
                            "(is the model in eval mode during training?)")
        unknown = set(self.weights) - set(loss_dict)
        if unknown:
            raise KeyError(f"loss weights for {sorted(unknown)} but the detector returns {sorted(loss_dict)}")
        return {k: self.weights[k] * v if k in self.weights else v for k, v in loss_dict.items()}


class DetectionTrainer(Trainer):
    """:class:`incremental.Trainer` for torchvision-style detectors (see the module docstring).

    ``class_names`` (label i + 1 is ``class_names[i]``) and ``old_classes`` set up the default
    evaluation accumulator (COCO mAP per class, old / new means).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        criterion: Any = None,
        *,
        class_names: Sequence[str],
        old_classes: Sequence[str] | None = None,
        loss_weights: Mapping[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        self.class_names = list(class_names)
        self.old_classes = list(old_classes) if old_classes is not None else None
        kwargs.setdefault("eval_accumulator", lambda s: DetectionAccumulator(s.class_names, s.old_classes))
        kwargs.setdefault("train_mb_size", 8)
        kwargs.setdefault("eval_mb_size", 16)
        super().__init__(model, optimizer, criterion or DetectionLoss(loss_weights), **kwargs)
        self.detection_loss_dict: dict[str, torch.Tensor] | None = None

    def forward(self) -> Any:
        # uint8 images (a history library restored without the detection collate) become floats here
        images = [x.float().div(255.0) if x.dtype == torch.uint8 else x for x in self.mb_x]
        if self.is_training:
            self.detection_loss_dict = self.model(images, list(self.mb_y))
            return self.detection_loss_dict
        return self.model(images)

    def criterion(self) -> torch.Tensor:
        if not self.is_training:
            return torch.zeros(1, device=self.device)
        return super().criterion()
