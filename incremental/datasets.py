"""Checks shared by every reader of users' classification data (``incremental.sources`` for runs,
``incremental.preprocessing.load_labelled`` for updates).

Every problem is a :class:`DataError` naming the file and what is wrong with it: also a sample holding
NaN or inf (named by its index), which would otherwise turn every weight of the updated model into NaN,
and an ``.npz`` array of Python objects, which numpy refuses to read without unpickling.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .config import InputError
from .guards import first_non_finite


class DataError(InputError):
    """A data file or directory that cannot be used; one line naming the file and what is wrong."""


@dataclass
class LabelledData:
    x: torch.Tensor  # float32, (N, *input_shape)
    y: torch.Tensor  # int64 indices into class_names
    class_names: list[str]
    source: Path


def read_npz_arrays(path: Path, require_class_names: bool = True) -> tuple[np.ndarray, np.ndarray, list[str] | None]:
    """``x``, ``y`` (integer class indices) and ``class_names`` of an ``.npz`` file, checked.

    Pickled object arrays are refused (``allow_pickle=False``): loading never runs code from the file.
    """
    try:
        data = np.load(path, allow_pickle=False)
    except Exception as exc:  # noqa: BLE001
        raise DataError(f"{path}: not a readable .npz file ({_first_line(exc)})") from None
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise DataError(f"{path}: a single numpy array, not an .npz archive of x, y and class_names (numpy.savez)")
    required = ("x", "y", "class_names") if require_class_names else ("x", "y")
    with data:
        for key in required:
            if key not in data.files:
                raise DataError(f"{path}: missing array {key!r} (it has {', '.join(data.files) or 'nothing'})")
        x, y = _npz_array(data, "x", path), _npz_array(data, "y", path)
        names = _npz_array(data, "class_names", path) if "class_names" in data.files else None
    if x.ndim == 0 or y.ndim != 1:
        raise DataError(f"{path}: x must hold one row per sample and y one label per sample "
                        f"(got shapes {x.shape} and {y.shape})")
    if len(x) != len(y):
        raise DataError(f"{path}: x has {len(x)} samples but y has {len(y)}")
    if x.dtype.kind not in "biuf":
        raise DataError(f"{path}: x must hold numbers, got dtype {x.dtype}")
    if y.dtype.kind not in "iu":
        raise DataError(f"{path}: y must hold integer class indices, got dtype {y.dtype}")
    class_names = None
    if names is not None:
        if names.dtype.kind not in "US" or names.ndim != 1:
            raise DataError(f"{path}: class_names must be a list of strings, got dtype {names.dtype} shape {names.shape}")
        class_names = [str(n) for n in names.tolist()]
        if len(y) and (y.min() < 0 or y.max() >= len(class_names)):
            raise DataError(f"{path}: y holds index {int(y.max() if y.max() >= len(class_names) else y.min())}, "
                            f"outside class_names (0..{len(class_names) - 1})")
    elif len(y) and y.min() < 0:
        raise DataError(f"{path}: y holds the negative class index {int(y.min())}")
    return x, y, class_names


def _npz_array(data: np.lib.npyio.NpzFile, key: str, path: Path) -> np.ndarray:
    try:
        return data[key]
    except ValueError as exc:
        if "allow_pickle" in str(exc):
            raise DataError(f"{path}: array {key!r} holds Python objects (dtype object), which are not read "
                            "because loading them could run code; save numbers and strings") from None
        raise DataError(f"{path}: array {key!r} cannot be read ({_first_line(exc)})") from None
    except Exception as exc:  # noqa: BLE001 - a damaged archive fails in zipfile, zlib or numpy
        raise DataError(f"{path}: array {key!r} cannot be read ({_first_line(exc)})") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


def require_finite(x: np.ndarray | torch.Tensor, source: str | Path, name: str = "x") -> None:
    """Refuse samples holding NaN or inf with one line naming the file and the first bad index."""
    bad = first_non_finite(x)
    if bad is not None:
        index, value = bad
        raise DataError(f"{source}: sample {name}[{index}] holds {value}; NaN and infinite values (also values "
                        "too large for float32) are refused")


def save_image_folder(root: Path, images: np.ndarray, labels: np.ndarray, class_names: list[str], max_value: float = 16.0) -> None:
    """Write grayscale images as PNGs in ``root/<class name>/NNNNN.png`` (demo data, tests)."""
    from PIL import Image

    for i, (img, label) in enumerate(zip(images, labels)):
        folder = root / class_names[int(label)]
        folder.mkdir(parents=True, exist_ok=True)
        pixels = np.clip(np.asarray(img, dtype=np.float64) / max_value * 255.0, 0, 255).astype(np.uint8)
        Image.fromarray(pixels, mode="L").save(folder / f"{i:05d}.png")
