"""Split Digits: class-incremental learning on scikit-learn's ``load_digits`` (real, offline data).

1,797 8x8 handwritten digits shipped inside scikit-learn. Pixels (0..16) are scaled to [0, 1] and kept
flat (64 features); models that want images reshape them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from ..data import Experience, TensorSamples


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """(x float32 (1797, 64) in [0, 1], y int64 (1797,))."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    return (digits.data / 16.0).astype(np.float32), digits.target.astype(np.int64)


def stratified_split(y: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Train/test indices with the same class proportions in both (per-class shuffled split)."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(y))
    train_idx, test_idx = train_test_split(idx, test_size=test_fraction, random_state=seed, stratify=y)
    return np.sort(train_idx), np.sort(test_idx)


def resolve_class_order(classes: Sequence[int], class_order: Sequence[int] | None, shuffle: bool, seed: int) -> list[int]:
    classes = sorted(int(c) for c in classes)
    if class_order is not None:
        if sorted(int(c) for c in class_order) != classes:
            raise ValueError(f"class_order {list(class_order)} is not a permutation of the classes {classes}")
        return [int(c) for c in class_order]
    if shuffle:
        rng = np.random.RandomState(seed)
        return [classes[i] for i in rng.permutation(len(classes))]
    return classes


def split_by_classes(n_classes: int, n_experiences: int) -> list[int]:
    """How many classes each experience gets (the first ones get the remainder)."""
    if not 1 <= n_experiences <= n_classes:
        raise ValueError(f"n_experiences must be between 1 and the number of classes ({n_classes}), got {n_experiences}")
    base, extra = divmod(n_classes, n_experiences)
    return [base + (1 if i < extra else 0) for i in range(n_experiences)]


@dataclass
class SplitDigits:
    """A class-incremental benchmark: ``train_stream`` and ``test_stream`` of experiences."""

    train_stream: list[Experience]
    test_stream: list[Experience]
    class_order: list[int]
    n_classes: int

    @property
    def classes_per_experience(self) -> list[list[int]]:
        return [e.classes_in_this_experience for e in self.train_stream]


def make_class_incremental(
    x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor,
    class_order: list[int], n_experiences: int,
) -> tuple[list[Experience], list[Experience]]:
    """Cut train and test data into experiences by groups of classes in ``class_order``."""
    sizes = split_by_classes(len(class_order), n_experiences)
    train_stream, test_stream = [], []
    start = 0
    seen: list[int] = []
    for i, size in enumerate(sizes):
        group = class_order[start : start + size]
        start += size
        previous = list(seen)
        seen = seen + group
        for xs, ys, stream in ((x_train, y_train, train_stream), (x_test, y_test, test_stream)):
            mask = torch.isin(ys, torch.tensor(group))
            samples = TensorSamples(xs[mask], ys[mask])
            stream.append(Experience(samples, i, sorted(group), previous_classes=previous,
                                     classes_seen_so_far=sorted(seen)))
    return train_stream, test_stream


def split_digits(
    n_experiences: int = 5,
    class_order: Sequence[int] | None = None,
    shuffle_classes: bool = False,
    test_fraction: float = 0.3,
    seed: int = 0,
) -> SplitDigits:
    """Class-incremental Split Digits: stratified train/test split, classes grouped into experiences.

    ``class_order`` fixes the order; otherwise classes are in natural order or, with
    ``shuffle_classes``, permuted by ``seed``.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    x, y = load_digits_arrays()
    train_idx, test_idx = stratified_split(y, test_fraction, seed)
    order = resolve_class_order(range(10), class_order, shuffle_classes, seed)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    train_stream, test_stream = make_class_incremental(
        xt[train_idx], yt[train_idx], xt[test_idx], yt[test_idx], order, n_experiences
    )
    return SplitDigits(train_stream, test_stream, order, 10)
