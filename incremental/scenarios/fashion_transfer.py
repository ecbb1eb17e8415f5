"""Fashion-MNIST transfer: the general scene is Fashion-MNIST as it is, the transfer scene a shifted copy.

Real data (the IDX files of Debian's ``dataset-fashion-mnist``, 60,000 training / 10,000 test images of 10
clothing classes). The deployed model learns the general scene from the whole training split; the
transfer scene is the same clothes seen through a deterministic shift (``invert`` the contrast, ``rotation``
degrees, a Gaussian blur of ``blur_sigma`` pixels, sensor noise of ``noise_std``; the shipped config
rotates by 90 degrees and blurs by 1 pixel: a camera mounted sideways behind a soft lens), with ``shots``
labelled images per class. (Inverted contrast makes an MLP on raw pixels see inputs of a very different
scale, and adaptation at the config's learning rate then fails on some seeds for every strategy alike.)
What goes where is :func:`~incremental.scenarios.domain_shift.transfer_scenes`'s rule: the shots are
shifted *training* images, the transfer test set is the shifted *test* split.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..sources import DEBIAN_FASHION_MNIST, FASHION_MNIST_CLASSES, load_idx
from .domain_shift import TransferScenes, shift_images, transfer_scenes


def fashion_transfer(shots: int = 10, *, root: str | Path | None = None, invert: bool = False,
                     rotation: float = 90.0, blur_sigma: float = 1.0, noise_std: float = 0.0,
                     seed: int = 0) -> TransferScenes:
    """Build the general and the transfer scene from the Fashion-MNIST IDX files in ``root``."""
    if shots < 1:
        raise ValueError(f"shots must be >= 1, got {shots}")
    from .class_incremental import _fashion_mnist_root

    folder = _fashion_mnist_root(None if root is None else str(root))
    train, test = load_idx(folder, "train", FASHION_MNIST_CLASSES), load_idx(folder, "test", FASHION_MNIST_CLASSES)

    def as_float(x: torch.Tensor) -> torch.Tensor:
        return x.float() / 255.0 if x.dtype == torch.uint8 else x.float()

    def shift(images: torch.Tensor) -> torch.Tensor:
        return shift_images(images, invert=invert, rotation=rotation, blur_sigma=blur_sigma, noise_std=noise_std,
                            seed=seed)

    info = {"invert": invert, "rotation": rotation, "blur_sigma": blur_sigma, "noise_std": noise_std}
    return transfer_scenes(as_float(train.x), train.targets, as_float(test.x), test.targets, shift, shots, seed, info)


__all__ = ["fashion_transfer", "DEBIAN_FASHION_MNIST"]
