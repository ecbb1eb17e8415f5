"""Data sources for class-incremental scenarios: users' files and the standard data sets.

A source is a map-style ``Dataset`` whose item ``i`` is ``(raw sample, class index)``: the sample as it
comes from the data set, before any training transform. ``targets`` (the class of every sample) and
``class_names`` are known without reading a sample, so scenarios can be cut into experiences and the
history library can choose what to keep before anything is decoded.

Two kinds:
- :class:`ArraySource`: data that already is one array (``.npz``, MNIST-format IDX, the arrays
  torchvision's data sets hold, scikit-learn's digits). Images are ``uint8`` or float ``(N, C, H, W)``;
  feature vectors are float ``(N, F)``.
- :class:`ImageFolderSource`: one file per sample in class folders, decoded when a sample is asked for
  (a data set larger than memory streams through it).

Every problem is a one-line :class:`~incremental.datasets.DataError` naming the path or value.
"""
from __future__ import annotations

import gzip
import zlib
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from .datasets import DataError, read_npz_arrays

#: Where Debian's ``dataset-fashion-mnist`` package puts the four IDX files.
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
TORCHVISION_DATASETS = ("MNIST", "FashionMNIST", "KMNIST", "CIFAR10", "CIFAR100", "SVHN")


class ArraySource(Dataset):
    """Samples held as one tensor: ``x`` uint8/float ``(N, C, H, W)`` images or float ``(N, F)`` features."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, class_names: Sequence[str], origin: str) -> None:
        if len(x) != len(y):
            raise DataError(f"{origin}: {len(x)} samples but {len(y)} labels")
        self.x = x
        self.targets = y.long()
        self.class_names = [str(c) for c in class_names]
        self.origin = origin
        check_labels(self.targets, self.class_names, origin)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.x[i], int(self.targets[i])

    @property
    def is_image(self) -> bool:
        return self.x.dim() == 4

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])

    def subset(self, idx: torch.Tensor) -> "ArraySource":
        return ArraySource(self.x[idx], self.targets[idx], self.class_names, self.origin)


class ImageFolderSource(Dataset):
    """Image files in ``root/<class name>/``, decoded (and resized to ``size``) when asked for.

    Decoded samples are ``uint8 (C, H, W)`` with ``channels`` 1 (grayscale) or 3 (RGB). Without ``size``
    every image must have the size of the first one: an image that does not is an error naming it.
    """

    def __init__(self, files: Sequence[str], y: torch.Tensor, class_names: Sequence[str], origin: str,
                 channels: int, size: tuple[int, int]) -> None:
        self.files = list(files)
        self.targets = y.long()
        self.class_names = list(class_names)
        self.origin = origin
        self.channels = channels
        self.size = size
        self.resize = False  # set when the scenario asks for a size other than the files'

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return decode_image(self.files[i], self.channels, self.size, self.resize), int(self.targets[i])

    is_image = True

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return (self.channels, *self.size)

    def subset(self, idx: torch.Tensor) -> "ImageFolderSource":
        sub = ImageFolderSource([self.files[i] for i in idx.tolist()], self.targets[idx], self.class_names,
                                self.origin, self.channels, self.size)
        sub.resize = self.resize
        return sub


def check_labels(y: torch.Tensor, class_names: Sequence[str], origin: str) -> None:
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= len(class_names)):
        bad = int(y.min()) if int(y.min()) < 0 else int(y.max())
        raise DataError(f"{origin}: label {bad} is outside the declared classes 0..{len(class_names) - 1}")


def decode_image(path: str, channels: int, size: tuple[int, int], resize: bool) -> torch.Tensor:
    """One image file as ``uint8 (channels, H, W)``; any failure is a DataError naming the file."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image = image.convert("L" if channels == 1 else "RGB")
            if resize and image.size != (size[1], size[0]):
                image = image.resize((size[1], size[0]), Image.BILINEAR)
            pixels = np.asarray(image, dtype=np.uint8)
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad files
        raise DataError(f"{path}: cannot be read as an image ({type(exc).__name__}: {exc})") from None
    if pixels.shape[:2] != tuple(size):
        raise DataError(f"{path}: image is {pixels.shape[1]}x{pixels.shape[0]}, the data set's images are "
                        f"{size[1]}x{size[0]}; set scenario.transforms.resize to use images of several sizes")
    tensor = torch.from_numpy(pixels.copy())
    return tensor.unsqueeze(0) if channels == 1 else tensor.permute(2, 0, 1).contiguous()


# ----------------------------------------------------------------------------- ImageFolder
def load_image_folder(root: str | Path, channels: int | None = None, size: tuple[int, int] | None = None,
                      class_names: Sequence[str] | None = None) -> ImageFolderSource:
    """List ``root/<class>/*`` (torchvision's ImageFolder rules) and check every file's header.

    Only the headers are read here (a truncated or non-image file is caught before training starts);
    pixels are decoded per sample when training asks for them. ``class_names`` fixes the class index
    order (a test folder must use the train folder's); otherwise classes are sorted by name.
    """
    from PIL import Image
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes

    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: image folder does not exist")
    try:
        found, _ = find_classes(str(root))
    except (FileNotFoundError, OSError) as exc:
        raise DataError(f"{root}: no class folders ({str(exc).splitlines()[0]})") from None
    names = list(class_names) if class_names is not None else found
    unknown = sorted(set(found) - set(names))
    if unknown:
        raise DataError(f"{root}: class folder {unknown[0]!r} is not one of the training classes {names}")
    files: list[str] = []
    labels: list[int] = []
    for index, name in enumerate(names):
        folder = root / name
        if not folder.is_dir():
            continue  # a test folder may lack a class
        entries = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS)
        if not entries:
            raise DataError(f"{folder}: class folder holds no image ({', '.join(IMG_EXTENSIONS)})")
        files += [str(p) for p in entries]
        labels += [index] * len(entries)
    first_size = None
    modes: set[str] = set()
    for path in files:  # headers only: Image.open does not decode the pixels
        try:
            with Image.open(path) as image:
                if first_size is None:
                    first_size = (image.size[1], image.size[0])
                modes.add(image.mode)
        except Exception as exc:  # noqa: BLE001
            raise DataError(f"{path}: cannot be read as an image ({type(exc).__name__}: {exc})") from None
    if channels is None:
        channels = 1 if modes <= {"L", "1", "I;16", "I", "F"} else 3
    source = ImageFolderSource(files, torch.tensor(labels, dtype=torch.long), names, str(root), channels,
                               tuple(size) if size is not None else first_size)  # type: ignore[arg-type]
    source.resize = size is not None
    return source


# ----------------------------------------------------------------------------- arrays
def images_from_array(x: np.ndarray, origin: str) -> torch.Tensor:
    """Array of samples -> tensor: ``(N, H, W)`` -> ``(N, 1, H, W)``, channels-last -> channels-first,
    ``(N, F)`` stays flat. uint8 stays uint8 (scaled to [0, 1] by the transforms); other numbers -> float32."""
    if x.dtype.kind not in "uif":
        raise DataError(f"{origin}: x must hold numbers, got dtype {x.dtype}")
    if x.dtype != np.uint8:
        x = x.astype(np.float32)
        if not np.isfinite(x).all():
            first = int(np.flatnonzero((~np.isfinite(x.reshape(len(x), -1))).any(axis=1))[0])
            raise DataError(f"{origin}: sample {first} holds NaN or infinite values")
    tensor = torch.from_numpy(np.ascontiguousarray(x))
    if tensor.dim() == 2:
        return tensor
    if tensor.dim() == 3:
        return tensor.unsqueeze(1)
    if tensor.dim() == 4:
        if tensor.shape[-1] in (1, 3, 4) and tensor.shape[1] not in (1, 3, 4):
            tensor = tensor.permute(0, 3, 1, 2)
        return tensor.contiguous()
    raise DataError(f"{origin}: x must be (N, F), (N, H, W), (N, H, W, C) or (N, C, H, W), got shape {tuple(x.shape)}")


def load_npz(path: str | Path) -> ArraySource:
    """``x``, ``y`` and optional ``class_names`` (default: the label values as names)."""
    x, y, names = read_npz_arrays(Path(path), require_class_names=False)
    if names is None:
        names = [str(i) for i in range(int(y.max()) + 1 if len(y) else 0)]
    return ArraySource(images_from_array(x, str(path)), torch.from_numpy(y.astype(np.int64)), names, str(path))


IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
              0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path: str | Path) -> np.ndarray:
    """An MNIST-format IDX file (gzip or not): magic ``0 0 dtype ndim``, big-endian dims, data."""
    path = Path(path)
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as handle:
            raw = handle.read()
    except (OSError, EOFError, zlib.error) as exc:  # a damaged .gz fails in gzip or in zlib
        raise DataError(f"{path}: cannot be read ({exc})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataError(f"{path}: not an IDX file (bad magic number)")
    dtype = IDX_DTYPES.get(raw[2])
    if dtype is None:
        raise DataError(f"{path}: unknown IDX data type 0x{raw[2]:02x}")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise DataError(f"{path}: truncated IDX header")
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    count = int(np.prod(dims))
    expected = header + count * np.dtype(dtype).itemsize
    if len(raw) != expected:
        raise DataError(f"{path}: IDX header promises {dims} ({expected} bytes), the file has {len(raw)} bytes")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims).copy()  # writable, owns its memory


def find_idx_pair(root: Path, split: str) -> tuple[Path, Path]:
    """``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]`` in ``root`` (MNIST's file names)."""
    prefix = "train" if split == "train" else "t10k"
    found = []
    for kind in ("images-idx3", "labels-idx1"):
        stem = f"{prefix}-{kind}-ubyte"
        candidates = [root / stem, root / f"{stem}.gz", root / stem.replace("-ubyte", ".ubyte")]
        hit = next((c for c in candidates if c.is_file()), None)
        if hit is None:
            raise DataError(f"{root}: no {stem}[.gz] (MNIST-format IDX files expected)")
        found.append(hit)
    return found[0], found[1]


def load_idx(root: str | Path, split: str, class_names: Sequence[str] | None = None) -> ArraySource:
    root = Path(root)
    images_path, labels_path = find_idx_pair(root, split)
    images, labels = read_idx(images_path), read_idx(labels_path)
    if labels.ndim != 1 or len(labels) != len(images):
        raise DataError(f"{labels_path}: {len(labels)} labels for {len(images)} images in {images_path.name}")
    if labels.dtype.kind not in "iu":
        raise DataError(f"{labels_path}: labels must be integers, got {labels.dtype}")
    n_classes = int(labels.max()) + 1 if len(labels) else 0
    names = list(class_names) if class_names is not None else [str(i) for i in range(n_classes)]
    return ArraySource(images_from_array(images, str(images_path)), torch.from_numpy(labels.astype(np.int64)),
                       names, str(root))


# ----------------------------------------------------------------------------- torchvision
def load_torchvision(name: str, root: str | Path, split: str, download: bool) -> ArraySource:
    """A torchvision data set's arrays (they hold the whole set in memory already), no PIL round trip.

    ``download`` is passed through for users with a network; without one, missing files are a
    one-line error saying where they were looked for.
    """
    import torchvision.datasets as tvd

    if name not in TORCHVISION_DATASETS:
        raise DataError(f"scenario.dataset: unknown torchvision data set {name!r}; known: {', '.join(TORCHVISION_DATASETS)}")
    cls = getattr(tvd, name)
    kwargs: dict[str, Any] = {"split": split if split == "train" else "test"} if name == "SVHN" else {"train": split == "train"}
    try:
        data = cls(str(root), download=download, **kwargs)
    except RuntimeError as exc:
        raise DataError(f"{name} not found under {root} ({str(exc).splitlines()[0]}); set scenario.download: true "
                        "(needs a network) or scenario.root to a folder that holds it") from None
    x = data.data
    x = x.numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    targets = getattr(data, "targets", None)
    if targets is None:
        targets = data.labels  # SVHN
    y = np.asarray(targets.numpy() if isinstance(targets, torch.Tensor) else targets, dtype=np.int64)
    if name == "SVHN":  # (N, C, H, W) already
        tensor = torch.from_numpy(np.ascontiguousarray(x))
    else:
        tensor = images_from_array(x, f"{name} ({root})")
    names = list(getattr(data, "classes", [])) or [str(i) for i in range(int(y.max()) + 1)]
    return ArraySource(tensor, torch.from_numpy(y), names, f"{name} ({root})")


# ----------------------------------------------------------------------------- scikit-learn digits
def load_digits_source() -> ArraySource:
    """scikit-learn's 1,797 8x8 digits as 64 flat features in [0, 1] (shipped with scikit-learn)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.from_numpy((digits.data / 16.0).astype(np.float32))
    return ArraySource(x, torch.from_numpy(digits.target.astype(np.int64)), [str(i) for i in range(10)], "load_digits")
