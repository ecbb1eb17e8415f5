"""HydraNet: one shared conv trunk, multi-level feature fusion, one head per task.

Multi-level fusion (METHODS section 1): with many heads on one small trunk, the last stage's
features are pulled towards whatever the dominant tasks need, and low-level information (blur, noise,
exact positions) that some heads need is lost by then. So the heads do not read only stage n: stage 1
(low level), stage j = ceil(n/2) (middle; n/2 for even n, (n+1)/2 for odd) and stage n (high level) are
each average-pooled to stage n's spatial size, concatenated on channels, mixed by a 1x1 conv, and the
result feeds every head. ``fusion=False`` (the ablation) feeds stage n alone through a 1x1 conv of the
same output width, so the two variants differ only in what reaches the heads.

Heads are declared by task type through :class:`~incremental.multitask.tasks.TaskSpec`: a small MLP on
the flattened fused map (flattened, not globally pooled, so that landmark heads keep the layout),
ending in ``spec.dim`` outputs; regression and points heads output ``offset + scale * z``.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from .tasks import TaskSpec


def middle_stage(n_stages: int) -> int:
    """1-based index j of the middle stage: n/2 for even n, (n+1)/2 for odd n (1 < j < n for n > 2)."""
    if n_stages <= 2:
        raise ValueError(f"multi-level fusion needs more than 2 stages, got {n_stages}")
    return (n_stages + 1) // 2


class ConvStage(nn.Module):
    """Conv 3x3 stride 2 -> BN -> ReLU, then ``convs - 1`` more conv 3x3 -> BN -> ReLU (halves the size)."""

    def __init__(self, c_in: int, c_out: int, convs: int = 1) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c_out),
                                   nn.ReLU(inplace=True)]
        for _ in range(convs - 1):
            layers += [nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class TaskHead(nn.Module):
    """Linear -> ReLU -> Linear to ``spec.dim`` outputs; regression / points rescaled to label units."""

    def __init__(self, spec: TaskSpec, in_features: int, hidden: int) -> None:
        super().__init__()
        self.spec = spec
        self.net = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, spec.dim))
        offset = torch.tensor(spec.offset or [0.0] * spec.dim, dtype=torch.float32)
        scale = torch.tensor(spec.scale or [1.0] * spec.dim, dtype=torch.float32)
        self.register_buffer("offset", offset)
        self.register_buffer("scale", scale)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        z = self.net(features)
        if self.spec.kind in ("regression", "points"):
            z = self.offset + self.scale * z
        if self.spec.kind == "binary" or (self.spec.kind == "regression" and self.spec.dim == 1):
            return z.reshape(-1)
        return z


class HydraNet(nn.Module):
    """Shared trunk of ``len(channels)`` conv stages, multi-level fusion, one head per task.

    ``forward(x)`` returns ``{task name: output}``: (N,) for binary and one-value regression tasks
    (binary as logits), (N, dim) otherwise. ``last_shared_layer`` is the fusion conv, the layer whose
    weights every head reads: GradNorm measures per-task gradient norms there.
    """

    def __init__(
        self,
        tasks: Sequence[TaskSpec],
        *,
        in_channels: int = 3,
        image_size: int = 64,
        channels: Sequence[int] = (16, 24, 32, 48),
        convs_per_stage: int = 1,
        fusion: bool = True,
        fusion_channels: int = 32,
        head_hidden: int = 64,
    ) -> None:
        super().__init__()
        if not tasks:
            raise ValueError("HydraNet needs at least one task")
        channels = list(channels)
        n = len(channels)
        if n < 3:
            raise ValueError(f"HydraNet needs at least 3 conv stages, got {n}")
        if convs_per_stage < 1:
            raise ValueError(f"convs_per_stage must be >= 1, got {convs_per_stage}")
        out_size = image_size // (2**n)
        if out_size < 1 or image_size % (2**n):
            raise ValueError(f"image_size {image_size} must be divisible by 2**{n} (one halving per stage)")
        self.tasks = list(tasks)
        self.fusion = bool(fusion)
        self.middle = middle_stage(n)
        stages, c_prev = [], in_channels
        for c in channels:
            stages.append(ConvStage(c_prev, c, convs_per_stage))
            c_prev = c
        self.stages = nn.ModuleList(stages)
        fused_in = channels[0] + channels[self.middle - 1] + channels[-1] if self.fusion else channels[-1]
        self.fuse = nn.Sequential(nn.Conv2d(fused_in, fusion_channels, 1, bias=False), nn.BatchNorm2d(fusion_channels),
                                  nn.ReLU(inplace=True))
        self.out_size = out_size
        features = fusion_channels * out_size * out_size
        self.heads = nn.ModuleDict({t.name: TaskHead(t, features, head_hidden) for t in self.tasks})

    @property
    def last_shared_layer(self) -> nn.Conv2d:
        return self.fuse[0]

    def shared_features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, fusion_channels * s * s) features every head reads."""
        levels = []
        for stage in self.stages:
            x = stage(x)
            levels.append(x)
        if self.fusion:
            size = levels[-1].shape[-2:]
            picked = [levels[0], levels[self.middle - 1], levels[-1]]
            x = torch.cat([F.adaptive_avg_pool2d(level, size) for level in picked], dim=1)
        return self.fuse(x).flatten(1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.shared_features(x)
        return {name: head(features) for name, head in self.heads.items()}
