"""Domain shifts for transfer scenes, and the scenes themselves.

A transfer scenario has a general scene (what the deployed "meta" model learned) and a transfer scene (the
same objects seen through a deterministic shift, as if the camera changed), each with a training and a
test set. :func:`shift_images` is the shift; :class:`TransferScenes` is what a scenario builder returns.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from ..data import Experience, TensorSamples

#: Experience ids: the general scene is experience 0, the transfer scene experience 1.
GENERAL, TRANSFER = 0, 1


def shift_images(images: torch.Tensor, *, invert: bool = True, rotation: float = 90.0, blur_sigma: float = 0.0,
                 noise_std: float = 0.0, seed: int = 0) -> torch.Tensor:
    """Shift ``(N, C, H, W)`` images in [0, 1]: invert, rotate, blur, add Gaussian noise, clip to [0, 1].

    Multiples of 90 degrees use ``torch.rot90`` (exact, no interpolation); other angles use torchvision's
    bilinear ``rotate`` with the background value as fill. The blur is a Gaussian of ``blur_sigma``
    pixels (kernel width ``2 ceil(3 sigma) + 1``). The noise comes from a generator seeded with ``seed``, so
    the same seed gives the same shifted images.
    """
    if images.dim() != 4:
        raise ValueError(f"shift_images expects (N, C, H, W) images, got {tuple(images.shape)}")
    img = images.float()
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
    if blur_sigma > 0:
        from torchvision.transforms.functional import gaussian_blur

        width = 2 * int(np.ceil(3 * blur_sigma)) + 1
        img = gaussian_blur(img, [width, width], [float(blur_sigma)] * 2)
    if noise_std > 0:
        gen = torch.Generator().manual_seed(int(seed) + 7919)  # offset: not the stream the split uses
        img = img + noise_std * torch.randn(img.shape, generator=gen)
    return img.clamp(0.0, 1.0)


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
class TransferScenes:
    """General and transfer scene, each as a train and a test experience (ids 0 and 1)."""

    general_train: Experience
    general_test: Experience
    transfer_train: Experience
    transfer_test: Experience
    shift: dict[str, Any] = field(default_factory=dict)
    n_classes: int = 10
    input_shape: tuple[int, ...] = (64,)

    @property
    def test_stream(self) -> list[Experience]:
        return [self.general_test, self.transfer_test]


def transfer_scenes(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                    shift: Callable[[torch.Tensor], torch.Tensor], shots: int, seed: int,
                    info: dict[str, Any]) -> TransferScenes:
    """The two scenes from a general train/test split and a shift.

    Which images go where (no image is ever both trained on and tested on, in any form): the general
    scene is the split as it is; transfer training is ``shots`` shifted images per class drawn by seed
    from the *general training* split (the meta model saw these objects, unshifted: same objects, new
    scene); transfer test is the shifted general test split.
    """
    shot_idx = torch.from_numpy(few_shot_indices(train_y.numpy(), shots, seed))
    classes = sorted(set(train_y.tolist()))

    def exp(x: torch.Tensor, y: torch.Tensor, exp_id: int, previous: list[int]) -> Experience:
        return Experience(TensorSamples(x, y), exp_id, classes, previous_classes=previous, classes_seen_so_far=classes)

    return TransferScenes(
        general_train=exp(train_x, train_y, GENERAL, []),
        general_test=exp(test_x, test_y, GENERAL, []),
        transfer_train=exp(shift(train_x[shot_idx]), train_y[shot_idx], TRANSFER, classes),
        transfer_test=exp(shift(test_x), test_y, TRANSFER, classes),
        shift={**info, "shots": shots}, n_classes=len(classes), input_shape=tuple(train_x.shape[1:]),
    )
