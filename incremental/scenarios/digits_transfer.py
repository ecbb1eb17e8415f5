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

import torch

from .digits import load_digits_arrays, stratified_split
from .domain_shift import GENERAL, TRANSFER, few_shot_indices  # noqa: F401 - re-exported (runner, tests)
from .domain_shift import TransferScenes, shift_images, transfer_scenes

IMAGE_SIDE = 8
#: The scenes of a digits transfer run (the name callers of the first version import).
DigitsTransfer = TransferScenes


def domain_shift(x: torch.Tensor, *, invert: bool = True, rotation: float = 90.0, noise_std: float = 0.2,
                 seed: int = 0) -> torch.Tensor:
    """:func:`~incremental.scenarios.domain_shift.shift_images` on flat 8x8 digits (``(N, 64)`` in [0, 1])."""
    if x.dim() != 2 or x.shape[1] != IMAGE_SIDE * IMAGE_SIDE:
        raise ValueError(f"domain_shift expects flat 8x8 digits of shape (N, 64), got {tuple(x.shape)}")
    img = x.reshape(-1, 1, IMAGE_SIDE, IMAGE_SIDE)
    return shift_images(img, invert=invert, rotation=rotation, noise_std=noise_std, seed=seed).reshape(len(x), -1)


def digits_transfer(shots: int = 10, *, test_fraction: float = 0.3, invert: bool = True, rotation: float = 90.0,
                    noise_std: float = 0.2, seed: int = 0) -> TransferScenes:
    """Build the general and the transfer scene (see the module docstring for what goes where)."""
    if shots < 1:
        raise ValueError(f"shots must be >= 1, got {shots}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    x, y = load_digits_arrays()
    train_idx, test_idx = (torch.from_numpy(i) for i in stratified_split(y, test_fraction, seed))
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)

    def shift(images: torch.Tensor) -> torch.Tensor:
        return domain_shift(images, invert=invert, rotation=rotation, noise_std=noise_std, seed=seed)

    return transfer_scenes(xt[train_idx], yt[train_idx], xt[test_idx], yt[test_idx], shift, shots, seed,
                           {"invert": invert, "rotation": rotation, "noise_std": noise_std})
