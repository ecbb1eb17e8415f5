"""A classifier's input preprocessing, stored once in its package and applied wherever data meets it.

A model only works on inputs prepared the way it was trained: the same size, the same pixel scale,
the same mean / std normalisation. :class:`Preprocessing` is that recipe. It is written into the
package (``extra["input"]``) by ``incremental package``, ``incremental run`` and ``incremental update``,
and read back by every command that feeds the model: ``update`` (new data, ``--old-data``, the
report's evaluation) and ``predict``. Nobody re-types it, so nobody gets it wrong.

The steps, in order, for an image (file or array):

1. channels: converted to ``channels`` (grayscale <-> RGB);
2. size: resized to ``size`` (H, W); or, with ``resize`` set, the shorter side resized to ``resize`` and
   the centre ``size`` cropped (torchvision's evaluation recipe: resize 256, crop 224);
3. scale: ``uint8`` pixels become ``[0, max_value]`` (``max_value`` 1: ``[0, 1]``, as ``ToTensor``);
   float arrays are taken as already in that scale;
4. normalisation: ``(x - mean) / std`` per channel when ``mean`` / ``std`` are set;
5. ``flat``: the image is flattened to one vector (models that take ``(N, C*H*W)``).

Package format (``extra["input"]``): ``{"channels", "size": [H, W], "flat", "max_value", "resize"?,
"normalize"?: {"mean", "std"}}``; packages written before this module have no ``resize`` and no
``normalize`` and mean exactly what they meant then.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from .datasets import DataError, LabelledData

#: What a package without an ``input`` entry takes (the project's first packages: flat 8x8 digits).
LEGACY_INPUT: dict[str, Any] = {"channels": 1, "size": [8, 8], "max_value": 1.0, "flat": True}


@dataclass
class Preprocessing:
    """How an image becomes the input of a classifier (see the module docstring for the steps)."""

    channels: int = 3
    size: tuple[int, int] = (224, 224)
    flat: bool = False
    max_value: float = 1.0
    mean: list[float] | None = None
    std: list[float] | None = None
    resize: int | None = None

    def __post_init__(self) -> None:
        # Values come from flags and from package files: a wrong type is named, never a bare TypeError.
        self.size = as_pair(self.size, "size")
        self.channels = _converted(self.channels, "channels", int)
        if not isinstance(self.flat, bool):
            raise ValueError(f"preprocessing.flat: must be true or false, got {self.flat!r:.80}")
        self.max_value = _converted(self.max_value, "max_value", float)
        if self.mean is not None:
            self.mean = _converted(self.mean, "mean", lambda v: [float(e) for e in v])
        if self.std is not None:
            self.std = _converted(self.std, "std", lambda v: [float(e) for e in v])
        self.resize = None if self.resize is None else _converted(self.resize, "resize", int)
        self.validate()

    def validate(self) -> None:
        if self.channels not in (1, 3):
            raise ValueError(f"preprocessing.channels: must be 1 or 3, got {self.channels}")
        if min(self.size) < 1:
            raise ValueError(f"preprocessing.size: must be >= 1, got {list(self.size)}")
        if not (self.max_value > 0 and math.isfinite(self.max_value)):
            raise ValueError(f"preprocessing.max_value: must be a positive number, got {self.max_value}")
        if (self.mean is None) != (self.std is None):
            raise ValueError("preprocessing: --mean and --std go together (one value per channel, or one for all)")
        if self.mean is not None and self.std is not None:
            for name, values in (("mean", self.mean), ("std", self.std)):
                if len(values) not in (1, self.channels):
                    raise ValueError(f"preprocessing.{name}: needs 1 or {self.channels} values (one per channel), "
                                     f"got {len(values)}: {values}")
                if not all(math.isfinite(v) for v in values):
                    raise ValueError(f"preprocessing.{name}: must be finite numbers, got {values}")
            if not all(s > 0 for s in self.std):
                raise ValueError(f"preprocessing.std: must be > 0, got {self.std}")
        if self.resize is not None and self.resize < max(self.size):
            raise ValueError(f"preprocessing.resize: the shorter side ({self.resize}) must be at least the crop "
                             f"size {list(self.size)}")

    # ------------------------------------------------------------------ storage
    @classmethod
    def from_any(cls, value: "Preprocessing | Mapping[str, Any] | None", **defaults: Any) -> "Preprocessing":
        """From a :class:`Preprocessing`, a package ``input`` dict (``size`` an int or ``[H, W]``,
        ``normalize: {mean, std}`` or top-level ``mean`` / ``std``) or None (``defaults`` only)."""
        if isinstance(value, cls):
            return value
        given = dict(defaults)
        for key, v in dict(value or {}).items():
            if key == "normalize":
                if v:
                    given["mean"], given["std"] = v.get("mean"), v.get("std")
            elif key == "input_size":
                given["size"] = v
            elif key in ("channels", "size", "flat", "max_value", "mean", "std", "resize"):
                given[key] = v
            else:
                raise ValueError(f"preprocessing: unknown entry {key!r}; known: channels, size, flat, max_value, "
                                 "mean, std, resize")
        return cls(**given)

    @classmethod
    def of_package(cls, package: Any) -> "Preprocessing":
        """What a classifier package says its model takes (legacy packages: flat 8x8 digits)."""
        return cls.from_any({**LEGACY_INPUT, **dict(package.extra.get("input") or {})})

    def to_extra(self) -> dict[str, Any]:
        """The package's ``extra["input"]`` entry."""
        out: dict[str, Any] = {"channels": self.channels, "size": list(self.size), "flat": self.flat,
                               "max_value": self.max_value}
        if self.resize is not None:
            out["resize"] = self.resize
        if self.mean is not None:
            out["normalize"] = {"mean": list(self.mean), "std": list(self.std or [])}
        return out

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one model input: ``(C*H*W,)`` when flat, else ``(C, H, W)``."""
        c, (h, w) = self.channels, self.size
        return (c * h * w,) if self.flat else (c, h, w)

    def describe(self) -> str:
        """One line for people: ``3x224x224 (resize 256, centre crop), pixels in [0, 1], normalised ...``."""
        h, w = self.size
        text = f"{self.channels}x{h}x{w}"
        if self.resize is not None:
            text += f" (shorter side resized to {self.resize}, centre crop)"
        if self.flat:
            text += " flattened"
        text += f", pixels in [0, {self.max_value:g}]"
        if self.mean is not None:
            text += f", normalised with mean {self.mean} std {self.std}"
        else:
            text += ", not normalised"
        return text

    # ------------------------------------------------------------------ applying it
    def __call__(self, x: torch.Tensor, origin: str = "samples") -> torch.Tensor:
        """A batch of raw images ``(N, C, H, W)`` (uint8, or float in the model's pixel scale), or flat
        ``(N, F)`` vectors with ``F = C*H*W`` or ``F = H*W``, as model inputs (float32). ``origin`` names
        the data in errors."""
        if x.dim() >= 2 and 0 in x.shape[1:]:
            raise DataError(f"{origin}: samples of shape {tuple(x.shape[1:])} hold no pixels")
        if len(x) == 0:
            return torch.zeros((0, *self.input_shape))
        if x.dim() == 2:
            x = self._unflatten(x, origin)
        if x.dim() != 4:
            raise DataError(f"{origin}: samples must be images (N, C, H, W) or vectors (N, F), got shape {tuple(x.shape)}")
        is_uint8 = x.dtype == torch.uint8
        x = self._channels(x, origin)
        x = self._resize(x)
        x = x.float()
        if is_uint8:
            x = x * (self.max_value / 255.0)
        if self.mean is not None and self.std is not None:
            mean = torch.tensor(self.mean, dtype=x.dtype).view(1, -1, 1, 1)
            std = torch.tensor(self.std, dtype=x.dtype).view(1, -1, 1, 1)
            x = (x - mean) / std
        return x.reshape(len(x), -1) if self.flat else x.contiguous()

    def _unflatten(self, x: torch.Tensor, origin: str) -> torch.Tensor:
        h, w = self.size
        f = x.shape[1]
        for c in (self.channels, 1, 3):
            if f == c * h * w:
                return x.view(len(x), c, h, w)
        side = math.isqrt(f)
        if side * side == f and not self.flat:  # a square one-channel image of another size: resized below
            return x.view(len(x), 1, side, side)
        raise DataError(f"{origin}: samples have {f} values, the model takes {self.channels * h * w} "
                        f"({self.channels}x{h}x{w})")

    def _channels(self, x: torch.Tensor, origin: str) -> torch.Tensor:
        c = x.shape[1]
        if c == self.channels:
            return x
        if c == 1 and self.channels == 3:
            return x.expand(-1, 3, -1, -1)
        if c in (3, 4) and self.channels == 1:
            weights = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)  # ITU-R 601 luma, as PIL's "L"
            gray = (x[:, :3].float() * weights).sum(1, keepdim=True)
            return gray.round().clamp(0, 255).to(torch.uint8) if x.dtype == torch.uint8 else gray
        if c == 4 and self.channels == 3:
            return x[:, :3]
        raise DataError(f"{origin}: images have {c} channels, the model takes {self.channels}")

    def _resize(self, x: torch.Tensor) -> torch.Tensor:
        from torchvision.transforms.v2 import functional as F

        h, w = self.size
        if self.resize is not None:
            if min(x.shape[-2:]) != self.resize:
                x = F.resize(x, [self.resize], antialias=True)
            return F.center_crop(x, [h, w])
        if tuple(x.shape[-2:]) != (h, w):
            x = F.resize(x, [h, w], antialias=True)
        return x

    # ------------------------------------------------------------------ reading data
    def load_files(self, files: Sequence[str | Path]) -> torch.Tensor:
        """Image files as model inputs, one ``(N, *input_shape)`` tensor."""
        if not files:
            return torch.zeros((0, *self.input_shape))
        return torch.stack([self(decode(f, self.channels).unsqueeze(0), str(f))[0] for f in files])

    def load_array(self, x: np.ndarray, origin: str) -> torch.Tensor:
        """An ``.npz`` array of samples (any layout :func:`incremental.sources.images_from_array` reads)."""
        from .sources import images_from_array

        return self(images_from_array(x, origin), origin)


def _converted(value: Any, name: str, kind: Any) -> Any:
    """``kind(value)`` for a plain number (or list of numbers), else a ValueError naming the field."""
    if isinstance(value, (bool, torch.Tensor, np.ndarray)) or (kind is not float and kind is not int
                                                                and isinstance(value, (str, bytes))):
        raise ValueError(f"preprocessing.{name}: must be {'a number' if kind in (int, float) else 'a list of numbers'}, "
                         f"got {type(value).__name__}")
    try:
        return kind(value)
    except (TypeError, ValueError, OverflowError):  # OverflowError: int(inf)
        raise ValueError(f"preprocessing.{name}: must be {'a number' if kind in (int, float) else 'a list of numbers'}, "
                         f"got {value!r:.80}") from None


def as_pair(size: Any, name: str) -> tuple[int, int]:
    if isinstance(size, (int, np.integer)) and not isinstance(size, bool):
        return (int(size), int(size))
    if not isinstance(size, (list, tuple)):
        raise ValueError(f"preprocessing.{name}: must be one size or [height, width], got {type(size).__name__}")
    values = [_converted(v, name, int) for v in size]
    if len(values) == 1:
        return (values[0], values[0])
    if len(values) != 2:
        raise ValueError(f"preprocessing.{name}: must be one size or [height, width], got {list(size)}")
    return (values[0], values[1])


def decode(path: str | Path, channels: int) -> torch.Tensor:
    """One image file as ``uint8 (channels, H, W)``; a file PIL cannot read is a DataError naming it."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("L" if channels == 1 else "RGB"), dtype=np.uint8)
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad files
        raise DataError(f"{path}: cannot be read as an image ({type(exc).__name__}: {exc})") from None
    tensor = torch.from_numpy(pixels.copy())
    return tensor.unsqueeze(0) if channels == 1 else tensor.permute(2, 0, 1).contiguous()


def image_files(root: str | Path) -> list[Path]:
    """Every image file below ``root`` (torchvision's image extensions), sorted by path."""
    from torchvision.datasets.folder import IMG_EXTENSIONS

    root = Path(root)
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS)


def load_labelled(path: str | Path, prep: Preprocessing) -> LabelledData:
    """A labelled data set as model inputs: an ImageFolder directory (``root/<class name>/*``) or an
    ``.npz`` file with ``x``, ``y`` and ``class_names``. Every problem is a one-line DataError."""
    from .datasets import read_npz_arrays
    from .sources import load_image_folder

    path = Path(path)
    if not path.exists():
        raise DataError(f"data {str(path)!r} does not exist")
    if path.is_file():
        x, y, names = read_npz_arrays(path)
        assert names is not None
        data = LabelledData(prep.load_array(x, str(path)), torch.from_numpy(y.astype(np.int64)), names, path)
    else:
        folder = load_image_folder(path, channels=prep.channels)
        data = LabelledData(prep.load_files(folder.files), folder.targets, list(folder.class_names), path)
    if len(data.y) == 0:
        raise DataError(f"{path}: contains no samples")
    dupes = sorted({n for n in data.class_names if data.class_names.count(n) > 1})
    if dupes:
        raise DataError(f"{path}: class names appear more than once: {dupes}")
    return data
