"""Class-incremental scenarios from users' data and the standard benchmarks.

``scenario.name: class_incremental`` with ``scenario.source`` (``imagefolder``, ``npz``, ``idx``,
``torchvision``, ``digits``) cuts a data set into experiences by groups of classes in
``scenario.class_order``; the named benchmarks (``split_mnist``, ``split_fashion_mnist``,
``split_cifar10``, ``split_cifar100``, ``split_digits``) are presets that fill in the source and the
usual class-IL protocol. Labels keep the source's class indices (a growing head gets a row per class
index seen so far), as Avalanche's class-incremental benchmark does by default.

Data reach the loop one of two ways (:mod:`incremental.data`): small array data with no random
augmentation is transformed once and held in memory (the fast path); anything else stays lazy, each
sample read and transformed when a ``DataLoader`` asks for it. ``data.in_memory`` forces either.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..config import ConfigError, check
from ..data import Experience, TensorSamples, TransformedSubset
from ..datasets import DataError
from ..sources import (
    DEBIAN_FASHION_MNIST, FASHION_MNIST_CLASSES, TORCHVISION_DATASETS, ArraySource, ImageFolderSource,
    load_digits_source, load_idx, load_image_folder, load_npz, load_torchvision,
)
from ..transforms import TransformsConfig, build_pipelines, output_size

SOURCES = ("imagefolder", "npz", "idx", "torchvision", "digits")

#: Named benchmarks: settings a preset fills in when the config leaves them unset.
PRESETS: dict[str, dict[str, Any]] = {
    "class_incremental": {},
    "split_digits": {"source": "digits", "n_experiences": 5, "test_fraction": 0.3},
    "split_mnist": {"source": "torchvision", "dataset": "MNIST", "root": "data", "n_experiences": 5},
    "split_fashion_mnist": {"source": "idx", "n_experiences": 5},
    "split_cifar10": {"source": "torchvision", "dataset": "CIFAR10", "root": "data", "n_experiences": 5},
    "split_cifar100": {"source": "torchvision", "dataset": "CIFAR100", "root": "data", "n_experiences": 10},
}

#: Above this many bytes of float32 samples, ``data.in_memory: null`` (auto) keeps array data lazy.
IN_MEMORY_LIMIT_BYTES = 4 << 30


@dataclass
class ScenarioConfig:
    """``scenario.*`` of a class-incremental run; unset values come from the preset ``name``."""

    name: str = "split_digits"
    source: str | None = None
    root: str | None = None
    dataset: str | None = None  # torchvision data set name
    download: bool = False
    test_fraction: float | None = None  # single-folder / single-file sources: stratified hold-out
    n_experiences: int | None = None
    classes_per_experience: int | None = None
    first_experience_classes: int | None = None
    class_order: list[int | str] | None = None
    shuffle_classes: bool = False
    channels: int | None = None  # image folders: 1 (grayscale) or 3 (RGB); default from the files
    transforms: TransformsConfig = field(default_factory=TransformsConfig)

    def __post_init__(self) -> None:
        for key, value in PRESETS.get(self.name, {}).items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        self.validate()  # built in code as in a config file: an impossible value fails here, naming its key

    def validate(self) -> None:
        check(self.name in PRESETS, "scenario.name", f"unknown scenario {self.name!r}; known: {', '.join(PRESETS)}")
        check(self.source in SOURCES, "scenario.source",
              f"must be one of {', '.join(SOURCES)}, got {self.source!r}")
        if self.source in ("imagefolder", "npz", "idx"):
            check(self.root is not None or self.name == "split_fashion_mnist", "scenario.root",
                  f"source {self.source} needs scenario.root (a folder or file of your data)")
        if self.source == "torchvision":
            check(self.dataset in TORCHVISION_DATASETS, "scenario.dataset",
                  f"must be one of {', '.join(TORCHVISION_DATASETS)}, got {self.dataset!r}")
        if self.test_fraction is not None:
            check(0.0 < self.test_fraction < 1.0, "scenario.test_fraction", f"must be in (0, 1), got {self.test_fraction}")
        check(self.n_experiences is None or self.n_experiences >= 1, "scenario.n_experiences",
              f"must be >= 1, got {self.n_experiences}")
        check(self.classes_per_experience is None or self.classes_per_experience >= 1,
              "scenario.classes_per_experience", f"must be >= 1, got {self.classes_per_experience}")
        check(self.first_experience_classes is None or self.first_experience_classes >= 1,
              "scenario.first_experience_classes", f"must be >= 1, got {self.first_experience_classes}")
        check(self.n_experiences is not None or self.classes_per_experience is not None, "scenario.n_experiences",
              "set scenario.n_experiences or scenario.classes_per_experience")
        check(self.channels in (None, 1, 3), "scenario.channels", f"must be 1 or 3, got {self.channels}")
        if self.class_order is not None:
            check(len(set(map(str, self.class_order))) == len(self.class_order), "scenario.class_order",
                  f"lists a class twice: {self.class_order}")


@dataclass
class DataConfig:
    """``data.*``: ``in_memory`` true (transform once, slice tensors), false (read lazily through a
    DataLoader) or null (automatic: in memory for array data without random augmentation)."""

    in_memory: bool | None = None


@dataclass
class ClassIncremental:
    """A class-incremental benchmark: train and test streams and what a model needs to know of them."""

    train_stream: list[Experience]
    test_stream: list[Experience]
    class_order: list[int]
    class_names: list[str]
    input_shape: tuple[int, ...]  # what the model sees: (C, H, W) images or (F,) features
    in_memory: bool

    @property
    def n_classes(self) -> int:
        return len(self.class_names)

    @property
    def classes_per_experience(self) -> list[list[int]]:
        return [e.classes_in_this_experience for e in self.train_stream]


# ----------------------------------------------------------------------------- splitting
def experience_sizes(n_classes: int, n_experiences: int | None = None, classes_per_experience: int | None = None,
                     first_experience_classes: int | None = None) -> list[int]:
    """Number of classes per experience. ``first_experience_classes`` takes its share first; the rest
    is split by ``classes_per_experience`` (the last experience may get fewer) or evenly into the
    remaining ``n_experiences`` (the first ones get the remainder)."""
    first = first_experience_classes
    if first is not None:
        if first > n_classes:
            raise ConfigError("scenario.first_experience_classes", f"is {first}, but the data have {n_classes} classes")
        rest = n_classes - first
        if rest == 0:
            return [first]
        if classes_per_experience is not None:
            return [first] + [min(classes_per_experience, rest - s) for s in range(0, rest, classes_per_experience)]
        n_rest = (n_experiences or 2) - 1
        if not 1 <= n_rest <= rest:
            raise ConfigError("scenario.n_experiences", f"{n_experiences} experiences cannot hold {first} classes "
                                                        f"first and {rest} more")
        base, extra = divmod(rest, n_rest)
        return [first] + [base + (1 if i < extra else 0) for i in range(n_rest)]
    if classes_per_experience is not None:
        if n_experiences is not None and n_experiences != math.ceil(n_classes / classes_per_experience):
            raise ConfigError("scenario.n_experiences", f"{n_experiences} experiences of {classes_per_experience} "
                                                        f"classes do not cover {n_classes} classes")
        return [min(classes_per_experience, n_classes - s) for s in range(0, n_classes, classes_per_experience)]
    assert n_experiences is not None
    if not 1 <= n_experiences <= n_classes:
        raise ConfigError("scenario.n_experiences", f"must be between 1 and the number of classes ({n_classes}), "
                                                    f"got {n_experiences}")
    base, extra = divmod(n_classes, n_experiences)
    return [base + (1 if i < extra else 0) for i in range(n_experiences)]


def resolve_order(class_order: Sequence[int | str] | None, present: Sequence[int], class_names: Sequence[str],
                  shuffle: bool, seed: int) -> list[int]:
    """Class indices in the order they arrive; names or indices accepted, every present class once."""
    present = sorted(int(c) for c in present)
    if class_order is None:
        if shuffle:
            rng = np.random.RandomState(seed)
            return [present[i] for i in rng.permutation(len(present))]
        return present
    order = []
    for entry in class_order:
        if isinstance(entry, str) and not entry.lstrip("-").isdigit():
            if entry not in class_names:
                raise ConfigError("scenario.class_order", f"class {entry!r} is not in the data (classes: "
                                                          f"{', '.join(class_names)})")
            index = class_names.index(entry)
        else:
            index = int(entry)
        if index not in present:
            raise ConfigError("scenario.class_order", f"class {entry!r} is not in the data "
                                                      f"(class indices present: {present})")
        order.append(index)
    missing = sorted(set(present) - set(order))
    if missing:
        raise ConfigError("scenario.class_order", f"must list every class of the data once; missing "
                                                  f"{[class_names[i] if i < len(class_names) else i for i in missing]}")
    return order


def stratified_split(y: torch.Tensor, test_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Train / test indices with the same class proportions (scikit-learn's stratified split)."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(y))
    train_idx, test_idx = train_test_split(idx, test_size=test_fraction, random_state=seed, stratify=y.numpy())
    return torch.from_numpy(np.sort(train_idx)), torch.from_numpy(np.sort(test_idx))


# ----------------------------------------------------------------------------- sources
def _fashion_mnist_root(root: str | None) -> Path:
    path = Path(root) if root is not None else DEBIAN_FASHION_MNIST
    if root is None and not any(path.glob("train-images-idx3-ubyte*")):
        raise DataError(f"Fashion-MNIST not found in {path}: install it with `apt-get install dataset-fashion-mnist` "
                        "(Debian/Ubuntu) or set scenario.root to a folder holding its four IDX files")
    return path


def load_sources(cfg: ScenarioConfig, seed: int) -> tuple[Any, Any]:
    """(train source, test source) for the configured data."""
    source = cfg.source
    if source == "digits":
        full = load_digits_source()
        return _split(full, cfg, seed)
    if source == "torchvision":
        assert cfg.dataset is not None
        return tuple(load_torchvision(cfg.dataset, cfg.root or "data", split, cfg.download)  # type: ignore[return-value]
                     for split in ("train", "test"))
    if source == "idx":
        names = FASHION_MNIST_CLASSES if cfg.name == "split_fashion_mnist" else None
        root = _fashion_mnist_root(cfg.root) if cfg.name == "split_fashion_mnist" else Path(cfg.root or "")
        if not root.is_dir():
            raise DataError(f"{root}: IDX folder does not exist")
        return load_idx(root, "train", names), load_idx(root, "test", names)
    root = Path(cfg.root or "")
    if not root.exists():
        raise DataError(f"{root}: scenario.root does not exist")
    size = None
    if source == "imagefolder":
        size = cfg.transforms.resize_hw()
        if (root / "train").is_dir() and (root / "test").is_dir():
            train = load_image_folder(root / "train", cfg.channels, size)
            return train, load_image_folder(root / "test", train.channels, size, class_names=train.class_names)
        return _split(load_image_folder(root, cfg.channels, size), cfg, seed)
    # npz: one file (hold-out by test_fraction) or a folder with train.npz and test.npz
    if root.is_dir():
        train_file, test_file = root / "train.npz", root / "test.npz"
        if not (train_file.is_file() and test_file.is_file()):
            raise DataError(f"{root}: an npz folder needs train.npz and test.npz (or point scenario.root at one .npz file)")
        train, test = load_npz(train_file), load_npz(test_file)
        if test.class_names != train.class_names[: len(test.class_names)]:
            raise DataError(f"{test_file}: class_names differ from {train_file.name}'s")
        return train, test
    return _split(load_npz(root), cfg, seed)


def _split(full: Any, cfg: ScenarioConfig, seed: int) -> tuple[Any, Any]:
    if cfg.test_fraction is None:
        raise ConfigError("scenario.test_fraction", f"{full.origin} is one data set: set scenario.test_fraction "
                                                    "(or give separate train and test data)")
    train_idx, test_idx = stratified_split(full.targets, cfg.test_fraction, seed)
    return full.subset(train_idx), full.subset(test_idx)


# ----------------------------------------------------------------------------- building
def _decide_in_memory(forced: bool | None, source: Any, transforms: TransformsConfig) -> bool:
    if forced is True:
        if transforms.is_random:
            raise ConfigError("data.in_memory", "true transforms the data once, so random augmentation "
                                                "(random_crop, horizontal_flip) would be frozen; set it to false")
        return True
    if forced is False:
        return False
    if not isinstance(source, ArraySource) or transforms.is_random:
        return False
    return len(source) * math.prod(source.sample_shape) * 4 <= IN_MEMORY_LIMIT_BYTES


def _transform_all(source: Any, transform: Any, chunk: int = 4096) -> torch.Tensor:
    """Every sample of ``source`` through a deterministic pipeline, in batched chunks."""
    if isinstance(source, ArraySource):
        parts = [transform(source.x[s: s + chunk]) for s in range(0, len(source), chunk)]
    else:  # an image folder read once (in_memory: true)
        parts = [torch.stack([transform(source[i][0]) for i in range(s, min(len(source), s + chunk))])
                 for s in range(0, len(source), chunk)]
    return torch.cat(parts) if parts else torch.zeros(0)


def build_benchmark(cfg: ScenarioConfig, data: DataConfig, seed: int) -> ClassIncremental:
    """The configured class-incremental benchmark (deterministic from ``seed``)."""
    train_src, test_src = load_sources(cfg, seed)
    is_image = train_src.is_image
    if not is_image and cfg.transforms.image_only():
        raise ConfigError(f"scenario.transforms.{cfg.transforms.image_only()[0]}",
                          f"{train_src.origin} holds flat feature vectors {tuple(train_src.sample_shape)}; "
                          "image transforms need images")
    image_size = tuple(train_src.sample_shape[1:]) if is_image else None
    train_tf, eval_tf = build_pipelines(cfg.transforms, image_size,  # type: ignore[arg-type]
                                        resize_in_pipeline=not isinstance(train_src, ImageFolderSource))
    input_shape = ((train_src.sample_shape[0], *output_size(cfg.transforms, image_size))  # type: ignore[arg-type]
                   if is_image else tuple(train_src.sample_shape))
    names = train_src.class_names
    present = sorted(set(train_src.targets.tolist()))
    test_extra = sorted(set(test_src.targets.tolist()) - set(present))
    if test_extra:
        raise DataError(f"{test_src.origin}: test data hold classes the training data lack: "
                        f"{[names[i] if i < len(names) else i for i in test_extra]}")
    order = resolve_order(cfg.class_order, present, names, cfg.shuffle_classes, seed)
    sizes = experience_sizes(len(order), cfg.n_experiences, cfg.classes_per_experience, cfg.first_experience_classes)
    in_memory = _decide_in_memory(data.in_memory, train_src, cfg.transforms)
    streams: list[list[Experience]] = [[], []]
    for stream, src, training in ((streams[0], train_src, True), (streams[1], test_src, False)):
        x_all = _transform_all(src, eval_tf) if in_memory else None
        start, seen = 0, []
        for i, size in enumerate(sizes):
            group = order[start: start + size]
            start += size
            previous, seen = list(seen), seen + group
            idx = torch.nonzero(torch.isin(src.targets, torch.tensor(group))).flatten()
            if in_memory:
                dataset: Any = TensorSamples(x_all[idx], src.targets[idx])
            else:
                dataset = TransformedSubset(src, idx, train_tf, eval_tf, training=training)
            stream.append(Experience(dataset, i, sorted(group), previous_classes=previous,
                                     classes_seen_so_far=sorted(seen)))
    return ClassIncremental(streams[0], streams[1], order, names, tuple(input_shape), in_memory)
