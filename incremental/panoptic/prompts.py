"""Query groups: each update learns its new classes with queries of its own, the deployed model frozen.

The reference is ECLIPSE (Kim et al., CVPR 2024): freeze every trained parameter and, per incremental
step, train only a small set of prompt embeddings with their own class and mask heads; at inference
merge the outputs of all prompt sets. Here a step's *query group* is:

- ``prompt_queries`` decoder queries (content and position embeddings, initialised from the deployed
  model's first queries, so the group starts out finding objects where the deployed queries do);
- deep prompts: one learned vector per decoder layer and query, added to the group's queries before
  that layer (zero at the start);
- a class head over the step's classes + "no object" (its no-object row starts as the deployed one)
  and a mask-embedding MLP (a copy of the deployed one);
- optionally trainable copies of the decoder layers (``own_layers``), of the pixel decoder
  (``own_pixel_decoder``) and of the backbone's last k stages (``own_backbone``, fed by the frozen
  stage before them): ECLIPSE's frozen backbone was pretrained on ImageNet and 100 ADE20K classes,
  ours on three shapes, and prompts alone on its features did not learn the new shapes; with the
  three stages after the stem the group has a feature extractor of its own, the expansion of DER
  (Yan et al., CVPR 2021: a new extractor per step, the old ones frozen), and learns the new classes
  nearly as well as joint training does (docs/panoptic.md, "Query groups").

The deployed queries run the deployed decoder exactly as before (same operations, same numbers); a
group's queries attend in self-attention to the deployed queries entering each layer, never the other
way round. A group answers only its own classes: its logits of every other class are ``FILL``, and so
are the deployed queries' logits of the new classes. Training a step returns the new group's outputs
alone, so the usual set criterion matches the step's annotations (new classes only) against them.

What the frozen deployed queries still do wrong is *semantic confusion*: they have never seen the
new classes and label them confidently as old ones (a cross as a circle). ECLIPSE answers with logit
manipulation; this module answers with ``newer_claims``: where a later group is confident about an
object, the older queries whose masks lie inside it answer "no object".

Written here rather than taken from ECLIPSE's code, which is detectron2-based and built around the
full Mask2Former; this is the same idea for this project's small model.
"""
from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from .model import PanopticMask2Former, stage_outputs

#: The logit of a class a query does not answer: softmax gives it probability 0 (exp(-1e4) underflows)
#: without the NaNs an actual -inf can bring into a loss's gradient.
FILL = -1e4


#: The backbone's stages after the stem, shallow to deep (``prompt_own_backbone`` copies the last k).
BACKBONE_STAGES: tuple[str, ...] = ("stage1", "stage2", "stage3")


def group_features(feats: list[torch.Tensor], stages: nn.ModuleList) -> list[torch.Tensor]:
    """The backbone features a query group sees: the frozen ones, with the last ``len(stages)`` levels
    recomputed by the group's own copies of those stages from the frozen level before them."""
    if not len(stages):
        return feats
    first = len(feats) - len(stages)
    out, x = list(feats[:first]), feats[first - 1]
    for stage in stages:
        x = stage(x)
        out.append(x)
    return out


class QueryGroup(nn.Module):
    """One update step's queries, deep prompts, class head and mask embedding (see the module doc)."""

    def __init__(self, model: PanopticMask2Former, n_queries: int, n_classes: int, first_class: int,
                 own_layers: bool = False, own_pixel_decoder: bool = False, own_backbone: int = 0) -> None:
        super().__init__()
        dim = model.query_feat.weight.shape[1]
        take = torch.arange(n_queries) % model.query_feat.weight.shape[0]
        self.first_class = first_class
        self.n_classes = n_classes
        self.query_feat = nn.Parameter(model.query_feat.weight.detach()[take].clone())
        self.query_pos = nn.Parameter(model.query_pos.weight.detach()[take].clone())
        self.prompts = nn.Parameter(torch.zeros(len(model.layers), n_queries, dim))
        self.class_head = nn.Linear(dim, n_classes + 1)
        with torch.no_grad():
            self.class_head.weight[-1] = model.class_head.linear.weight[-1]
            self.class_head.bias[-1] = model.class_head.linear.bias[-1]
        self.mask_embed = copy.deepcopy(model.mask_embed)
        # own_layers: a trainable copy of the decoder for this group (more capacity than prompts alone)
        self.layers = copy.deepcopy(model.layers) if own_layers else None
        # own_pixel_decoder: a trainable copy of the pixel decoder (mask features and memories of its own)
        self.pixel_decoder = copy.deepcopy(model.pixel_decoder) if own_pixel_decoder else None
        # own_backbone = k: trainable copies of the backbone's last k stages, fed by the frozen stage before
        # them, so the group's deepest features can learn what separates its classes from the old ones
        names = BACKBONE_STAGES[len(BACKBONE_STAGES) - own_backbone:] if own_backbone else []
        self.backbone_stages = nn.ModuleList(copy.deepcopy(getattr(model.backbone, n)) for n in names)

    @property
    def n_queries(self) -> int:
        return self.query_feat.shape[0]


def full_width_logits(logits: torch.Tensor, first: int, n_total: int) -> torch.Tensor:
    """(B, N, k + 1) logits over classes ``first .. first + k - 1`` and "no object" -> (B, N, n_total + 1)
    over every class, ``FILL`` for the classes these queries do not answer."""
    b, n, width = logits.shape
    k = width - 1
    out = logits.new_full((b, n, n_total + 1), FILL)
    out[..., first:first + k] = logits[..., :k]
    out[..., -1] = logits[..., -1]
    return out


def newer_claims(logits: list[torch.Tensor], masks: list[torch.Tensor], score_threshold: float = 0.5,
                 cover: float = 0.5, measure: str = "ioa", yield_overlap: float | None = None,
                 yield_classes: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Per query segment (deployed queries first, then the groups in step order), the logits with every
    class set to ``FILL`` for the queries whose mask overlaps the mask of a confident query (class
    probability > ``score_threshold``) of a *later* segment by more than ``cover``: that query then
    answers "no object". ``measure`` "ioa": the intersection over the earlier query's own area (its
    mask lies mostly inside the later one); "iou": intersection over union (the two masks agree).
    A segment suppressed by a later one claims nothing itself (segments are visited newest first).

    ``yield_overlap`` (None: off): a confident later query that overlaps a confident earlier query it
    does not claim by more than this fraction of its own mask yields instead: it answers "no object"
    and its claims are withdrawn. Either the later query's object holds the earlier one, or the earlier
    one was there first. ``yield_classes`` (bool per class; None: all): only earlier queries answering
    one of these make a later one yield (things: a stuff region is not an object to yield to).

    Why: the frozen deployed queries have never seen the new classes and label them confidently as an
    old class (a cross as a circle); a group was trained on its step's images, where old-class objects
    were its "no object", so where a group is confident it knows better than the older queries. The
    reverse error happens too: a group fires on an old-class object with a mask that covers part of it
    (a cross on a circle); without ``yield_overlap`` both segments then fight over the pixels and
    panoptic inference drops both, leaving a hole.
    """
    if measure not in ("ioa", "iou"):
        raise ValueError(f"measure must be 'ioa' or 'iou', got {measure!r}")
    out = [lg.clone() for lg in logits]
    binary = [(m.sigmoid() > 0.5).float() for m in masks]
    areas = [b.flatten(2).sum(-1) for b in binary]  # (B, n) per segment
    for later in range(len(logits) - 1, 0, -1):
        confident = out[later].softmax(-1)[..., :-1].max(-1).values > score_threshold  # (B, n_later)
        if not bool(confident.any()):
            continue
        # the earlier segments together: (B, n_earlier) queries
        earlier_binary = torch.cat(binary[:later], 1)
        earlier_area = torch.cat(areas[:later], 1)
        earlier_logits = torch.cat(out[:later], 1)
        inter = torch.einsum("bihw,bjhw->bij", earlier_binary, binary[later])
        if measure == "ioa":
            denom = earlier_area[..., None].expand_as(inter)
        else:
            denom = earlier_area[..., None] + areas[later][:, None, :] - inter
        claims = (inter / denom.clamp(min=1) > cover) & confident[:, None, :]  # (B, n_earlier, n_later)
        if yield_overlap is not None:
            score, label = earlier_logits.softmax(-1)[..., :-1].max(-1)
            earlier_confident = score > score_threshold
            if yield_classes is not None:
                earlier_confident &= yield_classes.to(label.device)[label]
            of_later = inter / areas[later][:, None, :].clamp(min=1)
            yields = (earlier_confident[..., None] & ~claims & (of_later > yield_overlap)).any(1) & confident
            claims = claims & ~yields[:, None, :]
            out[later][..., :-1] = out[later][..., :-1].masked_fill(yields[..., None], FILL)
        covered = claims.any(-1)  # (B, n_earlier)
        earlier_logits[..., :-1] = earlier_logits[..., :-1].masked_fill(covered[..., None], FILL)
        for k, part in enumerate(earlier_logits.split([lg.shape[1] for lg in out[:later]], 1)):
            out[k] = part
    return out


class PromptedMask2Former(PanopticMask2Former):
    """The panoptic model of ``incremental.panoptic.model`` that grows by query groups.

    Step 0 trains it as the plain model (no groups). ``grow_to(n)`` (called by the loop's model
    adaptation at an update) freezes everything trained so far and adds a group for the new classes;
    ``prompt_groups`` lists the groups' class counts so a package or checkpoint rebuilds them.
    """

    def __init__(self, n_classes: int, *, prompt_queries: int = 8, prompt_groups: list[int] | tuple[int, ...] = (),
                 prompt_own_layers: bool = False, prompt_own_pixel_decoder: bool = False, prompt_own_backbone: int = 0,
                 prompt_claim_cover: float = 0.7, prompt_claim_yield: float | None = None,
                 prompt_thing_classes: list[int] | tuple[int, ...] | None = None, **kwargs: Any) -> None:
        if prompt_queries < 1:
            raise ValueError(f"prompt_queries must be >= 1, got {prompt_queries}")
        groups = [int(g) for g in prompt_groups]
        if not 0.0 <= prompt_claim_cover <= 1.0:
            raise ValueError(f"prompt_claim_cover must be in [0, 1], got {prompt_claim_cover}")
        if prompt_claim_yield is not None and not 0.0 <= prompt_claim_yield <= 1.0:
            raise ValueError(f"prompt_claim_yield must be in [0, 1] or None, got {prompt_claim_yield}")
        if any(g < 1 for g in groups):
            raise ValueError(f"prompt_groups must be class counts >= 1, got {groups}")
        base_classes = n_classes - sum(groups)
        if base_classes < 1:
            raise ValueError(f"n_classes ({n_classes}) must exceed the groups' classes ({sum(groups)})")
        super().__init__(base_classes, **kwargs)
        self.class_head.growable = False  # new classes get query groups, not rows of the deployed head
        self.prompt_queries = int(prompt_queries)
        self.prompt_own_layers = bool(prompt_own_layers)
        self.prompt_own_pixel_decoder = bool(prompt_own_pixel_decoder)
        if not 0 <= int(prompt_own_backbone) <= len(BACKBONE_STAGES):
            raise ValueError(f"prompt_own_backbone must be 0-{len(BACKBONE_STAGES)} stages, got {prompt_own_backbone}")
        self.prompt_own_backbone = int(prompt_own_backbone)
        # inference: confident later queries claim the objects older queries mislabel (newer_claims)
        self.claims, self.claim_threshold, self.claim_measure = True, 0.5, "ioa"
        # ... or yield to the older objects they overlap without claiming them; only thing classes count
        # (None: every class), since a stuff region is not an object a query could be mistaken for
        self.claim_yield = None if prompt_claim_yield is None else float(prompt_claim_yield)
        self.thing_classes = None if prompt_thing_classes is None else [int(c) for c in prompt_thing_classes]
        self.claim_cover = float(prompt_claim_cover)
        self.groups = nn.ModuleList()
        for size in groups:
            self._add_group(size)

    @property
    def n_classes(self) -> int:
        return self.class_head.n_classes + sum(g.n_classes for g in self.groups)

    def arch_kwargs(self) -> dict[str, Any]:
        return {**self.config, "n_classes": self.n_classes, "prompt_queries": self.prompt_queries,
                "prompt_groups": [g.n_classes for g in self.groups], "prompt_own_layers": self.prompt_own_layers,
                "prompt_own_pixel_decoder": self.prompt_own_pixel_decoder, "prompt_own_backbone": self.prompt_own_backbone,
                "prompt_claim_cover": self.claim_cover,
                "prompt_claim_yield": self.claim_yield, "prompt_thing_classes": self.thing_classes}

    def _add_group(self, n_new: int) -> None:
        for p in self.parameters():
            p.requires_grad_(False)
        group = QueryGroup(self, self.prompt_queries, n_new, self.n_classes, self.prompt_own_layers,
                           self.prompt_own_pixel_decoder, self.prompt_own_backbone)
        self.groups.append(group.requires_grad_(True))  # its mask embedding copies frozen weights

    def grow_to(self, n_classes: int) -> bool:
        if n_classes <= self.n_classes:
            return False
        self._add_group(n_classes - self.n_classes)
        return True

    def forward(self, images: torch.Tensor) -> dict[str, Any]:
        if not self.groups:
            return super().forward(images)
        b = images.shape[0]
        n_total = self.n_classes
        with torch.no_grad():  # everything deployed is frozen once a group exists
            feats = self.backbone(images)
            encoded = self.memories(feats)
            mask_features, mems, poss, sizes = encoded
            qpos = self.query_pos.weight[None].expand(b, -1, -1)
            deployed, states = self.decode(self.query_feat.weight[None].expand(b, -1, -1), qpos,
                                           mask_features, mems, poss, sizes)

        def group_stages(g: QueryGroup) -> list[tuple[torch.Tensor, torch.Tensor]]:
            if g.pixel_decoder is None and not len(g.backbone_stages):
                mask_features, mems, poss, sizes = encoded
            else:
                mask_features, mems, poss, sizes = self.memories(group_features(feats, g.backbone_stages), g.pixel_decoder)
            outputs, _ = self.decode(g.query_feat[None].expand(b, -1, -1), g.query_pos[None].expand(b, -1, -1),
                                     mask_features, mems, poss, sizes, layers=g.layers, class_head=g.class_head,
                                     mask_embed=g.mask_embed, prompts=g.prompts, context=(states, qpos))
            return [(full_width_logits(lg, g.first_class, n_total), mk) for lg, mk in outputs]

        if self.training:  # an update trains its newest group, against its own classes' annotations
            return stage_outputs(group_stages(self.groups[-1]))
        segments = [[(full_width_logits(lg, 0, n_total), mk) for lg, mk in deployed],
                    *(group_stages(g) for g in self.groups)]
        yield_classes = None
        if self.thing_classes is not None:
            yield_classes = torch.zeros(n_total, dtype=torch.bool, device=images.device)
            yield_classes[[c for c in self.thing_classes if c < n_total]] = True
        merged = []
        for stage in zip(*segments):  # per decoder stage: every segment's (logits, masks)
            logits = [lg for lg, _ in stage]
            if self.claims:
                logits = newer_claims(logits, [mk for _, mk in stage], self.claim_threshold, self.claim_cover,
                                      self.claim_measure, self.claim_yield, yield_classes)
            merged.append((torch.cat(logits, 1), torch.cat([mk for _, mk in stage], 1)))
        return stage_outputs(merged)
