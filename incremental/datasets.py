"""Reading users' classification data: ImageFolder directories and ``.npz`` arrays.

ImageFolder (one sub-folder per class name) is read with torchvision's ``ImageFolder``; images are
converted to the model's input (channels, size) and scaled to [0, 1], the way the model was trained.
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


def load_image_folder(path: Path, channels: int, size: tuple[int, int], max_value: float = 1.0) -> LabelledData:
    from torchvision import transforms
    from torchvision.datasets import ImageFolder

    steps = [transforms.Grayscale(1)] if channels == 1 else [transforms.Lambda(lambda im: im.convert("RGB"))]
    steps += [transforms.Resize(size), transforms.ToTensor()]
    try:
        folder = ImageFolder(str(path), transform=transforms.Compose(steps))
    except (FileNotFoundError, RuntimeError) as exc:
        raise DataError(f"{path}: not an ImageFolder directory ({str(exc).splitlines()[0]})") from None
    xs, ys = [], []
    for file, label in folder.samples:
        try:
            x = folder.transform(folder.loader(file))
        except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad files
            reason = str(exc).splitlines()[0] if str(exc) else ""
            raise DataError(f"{file}: cannot be read as an image ({type(exc).__name__}: {reason})") from None
        xs.append(x * max_value)
        ys.append(label)
    return LabelledData(torch.stack(xs), torch.tensor(ys, dtype=torch.long), list(folder.classes), path)


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


def load_npz(path: Path) -> LabelledData:
    x, y, class_names = read_npz_arrays(path)
    assert class_names is not None
    with np.errstate(over="ignore"):
        x32 = np.asarray(x, dtype=np.float32)  # a value beyond float32 becomes inf: load_classification_data refuses it
    return LabelledData(torch.from_numpy(x32), torch.from_numpy(y.astype(np.int64)), class_names, path)


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


def load_classification_data(path: str | Path, channels: int, size: tuple[int, int], max_value: float = 1.0) -> LabelledData:
    """ImageFolder directory or ``.npz`` file, by what ``path`` is."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"data {str(path)!r} does not exist")
    data = load_npz(path) if path.is_file() else load_image_folder(path, channels, size, max_value)
    if len(data.y) == 0:
        raise DataError(f"{path}: contains no samples")
    require_finite(data.x, path)
    dupes = sorted({n for n in data.class_names if data.class_names.count(n) > 1})
    if dupes:
        raise DataError(f"{path}: class names appear more than once: {dupes}")
    return data


def save_image_folder(root: Path, images: np.ndarray, labels: np.ndarray, class_names: list[str], max_value: float = 16.0) -> None:
    """Write grayscale images as PNGs in ``root/<class name>/NNNNN.png`` (demo data, tests)."""
    from PIL import Image

    for i, (img, label) in enumerate(zip(images, labels)):
        folder = root / class_names[int(label)]
        folder.mkdir(parents=True, exist_ok=True)
        pixels = np.clip(np.asarray(img, dtype=np.float64) / max_value * 255.0, 0, 255).astype(np.uint8)
        Image.fromarray(pixels, mode="L").save(folder / f"{i:05d}.png")
