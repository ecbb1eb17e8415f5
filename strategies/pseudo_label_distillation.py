"""Old-model pseudo labels + no-object-weighted distillation (METHODS.md section 3).

A deployed model must learn new classes from images annotated for the new classes only. The frozen
old model (the model before the update) runs on every training batch and

1. labels the old-class objects the new annotations lack (pseudo labels, appended to the targets
   before the loss matches predictions to targets): :mod:`incremental.panoptic.pseudo_labels`;
2. anchors the new model's class probabilities to its own where it saw an object: per query, a
   divergence between old and current probabilities over the old classes + no object (the new
   classes' mass folded into no object), weighted by ``omega = (1 - p_old(no object))^gamma`` and
   normalised by the sum of the weights, scaled by ``lambda``.

The distillation formulas are pure functions below; model-specific work (running the old model,
turning its prediction into pseudo targets, pairing old and current class logits) goes through an
adapter object, so the same plugin serves the Mask2Former-style panoptic model
(:class:`MaskFormerAdapter`) and a detector with a background class (Faster R-CNN's box head: an
adapter whose ``background`` column is 0 and whose pseudo targets are boxes).

Callbacks (Avalanche's names, so the plugin runs in ``incremental.Trainer`` and in Avalanche's
templates): ``before_forward`` runs the old model on ``mb_x`` and extends each target dict in
``mbatch[1]`` (so it also works for detectors, whose loss is computed inside ``forward``);
``before_backward`` adds ``lambda x distillation`` to ``strategy.loss``; ``after_training_exp``
keeps a frozen copy of the trained model as the next experience's old model.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Literal, Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from incremental.plugins import Plugin

Divergence = Literal["kl", "ce"]


# ----------------------------------------------------------------------------- pure functions
def no_object_weights(p_background: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """``omega = (1 - p_old(no object))^gamma`` per query / proposal.

    Distillation matters where the old model saw an object; where it was sure there was nothing,
    matching its "no object" would also fight the new classes, which arrive as "no object" for the
    old model. gamma = 1 follows METHODS' source; gamma = 2 is what CoMFormer uses (sharper).
    """
    return (1.0 - p_background).clamp(min=0.0) ** gamma


def fold_probabilities(probs: torch.Tensor, keep_columns: Sequence[int] | torch.Tensor, background: int
                       ) -> torch.Tensor:
    """(..., K) -> (..., len(keep) + 1): the ``keep_columns`` in order, then the background column
    plus every column not kept.

    The old model has no output for the new classes; for it, a new-class object is "no object".
    Folding the current model's new-class probability into its no-object probability compares the
    two models on the old model's terms, so learning the new classes is not penalised.
    """
    keep = torch.as_tensor(keep_columns, dtype=torch.long, device=probs.device)
    if int(background) in set(keep.tolist()):
        raise ValueError(f"the background column {background} cannot also be kept")
    kept = probs.index_select(-1, keep)
    rest = (probs.sum(-1, keepdim=True) - kept.sum(-1, keepdim=True)).clamp(min=0.0)  # background + unkept
    return torch.cat([kept, rest], -1)


def divergence(p_old: torch.Tensor, p_new: torch.Tensor, kind: Divergence = "kl", eps: float = 1e-8) -> torch.Tensor:
    """Per row (...,): ``kl``: sum p_old (log p_old - log p_new); ``ce``: -sum p_old log p_new.

    Both give the same gradient for the new model; KL is 0 when the two agree, which makes the
    logged value readable.
    """
    log_new = p_new.clamp(min=eps).log()
    if kind == "kl":
        return (p_old * (p_old.clamp(min=eps).log() - log_new)).sum(-1)
    if kind == "ce":
        return -(p_old * log_new).sum(-1)
    raise ValueError(f"unknown divergence {kind!r}; use 'kl' or 'ce'")


def weighted_mean(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``sum(w v) / sum(w)``; 0 (with a gradient path) when every weight is 0."""
    total = weights.sum()
    if float(total) <= 0.0:
        return (values * 0.0).sum()
    return (weights * values).sum() / total


def distillation_loss(old_logits: torch.Tensor, new_logits: torch.Tensor, old_columns: Sequence[int],
                      old_background: int, new_background: int, gamma: float = 1.0,
                      kind: Divergence = "kl", temperature: float = 1.0,
                      row_mask: torch.Tensor | None = None) -> torch.Tensor:
    """No-object-weighted distillation over paired rows (queries or proposals) of class logits.

    ``old_logits`` (M, K_old) from the frozen old model, ``new_logits`` (M, K_new) from the model
    being trained, row m of both for the same query / proposal. ``old_columns`` are the old classes'
    columns (the same in both heads), ``*_background`` each head's no-object / background column.
    ``row_mask`` (M,) bool, optional: rows to leave out (weight 0).
    Returns ``sum_m omega_m D(p_old_m || fold(p_new_m)) / sum_m omega_m``.
    """
    old_logits = old_logits.detach()
    p_old_full = old_logits.softmax(-1)
    weights = no_object_weights(p_old_full[..., old_background], gamma)
    if row_mask is not None:
        weights = weights * row_mask.to(weights.dtype)
    p_old = fold_probabilities((old_logits / temperature).softmax(-1), old_columns, old_background)
    p_new = fold_probabilities((new_logits / temperature).softmax(-1), old_columns, new_background)
    return weighted_mean(divergence(p_old, p_new, kind), weights)


# ----------------------------------------------------------------------------- adapters
@dataclass
class DistillationPairs:
    """Paired class logits of the old and the current model, and where their columns are."""

    old_logits: torch.Tensor  # (M, K_old)
    new_logits: torch.Tensor  # (M, K_new)
    old_columns: list[int]
    old_background: int
    new_background: int
    row_mask: torch.Tensor | None = None  # (M,) bool: rows to distil (None: all)


class OldModelAdapter(Protocol):
    """What the plugin needs from a model family (panoptic, detection)."""

    def predict(self, old_model: nn.Module, strategy: Any) -> Any:
        """The old model's prediction on ``strategy.mb_x`` (called under ``torch.no_grad``)."""

    def pseudo_targets(self, prediction: Any, targets: list[dict[str, Any]], old_model: nn.Module) -> list[dict[str, Any]]:
        """New target dicts: each target plus its pseudo labels (never modifies the inputs)."""

    def distillation_pairs(self, prediction: Any, strategy: Any, old_model: nn.Module) -> DistillationPairs | None:
        """Old and current class logits to distil, or None when there is nothing to pair."""


class MaskFormerAdapter:
    """Adapter for :class:`incremental.panoptic.model.PanopticMask2Former` outputs.

    Old classes are the old head's classes 0..C_old-1 (the head grows without renumbering), no
    object is the last column of each head, and query q of the old model is paired with query q of
    the current one (the current model starts as a copy of the old one, so queries keep their roles).

    ``distill_gt_matches=False`` (an extension; METHODS distils every query) leaves out of the
    distillation the queries whose old mask matches a ground-truth mask (the IoU test of pseudo-label
    step b): there the old model labelled a new-class object as an old class, and distilling its
    class would teach the new model the same mistake.
    """

    def __init__(self, config: Any = None, stuff_classes: Sequence[int] = (), distill_gt_matches: bool = True) -> None:
        from incremental.panoptic.pseudo_labels import PseudoLabelConfig

        self.config = config or PseudoLabelConfig()
        self.stuff_classes = [int(c) for c in stuff_classes]
        self.distill_gt_matches = distill_gt_matches

    @staticmethod
    def n_old_classes(old_model: nn.Module) -> int:
        return int(old_model.n_classes)

    def predict(self, old_model: nn.Module, strategy: Any) -> dict[str, torch.Tensor]:
        out = old_model(strategy.mb_x)
        prediction = {"pred_logits": out["pred_logits"], "pred_masks": out["pred_masks"]}
        if not self.distill_gt_matches:
            prediction["distill_rows"] = self._rows_not_matching_ground_truth(prediction, list(strategy.mbatch[1]))
        return prediction

    def _rows_not_matching_ground_truth(self, prediction: dict[str, torch.Tensor], targets: list[dict[str, Any]]
                                        ) -> torch.Tensor:
        """(B * N,) bool: False for queries whose thresholded old mask has IoU above the pseudo-label
        IoU threshold with a ground-truth mask of their image."""
        from incremental.panoptic.criterion import upsample_masks
        from incremental.panoptic.pseudo_labels import drop_masks_matching_ground_truth, remove_noise_pixels

        rows = []
        for b, target in enumerate(targets):
            gt = target["masks"].bool()
            masks = remove_noise_pixels(upsample_masks(prediction["pred_masks"][b], gt.shape[-2:]).sigmoid(),
                                        self.config.mask_threshold)
            rows.append(drop_masks_matching_ground_truth(masks, gt, self.config.iou_threshold))
        return torch.cat(rows)

    def pseudo_targets(self, prediction: dict[str, torch.Tensor], targets: list[dict[str, Any]],
                       old_model: nn.Module) -> list[dict[str, Any]]:
        from incremental.panoptic.criterion import upsample_masks
        from incremental.panoptic.pseudo_labels import make_pseudo_labels

        n_old = self.n_old_classes(old_model)
        class_probs = prediction["pred_logits"].softmax(-1)
        out = []
        for b, target in enumerate(targets):
            gt_masks = target["masks"].bool()
            mask_probs = upsample_masks(prediction["pred_masks"][b], gt_masks.shape[-2:]).sigmoid()
            labels, masks = make_pseudo_labels(class_probs[b], mask_probs, gt_masks, n_old, self.config,
                                               self.stuff_classes)
            out.append({**target,
                        "labels": torch.cat([target["labels"], labels.to(target["labels"].device)]),
                        "masks": torch.cat([target["masks"], masks.to(target["masks"].device, target["masks"].dtype)])})
        return out

    def distillation_pairs(self, prediction: dict[str, torch.Tensor], strategy: Any, old_model: nn.Module
                           ) -> DistillationPairs:
        old = prediction["pred_logits"]
        new = strategy.mb_output["pred_logits"]
        n_old = old.shape[-1] - 1
        return DistillationPairs(old.reshape(-1, old.shape[-1]), new.reshape(-1, new.shape[-1]),
                                 list(range(n_old)), n_old, new.shape[-1] - 1, prediction.get("distill_rows"))


def frozen_copy(model: nn.Module) -> nn.Module:
    """A deep copy in eval mode with gradients off: the old model."""
    old = copy.deepcopy(model)
    old.eval()
    for p in old.parameters():
        p.requires_grad_(False)
    return old


# ----------------------------------------------------------------------------- plugin
class PseudoLabelDistillationPlugin(Plugin):
    """Pseudo labels from the frozen old model and no-object-weighted distillation.

    ``old_model``: the model before the update (a deployed model); otherwise the plugin keeps a
    frozen copy of the model after every experience. ``pseudo_labels`` / ``distillation`` switch the
    two halves (for ablations). ``lambda_distill`` scales the distillation loss, ``gamma`` sharpens
    the weight, ``divergence`` is ``"kl"`` or ``"ce"``. ``adapter`` defaults to
    :class:`MaskFormerAdapter` (with ``pseudo_config``, ``stuff_classes`` and ``distill_gt_matches``).

    ``stats`` accumulates, per experience, the number of pseudo labels added, of images seen and the
    mean distillation loss (for reports).
    """

    def __init__(self, old_model: nn.Module | None = None, *, adapter: OldModelAdapter | None = None,
                 pseudo_labels: bool = True, distillation: bool = True, lambda_distill: float = 1.0,
                 gamma: float = 1.0, divergence: Divergence = "kl", temperature: float = 1.0,
                 pseudo_config: Any = None, stuff_classes: Sequence[int] = (), distill_gt_matches: bool = True) -> None:
        super().__init__()
        if lambda_distill < 0:
            raise ValueError(f"lambda_distill must be >= 0, got {lambda_distill}")
        if gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {gamma}")
        if divergence not in ("kl", "ce"):
            raise ValueError(f"divergence must be 'kl' or 'ce', got {divergence!r}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.old_model = frozen_copy(old_model) if old_model is not None else None
        self.adapter: OldModelAdapter = adapter or MaskFormerAdapter(pseudo_config, stuff_classes, distill_gt_matches)
        self.use_pseudo_labels = pseudo_labels
        self.use_distillation = distillation
        self.lambda_distill = lambda_distill
        self.gamma = gamma
        self.divergence: Divergence = divergence
        self.temperature = temperature
        self._prediction: Any = None
        self.stats = self._empty_stats()

    @staticmethod
    def _empty_stats() -> dict[str, float]:
        return {"pseudo_labels": 0, "images": 0, "distill_sum": 0.0, "iterations": 0}

    # -- callbacks -----------------------------------------------------------------------------
    def before_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        self.stats = self._empty_stats()

    def before_forward(self, strategy: Any, **kwargs: Any) -> None:
        if self.old_model is None or not (self.use_pseudo_labels or self.use_distillation):
            return
        self.old_model.to(getattr(strategy, "device", "cpu"))
        with torch.no_grad():
            self._prediction = self.adapter.predict(self.old_model, strategy)
        if self.use_pseudo_labels:
            targets = list(strategy.mbatch[1])
            extended = self.adapter.pseudo_targets(self._prediction, targets, self.old_model)
            self.stats["pseudo_labels"] += sum(len(e["labels"]) - len(t["labels"]) for e, t in zip(extended, targets))
            self.stats["images"] += len(targets)
            batch = strategy.mbatch
            if isinstance(batch, list):
                batch[1] = extended
            else:  # Avalanche's detection template collates minibatches into tuples
                strategy.mbatch = type(batch)((batch[0], extended, *batch[2:]))

    def before_backward(self, strategy: Any, **kwargs: Any) -> None:
        if self._prediction is None or not self.use_distillation or self.lambda_distill == 0:
            return
        pairs = self.adapter.distillation_pairs(self._prediction, strategy, self.old_model)
        if pairs is None:
            return
        loss = distillation_loss(pairs.old_logits, pairs.new_logits, pairs.old_columns, pairs.old_background,
                                 pairs.new_background, self.gamma, self.divergence, self.temperature,
                                 getattr(pairs, "row_mask", None))
        self.stats["distill_sum"] += float(loss.detach())
        self.stats["iterations"] += 1
        strategy.loss = strategy.loss + self.lambda_distill * loss

    def after_training_iteration(self, strategy: Any, **kwargs: Any) -> None:
        self._prediction = None

    def after_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        self.old_model = frozen_copy(strategy.model)

    def summary(self) -> dict[str, float]:
        s = self.stats
        return {"pseudo_labels_per_image": s["pseudo_labels"] / max(s["images"], 1),
                "mean_distillation_loss": s["distill_sum"] / max(s["iterations"], 1)}
