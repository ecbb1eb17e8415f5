"""Small data sets written on disk by the tests themselves: IDX, npz and ImageFolder fixtures."""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np


def class_images(n_per_class: int, n_classes: int, size: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (N, size, size) images whose class is readable (a bright band at a class-dependent row)
    plus noise, and their labels; deterministic from ``seed``."""
    rng = np.random.RandomState(seed)
    xs, ys = [], []
    for c in range(n_classes):
        for _ in range(n_per_class):
            img = rng.randint(0, 60, size=(size, size)).astype(np.uint8)
            img[(c * size) // n_classes] = 250
            xs.append(img)
            ys.append(c)
    return np.stack(xs), np.array(ys, dtype=np.int64)


def write_idx(path: Path, array: np.ndarray, compress: bool = True) -> Path:
    """MNIST's IDX format: magic 0 0 dtype ndim, big-endian dimensions, then the data."""
    codes = {np.dtype(np.uint8): 0x08, np.dtype(np.float32): 0x0D}
    header = bytes([0, 0, codes[array.dtype], array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    data = array.astype(array.dtype.newbyteorder(">")).tobytes() if array.dtype.itemsize > 1 else array.tobytes()
    payload = header + data
    if compress:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(payload))
    else:
        path.write_bytes(payload)
    return path


def write_idx_folder(root: Path, n_per_class: int = 12, n_classes: int = 4, compress: bool = True) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for split, seed in (("train", 0), ("t10k", 1)):
        x, y = class_images(n_per_class, n_classes, seed=seed)
        write_idx(root / f"{split}-images-idx3-ubyte", x, compress)
        write_idx(root / f"{split}-labels-idx1-ubyte", y.astype(np.uint8), compress)
    return root


def write_image_folder(root: Path, n_per_class: int = 6, n_classes: int = 3, size: int = 8, seed: int = 0,
                       names: tuple[str, ...] = ("cat", "dog", "fox", "owl", "emu")) -> Path:
    from PIL import Image

    x, y = class_images(n_per_class, n_classes, size, seed)
    for i, (img, label) in enumerate(zip(x, y)):
        folder = root / names[int(label)]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img, mode="L").save(folder / f"{i:04d}.png")
    return root
