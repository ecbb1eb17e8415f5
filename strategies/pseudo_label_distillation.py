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

from incremental.config import check
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


def relabel_as_no_object(p_folded: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Folded teacher probabilities (M, K + 1, no object last) with ``rows`` (M,) bool replaced by
    certain "no object".

    For a query the new ground truth claims (the old model took a new-class object for an old
    class), the old model's answer is known to be wrong; in the folded space a new class *is* "no
    object", so the corrected teacher agrees with the new label instead of fighting it.
    """
    target = torch.zeros_like(p_folded)
    target[..., -1] = 1.0
    return torch.where(rows[..., None], target, p_folded)


def distillation_loss(old_logits: torch.Tensor, new_logits: torch.Tensor, old_columns: Sequence[int],
                      old_background: int, new_background: int, gamma: float = 1.0,
                      kind: Divergence = "kl", temperature: float = 1.0,
                      row_mask: torch.Tensor | None = None, to_no_object: torch.Tensor | None = None) -> torch.Tensor:
    """No-object-weighted distillation over paired rows (queries or proposals) of class logits.

    ``old_logits`` (M, K_old) from the frozen old model, ``new_logits`` (M, K_new) from the model
    being trained, row m of both for the same query / proposal. ``old_columns`` are the old classes'
    columns (the same in both heads), ``*_background`` each head's no-object / background column.
    ``row_mask`` (M,) bool, optional: rows to leave out (weight 0). ``to_no_object`` (M,) bool,
    optional: rows whose teacher becomes "no object" (:func:`relabel_as_no_object`; their weight
    still comes from the old model, which saw an object there).
    Returns ``sum_m omega_m D(p_old_m || fold(p_new_m)) / sum_m omega_m``.
    """
    old_logits = old_logits.detach()
    p_old_full = old_logits.softmax(-1)
    weights = no_object_weights(p_old_full[..., old_background], gamma)
    if row_mask is not None:
        weights = weights * row_mask.to(weights.dtype)
    p_old = fold_probabilities((old_logits / temperature).softmax(-1), old_columns, old_background)
    if to_no_object is not None:
        if old_background != old_logits.shape[-1] - 1:  # the folded layout puts no object last
            raise ValueError("to_no_object needs the background as the old head's last column")
        p_old = relabel_as_no_object(p_old, to_no_object)
    p_new = fold_probabilities((new_logits / temperature).softmax(-1), old_columns, new_background)
    return weighted_mean(divergence(p_old, p_new, kind), weights)


def mask_distillation_loss(old_mask_logits: torch.Tensor, new_mask_logits: torch.Tensor, weights: torch.Tensor
                           ) -> torch.Tensor:
    """``sum_m w_m BCE(new_m, sigmoid(old_m)) / sum_m w_m``, BCE averaged over the pixels of mask m.

    Class distillation alone keeps *what* a query says but not *where*: the mask embedding (and the
    pixel features it is multiplied with) drift while the new classes are learned, and an old object
    whose class survives but whose mask dissolves is still lost. ``old_mask_logits`` and
    ``new_mask_logits`` (M, P) of paired queries; ``weights`` (M,) (the no-object weights, so only
    queries where the old model saw an object hold their masks).
    """
    target = old_mask_logits.detach().sigmoid()
    bce = F.binary_cross_entropy_with_logits(new_mask_logits, target, reduction="none").mean(-1)
    return weighted_mean(bce, weights.detach())


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
    to_no_object: torch.Tensor | None = None  # (M,) bool: rows whose teacher becomes "no object"
    old_masks: torch.Tensor | None = None  # (M, P) mask logits of the paired queries (mask distillation)
    new_masks: torch.Tensor | None = None


class OldModelAdapter(Protocol):
    """What the plugin needs from a model family (panoptic, detection)."""

    def predict(self, old_model: nn.Module, strategy: Any) -> Any:
        """The old model's prediction on ``strategy.mb_x`` (called under ``torch.no_grad``)."""

    def pseudo_targets(self, prediction: Any, targets: list[dict[str, Any]], old_model: nn.Module) -> list[dict[str, Any]]:
        """New target dicts: each target plus its pseudo labels (never modifies the inputs)."""

    def distillation_pairs(self, prediction: Any, strategy: Any, old_model: nn.Module
                           ) -> DistillationPairs | list[DistillationPairs] | None:
        """Old and current class logits to distil (one set, or one per decoder stage), or None when
        there is nothing to pair."""


ClaimedQueries = Literal["distil", "skip", "no_object"]
UnlabelledQueries = Literal["no_object", "unbiased", "skip"]


class MaskFormerAdapter:
    """Adapter for :class:`incremental.panoptic.model.PanopticMask2Former` outputs.

    Old classes are the old head's classes 0..C_old-1 (the head grows without renumbering), no
    object is the last column of each head, and query q of the old model is paired with query q of
    the current one (the current model starts as a copy of the old one, so queries keep their roles).

    Extensions (METHODS distils every query and trains every unmatched query as "no object"):

    - ``claimed_queries``: what the distillation does with the old queries whose mask the new ground
      truth claims (pseudo-label step b's test: there the old model took a new-class object for an
      old class): ``"distil"`` as any query, ``"skip"`` leave them out, ``"no_object"`` distil them
      towards "no object" (= the new class, in the folded space);
    - ``unlabelled_queries``: the class loss of queries the matching leaves unmatched:
      ``"no_object"`` (Mask2Former's), ``"unbiased"`` (no object *or* an old class is right: the
      image may show unlabelled old objects; MiB / CoMFormer), ``"skip"`` (no class loss for the
      queries where the old model saw an unclaimed old-class object; the distillation keeps them);
    - ``distill_aux``: pairs for every decoder stage, not only the last (deep supervision);
    - mask logits of the paired queries are returned for mask distillation (the plugin's
      ``lambda_mask``).
    """

    def __init__(self, config: Any = None, stuff_classes: Sequence[int] = (), claimed_queries: ClaimedQueries = "distil",
                 unlabelled_queries: UnlabelledQueries = "no_object", distill_aux: bool = False) -> None:
        from incremental.panoptic.pseudo_labels import PseudoLabelConfig

        check(claimed_queries in ("distil", "skip", "no_object"), "claimed_queries",
              f"must be 'distil', 'skip' or 'no_object', got {claimed_queries!r}")
        check(unlabelled_queries in ("no_object", "unbiased", "skip"), "unlabelled_queries",
              f"must be 'no_object', 'unbiased' or 'skip', got {unlabelled_queries!r}")
        self.config = config or PseudoLabelConfig()
        self.config.validate()
        self.stuff_classes = [int(c) for c in stuff_classes]
        self.claimed_queries = claimed_queries
        self.unlabelled_queries = unlabelled_queries
        self.distill_aux = distill_aux

    @staticmethod
    def n_old_classes(old_model: nn.Module) -> int:
        return int(old_model.n_classes)

    def predict(self, old_model: nn.Module, strategy: Any) -> dict[str, Any]:
        out = old_model(strategy.mb_x)
        prediction: dict[str, Any] = {"pred_logits": out["pred_logits"], "pred_masks": out["pred_masks"]}
        if self.distill_aux:
            prediction["aux_outputs"] = out.get("aux_outputs", [])
        if self.claimed_queries != "distil" or self.unlabelled_queries == "skip":
            prediction["claimed"] = self._claimed(prediction, list(strategy.mbatch[1]))
        return prediction

    def _claimed(self, prediction: dict[str, torch.Tensor], targets: list[dict[str, Any]]) -> torch.Tensor:
        """(B, N) bool: queries whose thresholded old mask a ground-truth mask of their image claims
        (the test of pseudo-label step b)."""
        from incremental.panoptic.criterion import upsample_masks
        from incremental.panoptic.pseudo_labels import drop_masks_matching_ground_truth, remove_noise_pixels

        rows = []
        for b, target in enumerate(targets):
            gt = target["masks"].bool()
            masks = remove_noise_pixels(upsample_masks(prediction["pred_masks"][b], gt.shape[-2:]).sigmoid(),
                                        self.config.mask_threshold)
            rows.append(~drop_masks_matching_ground_truth(masks, gt, self.config.iou_threshold, self.config.claim))
        return torch.stack(rows)

    def pseudo_targets(self, prediction: dict[str, Any], targets: list[dict[str, Any]],
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

    def unlabelled_keys(self, prediction: dict[str, Any], b: int, old_model: nn.Module) -> dict[str, Any]:
        """The criterion's keys for image b's unmatched queries (see :mod:`incremental.panoptic.criterion`)."""
        n_old = self.n_old_classes(old_model)
        if self.unlabelled_queries == "unbiased":
            return {"unlabelled_classes": n_old}
        if self.unlabelled_queries == "skip":
            saw_old = prediction["pred_logits"][b].argmax(-1) < n_old
            return {"skip_queries": saw_old & ~prediction["claimed"][b]}
        return {}

    def distillation_pairs(self, prediction: dict[str, Any], strategy: Any, old_model: nn.Module
                           ) -> list[DistillationPairs]:
        stages = [(prediction, strategy.mb_output)]
        if self.distill_aux:
            stages += list(zip(prediction.get("aux_outputs", []), strategy.mb_output.get("aux_outputs", [])))
        claimed = prediction.get("claimed")
        rows = None if claimed is None else claimed.reshape(-1)
        out = []
        for old_out, new_out in stages:
            old, new = old_out["pred_logits"], new_out["pred_logits"]
            n_old = old.shape[-1] - 1
            old_masks, new_masks = old_out["pred_masks"], new_out["pred_masks"]
            out.append(DistillationPairs(
                old.reshape(-1, old.shape[-1]), new.reshape(-1, new.shape[-1]), list(range(n_old)), n_old,
                new.shape[-1] - 1,
                row_mask=~rows if rows is not None and self.claimed_queries == "skip" else None,
                to_no_object=rows if rows is not None and self.claimed_queries == "no_object" else None,
                old_masks=old_masks.flatten(0, 1).flatten(1), new_masks=new_masks.flatten(0, 1).flatten(1)))
        return out


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
    two halves (for ablations). ``lambda_distill`` scales the class distillation, ``gamma`` sharpens
    the weight, ``divergence`` is ``"kl"`` or ``"ce"``; ``lambda_mask`` scales the mask distillation
    (:func:`mask_distillation_loss`, same weights; 0 = METHODS as written). ``adapter`` defaults to
    :class:`MaskFormerAdapter` (with ``pseudo_config``, ``stuff_classes``, ``claimed_queries``,
    ``unlabelled_queries`` and ``distill_aux``, see there).

    ``stats`` accumulates, per experience, the number of pseudo labels added, of images seen and the
    mean distillation losses (for reports).
    """

    def __init__(self, old_model: nn.Module | None = None, *, adapter: OldModelAdapter | None = None,
                 pseudo_labels: bool = True, distillation: bool = True, lambda_distill: float = 1.0,
                 gamma: float = 1.0, divergence: Divergence = "kl", temperature: float = 1.0,
                 lambda_mask: float = 0.0, pseudo_config: Any = None, stuff_classes: Sequence[int] = (),
                 claimed_queries: ClaimedQueries = "distil", unlabelled_queries: UnlabelledQueries = "no_object",
                 distill_aux: bool = False) -> None:
        super().__init__()
        check(lambda_distill >= 0, "lambda_distill", f"must be >= 0, got {lambda_distill}")
        check(lambda_mask >= 0, "lambda_mask", f"must be >= 0, got {lambda_mask}")
        check(gamma >= 0, "gamma", f"must be >= 0, got {gamma}")
        check(divergence in ("kl", "ce"), "divergence", f"must be 'kl' or 'ce', got {divergence!r}")
        check(temperature > 0, "temperature", f"must be > 0, got {temperature}")
        self.old_model = frozen_copy(old_model) if old_model is not None else None
        self.adapter: OldModelAdapter = adapter or MaskFormerAdapter(
            pseudo_config, stuff_classes, claimed_queries, unlabelled_queries, distill_aux)
        self.use_pseudo_labels = pseudo_labels
        self.use_distillation = distillation
        self.lambda_distill = lambda_distill
        self.lambda_mask = lambda_mask
        self.gamma = gamma
        self.divergence: Divergence = divergence
        self.temperature = temperature
        self._prediction: Any = None
        self.stats = self._empty_stats()

    @staticmethod
    def _empty_stats() -> dict[str, float]:
        return {"pseudo_labels": 0, "images": 0, "distill_sum": 0.0, "mask_sum": 0.0, "iterations": 0}

    # -- callbacks -----------------------------------------------------------------------------
    def before_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        self.stats = self._empty_stats()

    def before_forward(self, strategy: Any, **kwargs: Any) -> None:
        if self.old_model is None or not (self.use_pseudo_labels or self.use_distillation):
            return
        self.old_model.to(getattr(strategy, "device", "cpu"))
        with torch.no_grad():
            self._prediction = self.adapter.predict(self.old_model, strategy)
        targets = list(strategy.mbatch[1])
        extended = targets
        if self.use_pseudo_labels:
            extended = self.adapter.pseudo_targets(self._prediction, targets, self.old_model)
            self.stats["pseudo_labels"] += sum(len(e["labels"]) - len(t["labels"]) for e, t in zip(extended, targets))
            self.stats["images"] += len(targets)
        keys = getattr(self.adapter, "unlabelled_keys", None)  # optional: how to train unmatched queries
        extra = [keys(self._prediction, b, self.old_model) for b in range(len(targets))] if keys is not None else []
        if any(extra):
            extended = [{**e, **x} for e, x in zip(extended, extra)]
        if extended is not targets:
            batch = strategy.mbatch
            if isinstance(batch, list):
                batch[1] = extended
            else:  # Avalanche's detection template collates minibatches into tuples
                strategy.mbatch = type(batch)((batch[0], extended, *batch[2:]))

    def before_backward(self, strategy: Any, **kwargs: Any) -> None:
        if self._prediction is None or not self.use_distillation or (self.lambda_distill == 0 and self.lambda_mask == 0):
            return
        pairs = self.adapter.distillation_pairs(self._prediction, strategy, self.old_model)
        if pairs is None:
            return
        class_loss = mask_loss = strategy.loss.new_zeros(())
        for p in pairs if isinstance(pairs, list) else [pairs]:
            if self.lambda_distill:
                class_loss = class_loss + distillation_loss(
                    p.old_logits, p.new_logits, p.old_columns, p.old_background, p.new_background, self.gamma,
                    self.divergence, self.temperature, p.row_mask, getattr(p, "to_no_object", None))
            if self.lambda_mask and getattr(p, "old_masks", None) is not None:
                mask_loss = mask_loss + mask_distillation_loss(p.old_masks, p.new_masks, self.mask_weights(p))
        self.stats["distill_sum"] += float(class_loss.detach())
        self.stats["mask_sum"] += float(mask_loss.detach())
        self.stats["iterations"] += 1
        strategy.loss = strategy.loss + self.lambda_distill * class_loss + self.lambda_mask * mask_loss

    def mask_weights(self, pairs: DistillationPairs) -> torch.Tensor:
        """No-object weights of the paired queries, 0 for rows left out or relabelled as no object."""
        p_old = pairs.old_logits.detach().softmax(-1)
        weights = no_object_weights(p_old[..., pairs.old_background], self.gamma)
        for rows in (pairs.row_mask, None if pairs.to_no_object is None else ~pairs.to_no_object):
            if rows is not None:
                weights = weights * rows.to(weights.dtype)
        return weights

    def after_training_iteration(self, strategy: Any, **kwargs: Any) -> None:
        self._prediction = None

    def after_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        self.old_model = frozen_copy(strategy.model)

    def summary(self) -> dict[str, float]:
        s = self.stats
        out = {"pseudo_labels_per_image": s["pseudo_labels"] / max(s["images"], 1),
               "mean_distillation_loss": s["distill_sum"] / max(s["iterations"], 1)}
        if self.lambda_mask:
            out["mean_mask_distillation_loss"] = s["mask_sum"] / max(s["iterations"], 1)
        return out
