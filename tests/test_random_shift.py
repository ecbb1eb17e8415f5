"""Per-sample random shifts of history images (gradient mixing's ``history_shift``), by hand."""
from __future__ import annotations

import pytest
import torch

from incremental.transforms import random_shift, shift_images


def test_shift_images_by_hand() -> None:
    image = torch.arange(1.0, 10.0).view(1, 1, 3, 3)  # [[1, 2, 3], [4, 5, 6], [7, 8, 9]]
    batch = image.repeat(3, 1, 1, 1)
    # offsets are crop corners in the image padded by 1: (0, 0) moves the content down-right by one pixel,
    # (1, 1) leaves it, (2, 1) moves it up by one
    out = shift_images(batch, torch.tensor([[0, 1, 2], [0, 1, 1]]), max_shift=1)
    assert out[0, 0].tolist() == [[0, 0, 0], [0, 1, 2], [0, 4, 5]]
    assert torch.equal(out[1], image[0])
    assert out[2, 0].tolist() == [[4, 5, 6], [7, 8, 9], [0, 0, 0]]
    # every channel moves with its sample
    two = torch.stack([image[0, 0], -image[0, 0]]).unsqueeze(0)
    moved = shift_images(two, torch.tensor([[0], [0]]), 1)
    assert torch.equal(moved[0, 1], -moved[0, 0])


def test_shift_images_rejects_wrong_shapes_and_offsets() -> None:
    with pytest.raises(ValueError, match="N, C, H, W"):
        shift_images(torch.zeros(2, 9), torch.zeros(2, 2, dtype=torch.long), 1)
    with pytest.raises(ValueError, match="offsets"):
        shift_images(torch.zeros(2, 1, 3, 3), torch.tensor([[0, 3], [0, 0]]), 1)


def test_random_shift_is_seeded_and_stays_in_range() -> None:
    images = torch.rand(64, 1, 5, 5)
    a = random_shift(images, 2, torch.Generator().manual_seed(3))
    b = random_shift(images, 2, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    assert not torch.equal(a, random_shift(images, 2, torch.Generator().manual_seed(4)))
    # each output is some shift of its own input within +-2 pixels (check by trying all 25)
    for x, y in zip(images, a):
        candidates = [shift_images(x[None], torch.tensor([[i], [j]]), 2)[0] for i in range(5) for j in range(5)]
        assert any(torch.equal(y, c) for c in candidates)
