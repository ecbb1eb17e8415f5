"""A small Mask2Former-style panoptic model that trains on a CPU, with a class head that grows.

backbone (3 strided conv stages, GroupNorm) -> pixel decoder (FPN: per-pixel embeddings at stride
4 plus stride-8/16 memories) -> transformer decoder (N learned queries; per layer masked
cross-attention to one memory scale, round robin, then self-attention, then an FFN) -> per query a
linear classifier with C + 1 outputs (the last is "no object") and an MLP mask embedding; mask
logits = mask embedding . pixel embeddings. Predictions from every decoder layer are returned for
deep supervision, as in Mask2Former (Cheng et al., CVPR 2022).

Written here rather than taken from a library because torchvision has no Mask2Former and the
reference implementation (detectron2-based) is not installable offline; sizes are chosen so one
training step on 16 images of 64x64 takes tens of milliseconds on one core.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class NoObjectClassHead(nn.Module):
    """Linear classifier with ``n_classes + 1`` outputs whose last output is "no object".

    ``grow_to(n)`` adds rows for new classes between the old classes and the no-object row, so class
    indices never change and the no-object row stays last (``incremental.Trainer.model_adaptation``
    calls it with the number of classes seen). Old rows and the no-object row are copied exactly.
    """

    def __init__(self, in_features: int, n_classes: int) -> None:
        super().__init__()
        if n_classes < 1:
            raise ValueError(f"n_classes must be >= 1, got {n_classes}")
        self.in_features = in_features
        self.linear = nn.Linear(in_features, n_classes + 1)

    @property
    def n_classes(self) -> int:
        return self.linear.out_features - 1

    #: False when the model answers new classes elsewhere (the query groups of
    #: ``incremental.panoptic.prompts``): the deployed head then keeps its size.
    growable = True

    def grow_to(self, n_classes: int) -> bool:
        old = self.linear
        n_old = old.out_features - 1
        if n_classes <= n_old or not self.growable:
            return False
        new = nn.Linear(self.in_features, n_classes + 1).to(old.weight.device, old.weight.dtype)
        with torch.no_grad():
            new.weight[:n_old] = old.weight[:n_old]
            new.bias[:n_old] = old.bias[:n_old]
            new.weight[-1] = old.weight[-1]
            new.bias[-1] = old.bias[-1]
        self.linear = new
        return True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


def _norm(channels: int) -> nn.GroupNorm:
    # GroupNorm, not BatchNorm: no running statistics that drift while fine-tuning on new-class data,
    # and the frozen old model behaves the same in train and eval mode.
    return nn.GroupNorm(min(8, channels), channels)


def _conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), _norm(cout), nn.ReLU(inplace=True))


class Backbone(nn.Module):
    """A stem at stride 2, then three stages at strides 4, 8, 16."""

    def __init__(self, channels: tuple[int, int, int] = (32, 64, 96)) -> None:
        super().__init__()
        c1, c2, c3 = channels
        self.stem = nn.Sequential(_conv(3, c1 // 2, 2), _conv(c1 // 2, c1 // 2))
        self.stage1 = nn.Sequential(_conv(c1 // 2, c1, 2), _conv(c1, c1))
        self.stage2 = nn.Sequential(_conv(c1, c2, 2), _conv(c2, c2))
        self.stage3 = nn.Sequential(_conv(c2, c3, 2), _conv(c3, c3))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        s2 = self.stem(x)
        s4 = self.stage1(s2)
        s8 = self.stage2(s4)
        s16 = self.stage3(s8)
        return [s2, s4, s8, s16]


class PixelDecoder(nn.Module):
    """FPN top-down path: memories at strides 16 and 8 (for the transformer decoder) and per-pixel
    mask features at stride 4, or at stride 2 (``mask_stride=2``: one more FPN level on the stem,
    for thin shapes, at about a third more compute)."""

    def __init__(self, in_channels: tuple[int, int, int, int], dim: int, mask_dim: int, mask_stride: int = 4) -> None:
        super().__init__()
        if mask_stride not in (2, 4):
            raise ValueError(f"mask_stride must be 2 or 4, got {mask_stride}")
        self.mask_stride = mask_stride
        levels = in_channels if mask_stride == 2 else in_channels[1:]
        self.lateral = nn.ModuleList(nn.Conv2d(c, dim, 1) for c in levels)
        self.output = nn.ModuleList(_conv(dim, dim) for _ in levels)
        self.mask_features = nn.Conv2d(dim, mask_dim, 1)

    def forward(self, feats: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        levels = feats if self.mask_stride == 2 else feats[1:]
        outs: list[torch.Tensor] = []
        top: torch.Tensor | None = None
        for k in range(len(levels) - 1, -1, -1):  # coarsest first
            x = self.lateral[k](levels[k])
            if top is not None:
                x = x + F.interpolate(top, size=x.shape[-2:], mode="nearest")
            top = self.output[k](x)
            outs.append(top)
        return self.mask_features(outs[-1]), outs[:2]  # memories: strides 16 and 8


def sine_position(h: int, w: int, dim: int, device: torch.device) -> torch.Tensor:
    """2-D sine position encoding (h * w, dim), as DETR / Mask2Former: half the channels for y."""
    quarter = dim // 4
    freq = 1.0 / (10000 ** (torch.arange(quarter, device=device, dtype=torch.float32) / quarter))
    ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h * 2 * math.pi
    xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w * 2 * math.pi
    py = ys[:, None] * freq[None]  # (h, q)
    px = xs[:, None] * freq[None]  # (w, q)
    pos_y = torch.cat([py.sin(), py.cos()], -1)[:, None, :].expand(h, w, 2 * quarter)
    pos_x = torch.cat([px.sin(), px.cos()], -1)[None, :, :].expand(h, w, 2 * quarter)
    pos = torch.cat([pos_y, pos_x], -1).reshape(h * w, 4 * quarter)
    if pos.shape[1] < dim:
        pos = F.pad(pos, (0, dim - pos.shape[1]))
    return pos


class DecoderLayer(nn.Module):
    """Masked cross-attention -> self-attention -> FFN, post-norm (Mask2Former's order)."""

    def __init__(self, dim: int, heads: int, ffn: int) -> None:
        super().__init__()
        self.cross = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.self_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn), nn.ReLU(inplace=True), nn.Linear(ffn, dim))
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, q: torch.Tensor, qpos: torch.Tensor, memory: torch.Tensor, mpos: torch.Tensor,
                attn_mask: torch.Tensor | None, context: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """``context`` (queries, their positions): other queries that these attend to as well in
        self-attention, without attending back (a query group reading the deployed queries)."""
        q = self.norm1(q + self.cross(q + qpos, memory + mpos, memory, attn_mask=attn_mask, need_weights=False)[0])
        if context is None:
            q = self.norm2(q + self.self_attn(q + qpos, q + qpos, q, need_weights=False)[0])
        else:
            keys = torch.cat([context[0] + context[1], q + qpos], 1)
            q = self.norm2(q + self.self_attn(q + qpos, keys, torch.cat([context[0], q], 1), need_weights=False)[0])
        return self.norm3(q + self.ffn(q))


class PanopticMask2Former(nn.Module):
    """Small Mask2Former. ``forward(images)`` returns ``{"pred_logits": (B, N, C+1), "pred_masks":
    (B, N, H/s, W/s) mask logits (s = ``mask_stride``), "aux_outputs": [same for every earlier
    decoder stage]}``."""

    def __init__(self, n_classes: int, n_queries: int = 16, hidden_dim: int = 64, n_layers: int = 3,
                 n_heads: int = 4, ffn_dim: int = 128, mask_dim: int = 64,
                 backbone_channels: tuple[int, int, int] | list[int] = (32, 64, 96), mask_stride: int = 4) -> None:
        super().__init__()
        if n_queries < 1 or n_layers < 1:
            raise ValueError(f"n_queries and n_layers must be >= 1, got {n_queries}, {n_layers}")
        if hidden_dim % n_heads:
            raise ValueError(f"hidden_dim ({hidden_dim}) must be a multiple of n_heads ({n_heads})")
        channels = tuple(int(c) for c in backbone_channels)
        if len(channels) != 3:
            raise ValueError(f"backbone_channels must have 3 entries, got {list(channels)}")
        self.config: dict[str, Any] = dict(n_classes=n_classes, n_queries=n_queries, hidden_dim=hidden_dim,
                                           n_layers=n_layers, n_heads=n_heads, ffn_dim=ffn_dim, mask_dim=mask_dim,
                                           backbone_channels=list(channels), mask_stride=mask_stride)
        self.n_heads = n_heads
        self.backbone = Backbone(channels)
        self.pixel_decoder = PixelDecoder((channels[0] // 2, *channels), hidden_dim, mask_dim, mask_stride)
        self.query_feat = nn.Embedding(n_queries, hidden_dim)
        self.query_pos = nn.Embedding(n_queries, hidden_dim)
        self.level_embed = nn.Embedding(2, hidden_dim)
        self.layers = nn.ModuleList(DecoderLayer(hidden_dim, n_heads, ffn_dim) for _ in range(n_layers))
        self.out_norm = nn.LayerNorm(hidden_dim)
        self.class_head = NoObjectClassHead(hidden_dim, n_classes)
        self.mask_embed = nn.Sequential(nn.Linear(hidden_dim, hidden_dim), nn.ReLU(inplace=True),
                                        nn.Linear(hidden_dim, hidden_dim), nn.ReLU(inplace=True),
                                        nn.Linear(hidden_dim, mask_dim))

    @property
    def n_classes(self) -> int:
        return self.class_head.n_classes

    def _predict(self, q: torch.Tensor, mask_features: torch.Tensor, attn_size: tuple[int, int] | None,
                 class_head: nn.Module | None = None, mask_embed: nn.Module | None = None,
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Class logits, mask logits and (for the next layer) the attention mask: a query attends only
        where its current mask is above 0.5, or everywhere if that is nowhere. ``class_head`` and
        ``mask_embed`` replace the model's own for queries that have their own (query groups)."""
        q = self.out_norm(q)
        logits = (self.class_head if class_head is None else class_head)(q)
        embed = self.mask_embed if mask_embed is None else mask_embed
        masks = torch.einsum("bqc,bchw->bqhw", embed(q), mask_features)
        if attn_size is None:
            return logits, masks, None
        small = F.interpolate(masks, size=attn_size, mode="bilinear", align_corners=False)
        blocked = (small.sigmoid() < 0.5).flatten(2)  # (B, N, HW)
        blocked[blocked.all(-1)] = False
        attn_mask = blocked.repeat_interleave(self.n_heads, dim=0).detach()
        return logits, masks, attn_mask

    def grow_to(self, n_classes: int) -> bool:
        """Answer ``n_classes`` classes (the class head grows; ``Trainer.model_adaptation`` calls it)."""
        return self.class_head.grow_to(n_classes)

    def arch_kwargs(self) -> dict[str, Any]:
        """What ``build_panoptic_model`` needs to rebuild this model as it is now (a package's ``arch_kwargs``)."""
        return {**self.config, "n_classes": self.n_classes}

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor],
                                                    list[tuple[int, int]]]:
        """Per-pixel mask features and, per memory scale, the flattened memory, its positions and size."""
        return self.memories(self.backbone(images))

    def memories(self, feats: list[torch.Tensor], pixel_decoder: nn.Module | None = None,
                 ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor], list[tuple[int, int]]]:
        """``encode`` from the backbone's features on (``pixel_decoder``: a query group's own)."""
        mask_features, memories = (self.pixel_decoder if pixel_decoder is None else pixel_decoder)(feats)
        b = feats[0].shape[0]
        mems, poss, sizes = [], [], []
        for level, mem in enumerate(memories):
            h, w = mem.shape[-2:]
            mems.append(mem.flatten(2).transpose(1, 2) + self.level_embed.weight[level])
            poss.append(sine_position(h, w, mem.shape[1], mem.device)[None].expand(b, -1, -1))
            sizes.append((h, w))
        return mask_features, mems, poss, sizes

    def forward(self, images: torch.Tensor) -> dict[str, Any]:
        mask_features, mems, poss, sizes = self.encode(images)
        b = images.shape[0]
        q = self.query_feat.weight[None].expand(b, -1, -1)
        qpos = self.query_pos.weight[None].expand(b, -1, -1)
        outputs, _ = self.decode(q, qpos, mask_features, mems, poss, sizes)
        return stage_outputs(outputs)

    def decode(self, q: torch.Tensor, qpos: torch.Tensor, mask_features: torch.Tensor, mems: list[torch.Tensor],
               poss: list[torch.Tensor], sizes: list[tuple[int, int]], *, layers: nn.ModuleList | None = None,
               class_head: nn.Module | None = None, mask_embed: nn.Module | None = None,
               prompts: torch.Tensor | None = None, context: tuple[list[torch.Tensor], torch.Tensor] | None = None,
               ) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], list[torch.Tensor]]:
        """The transformer decoder: (class logits, mask logits) of every stage, and the queries that
        entered each layer. The keyword arguments serve query groups (``incremental.panoptic.prompts``):
        their own layers, heads and per-layer prompts (added to the queries before each layer), and
        ``context`` = (the deployed queries entering each layer, their positions) to attend to."""
        layers = self.layers if layers is None else layers
        outputs, states = [], []
        logits, masks, attn_mask = self._predict(q, mask_features, sizes[0], class_head, mask_embed)
        outputs.append((logits, masks))
        for i, layer in enumerate(layers):
            level = i % len(mems)
            states.append(q)
            if prompts is not None:
                q = q + prompts[i]
            q = layer(q, qpos, mems[level], poss[level], attn_mask,
                      None if context is None else (context[0][i], context[1]))
            next_size = sizes[(i + 1) % len(mems)] if i + 1 < len(layers) else None
            logits, masks, attn_mask = self._predict(q, mask_features, next_size, class_head, mask_embed)
            outputs.append((logits, masks))
        return outputs, states


def stage_outputs(outputs: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, Any]:
    """The model's output dict from every decoder stage's (class logits, mask logits), in decoder order:
    the last stage is the prediction, the earlier ones the deep-supervision outputs."""
    last_logits, last_masks = outputs[-1]
    return {
        "pred_logits": last_logits,
        "pred_masks": last_masks,
        "aux_outputs": [{"pred_logits": lg, "pred_masks": mk} for lg, mk in outputs[:-1]],
    }


def build_panoptic_model(**kwargs: Any) -> PanopticMask2Former:
    """The architecture a panoptic model package names (``kwargs`` as in ``model.config``); with
    ``prompt_queries`` > 0 the model learns each update's classes with query groups of its own."""
    if kwargs.get("prompt_queries"):
        from .prompts import PromptedMask2Former

        return PromptedMask2Former(**kwargs)
    # the query-group settings (every ``prompt_*`` key) mean nothing to the plain model
    return PanopticMask2Former(**{k: v for k, v in kwargs.items() if not k.startswith("prompt_")})
