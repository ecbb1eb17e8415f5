"""Per-sample transforms from config, built from ``torchvision.transforms.v2``.

Sources give raw samples (``uint8`` images or float arrays); the *train* pipeline adds random
augmentation (run per sample, per epoch: an image is cropped differently every epoch), the *eval*
pipeline only what is deterministic (resize, scale to [0, 1], normalize). The history library keeps raw
samples and replays them through the train pipeline, so replayed samples are augmented like new ones.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .config import check


@dataclass
class RandomCropConfig:
    size: list[int] | int | None = None  # default: the image size (after resize)
    padding: int = 4

    def validate(self) -> None:
        check(self.padding >= 0, "scenario.transforms.random_crop.padding", f"must be >= 0, got {self.padding}")


@dataclass
class NormalizeConfig:
    mean: list[float] = field(default_factory=list)
    std: list[float] = field(default_factory=list)

    def validate(self) -> None:
        check(len(self.mean) >= 1 and len(self.mean) == len(self.std), "scenario.transforms.normalize",
              f"needs mean and std of the same length (one per channel), got {self.mean} and {self.std}")
        check(all(s > 0 for s in self.std), "scenario.transforms.normalize.std", f"must be > 0, got {self.std}")


@dataclass
class TransformsConfig:
    """``scenario.transforms``: ``resize`` [H, W] (or one side), ``random_crop`` {size, padding},
    ``horizontal_flip`` (probability), ``normalize`` {mean, std}."""

    resize: list[int] | int | None = None
    random_crop: RandomCropConfig | None = None
    horizontal_flip: float = 0.0
    normalize: NormalizeConfig | None = None

    def validate(self) -> None:
        if self.resize is not None:
            sides = [self.resize] if isinstance(self.resize, int) else self.resize
            check(len(sides) in (1, 2) and all(s >= 1 for s in sides), "scenario.transforms.resize",
                  f"must be a size or [height, width] >= 1, got {self.resize}")
        check(0.0 <= self.horizontal_flip <= 1.0, "scenario.transforms.horizontal_flip",
              f"must be a probability in [0, 1], got {self.horizontal_flip}")

    @property
    def is_random(self) -> bool:
        return self.random_crop is not None or self.horizontal_flip > 0

    def resize_hw(self) -> tuple[int, int] | None:
        if self.resize is None:
            return None
        sides = [self.resize] if isinstance(self.resize, int) else list(self.resize)
        return (sides[0], sides[-1])

    def image_only(self) -> list[str]:
        """Names of the set options that only make sense for images (refused for flat features)."""
        names = []
        if self.resize is not None:
            names.append("resize")
        if self.random_crop is not None:
            names.append("random_crop")
        if self.horizontal_flip > 0:
            names.append("horizontal_flip")
        return names


def _pair(size: list[int] | int) -> list[int]:
    return [size, size] if isinstance(size, int) else [size[0], size[-1]]


def build_pipelines(cfg: TransformsConfig, image_size: tuple[int, int] | None, resize_in_pipeline: bool
                    ) -> tuple[Callable[[Any], torch.Tensor], Callable[[Any], torch.Tensor]]:
    """(train, eval) per-sample pipelines for raw samples of size ``image_size`` (None: flat features).

    ``resize_in_pipeline`` is False for sources that already resize when decoding (image folders).
    """
    from torchvision.transforms import v2

    deterministic: list[Any] = []
    if image_size is not None and resize_in_pipeline and cfg.resize is not None:
        deterministic.append(v2.Resize(list(cfg.resize_hw()), antialias=True))
    random: list[Any] = []
    if cfg.random_crop is not None:
        size = cfg.random_crop.size if cfg.random_crop.size is not None else list(cfg.resize_hw() or image_size or ())
        random.append(v2.RandomCrop(_pair(size), padding=cfg.random_crop.padding))
    if cfg.horizontal_flip > 0:
        random.append(v2.RandomHorizontalFlip(cfg.horizontal_flip))
    # A crop to a smaller size than the image's is a centre crop at evaluation (the model's input size).
    center: list[Any] = []
    if cfg.random_crop is not None and cfg.random_crop.size is not None:
        center.append(v2.CenterCrop(_pair(cfg.random_crop.size)))
    tail: list[Any] = [v2.ToDtype(torch.float32, scale=True)]
    if cfg.normalize is not None:
        tail.append(v2.Normalize(list(cfg.normalize.mean), list(cfg.normalize.std)))
    return v2.Compose(deterministic + random + tail), v2.Compose(deterministic + center + tail)


def output_size(cfg: TransformsConfig, image_size: tuple[int, int]) -> tuple[int, int]:
    """The spatial size the model sees after the pipelines."""
    if cfg.random_crop is not None and cfg.random_crop.size is not None:
        h, w = _pair(cfg.random_crop.size)
        return (h, w)
    return cfg.resize_hw() or image_size


def shift_images(images: torch.Tensor, offsets: torch.Tensor, max_shift: int) -> torch.Tensor:
    """Each image ``n`` of ``(N, C, H, W)`` translated by ``offsets[:, n] - max_shift`` pixels (rows, then
    columns), the uncovered border filled with 0: a crop at ``offsets[:, n]`` of the zero-padded image.

    Why by hand: torchvision's transforms draw one crop per call, so a batch would share one shift; this
    gathers every sample's own crop in one indexing op, on the batch's device.
    """
    if images.dim() != 4:
        raise ValueError(f"expected (N, C, H, W) images, got shape {tuple(images.shape)}")
    n, _, h, w = images.shape
    if offsets.shape != (2, n) or int(offsets.min()) < 0 or int(offsets.max()) > 2 * max_shift:
        raise ValueError(f"expected (2, {n}) offsets in [0, {2 * max_shift}], got {tuple(offsets.shape)}")
    device = images.device
    padded = torch.nn.functional.pad(images, (max_shift,) * 4).permute(0, 2, 3, 1)  # (N, H+2s, W+2s, C)
    rows = offsets[0].to(device)[:, None] + torch.arange(h, device=device)
    cols = offsets[1].to(device)[:, None] + torch.arange(w, device=device)
    crops = padded[torch.arange(n, device=device)[:, None, None], rows[:, :, None], cols[:, None, :]]
    return crops.permute(0, 3, 1, 2).contiguous()


def random_shift(images: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """:func:`shift_images` with every sample's shift drawn uniformly from ``[-max_shift, max_shift]^2``
    by ``generator`` (a CPU generator: the draws do not depend on the device)."""
    offsets = torch.randint(0, 2 * max_shift + 1, (2, len(images)), generator=generator)
    return shift_images(images, offsets, max_shift)
