"""Digits transfer: a general scene (the digits as they are) and a shifted transfer scene with few labels.

The meta model learns the general scene: scikit-learn's ``load_digits`` split into train and test exactly
as Split Digits splits it (stratified, by seed), all ten classes in one experience. The transfer scene is
the same digits seen through a strong, deterministic domain shift (inverted intensities, a rotation and
Gaussian noise drawn from the seed), as if the deployed model were moved to a camera with inverted
polarity, mounted sideways, with a noisy sensor.

Which images go where (no image is ever both trained on and tested on, in any form):
- transfer training: ``shots`` shifted images per class, drawn by seed from the *general training* split
  (the meta model saw these digits, unshifted: same objects, new scene);
- transfer test: the shifted *general test* split (never trained on in either scene);
- general test: the general test split, unshifted.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..data import Experience, TensorSamples
from .digits import load_digits_arrays, stratified_split

#: Experience ids: the general scene is experience 0, the transfer scene experience 1.
GENERAL, TRANSFER = 0, 1
IMAGE_SIDE = 8


def domain_shift(x: torch.Tensor, *, invert: bool = True, rotation: float = 90.0, noise_std: float = 0.2,
                 seed: int = 0) -> torch.Tensor:
    """Shift flat 8x8 digits (``(N, 64)`` in [0, 1]): invert, rotate, add Gaussian noise, clip to [0, 1].

    Multiples of 90 degrees use ``torch.rot90`` (exact, no interpolation); other angles use torchvision's
    bilinear ``rotate`` with the background value as fill. The noise comes from a generator seeded with
    ``seed``, so the same seed gives the same shifted images.
    """
    if x.dim() != 2 or x.shape[1] != IMAGE_SIDE * IMAGE_SIDE:
        raise ValueError(f"domain_shift expects flat 8x8 digits of shape (N, 64), got {tuple(x.shape)}")
    img = x.reshape(-1, 1, IMAGE_SIDE, IMAGE_SIDE).float()
    background = 0.0
    if invert:
        img = 1.0 - img
        background = 1.0
    quarter, rest = divmod(float(rotation) % 360.0, 90.0)
    if rest == 0.0:
        img = torch.rot90(img, int(quarter), dims=(2, 3))
    else:
        from torchvision.transforms.functional import InterpolationMode, rotate

        img = rotate(img, float(rotation), interpolation=InterpolationMode.BILINEAR, fill=[background])
    if noise_std > 0:
        gen = torch.Generator().manual_seed(int(seed) + 7919)  # offset: not the stream the split uses
        img = img + noise_std * torch.randn(img.shape, generator=gen)
    return img.clamp(0.0, 1.0).reshape(len(x), -1)


def few_shot_indices(y: np.ndarray, shots: int, seed: int) -> np.ndarray:
    """``shots`` indices per class, drawn without replacement by ``seed`` (sorted)."""
    rng = np.random.RandomState(seed)
    picked = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        if shots > len(idx):
            raise ValueError(f"class {int(c)} has only {len(idx)} training images, cannot take shots={shots}")
        picked.append(rng.choice(idx, size=shots, replace=False))
    return np.sort(np.concatenate(picked))


@dataclass
class DigitsTransfer:
    """General and transfer scene, each as a train and a test experience (ids 0 and 1)."""

    general_train: Experience
    general_test: Experience
    transfer_train: Experience
    transfer_test: Experience
    shift: dict[str, Any] = field(default_factory=dict)
    n_classes: int = 10

    @property
    def test_stream(self) -> list[Experience]:
        return [self.general_test, self.transfer_test]


def digits_transfer(shots: int = 10, *, test_fraction: float = 0.3, invert: bool = True, rotation: float = 90.0,
                    noise_std: float = 0.2, seed: int = 0) -> DigitsTransfer:
    """Build the general and the transfer scene (see the module docstring for what goes where)."""
    if shots < 1:
        raise ValueError(f"shots must be >= 1, got {shots}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    x, y = load_digits_arrays()
    train_idx, test_idx = stratified_split(y, test_fraction, seed)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    shifted = domain_shift(xt, invert=invert, rotation=rotation, noise_std=noise_std, seed=seed)
    shot_idx = train_idx[few_shot_indices(y[train_idx], shots, seed)]
    classes = list(range(10))

    def exp(samples_x: torch.Tensor, samples_y: torch.Tensor, exp_id: int, previous: list[int]) -> Experience:
        return Experience(TensorSamples(samples_x, samples_y), exp_id, classes, previous_classes=previous,
                          classes_seen_so_far=classes)

    shot_t, test_t = torch.from_numpy(shot_idx), torch.from_numpy(test_idx)
    train_t = torch.from_numpy(train_idx)
    return DigitsTransfer(
        general_train=exp(xt[train_t], yt[train_t], GENERAL, []),
        general_test=exp(xt[test_t], yt[test_t], GENERAL, []),
        transfer_train=exp(shifted[shot_t], yt[shot_t], TRANSFER, classes),
        transfer_test=exp(shifted[test_t], yt[test_t], TRANSFER, classes),
        shift={"invert": invert, "rotation": rotation, "noise_std": noise_std, "shots": shots},
    )
