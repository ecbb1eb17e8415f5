"""The accuracy matrix as an RGB image, in numpy (no matplotlib: a figure costs ~0.1 s per experience,
a fifth of the quickstart's whole training time; this costs microseconds)."""
from __future__ import annotations

from typing import Sequence

import numpy as np

# viridis at 0, 0.25, 0.5, 0.75, 1 (interpolated linearly in between): dark = low, yellow = high
_ANCHORS = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], dtype=np.float64)


def colormap(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] (clipped; NaN -> grey) to uint8 RGB, shape ``values.shape + (3,)``."""
    v = np.clip(np.nan_to_num(values, nan=0.0), 0.0, 1.0) * (len(_ANCHORS) - 1)
    lo = np.minimum(np.floor(v).astype(int), len(_ANCHORS) - 2)
    frac = (v - lo)[..., None]
    rgb = _ANCHORS[lo] * (1 - frac) + _ANCHORS[lo + 1] * frac
    rgb[np.isnan(values)] = 128
    return rgb.round().astype(np.uint8)


def matrix_image(R: Sequence[Sequence[float]], n_cols: int | None = None, cell: int = 16) -> np.ndarray:
    """``R[i][j]`` as an (H, W, 3) uint8 image, one ``cell`` x ``cell`` square per entry.

    Rows not trained yet (the matrix grows by one row per experience) are grey, so every image of a
    run has the same size and the TensorBoard slider steps through the matrix filling up.
    """
    rows = [list(r) for r in R]
    n = max(n_cols or 0, max((len(r) for r in rows), default=0))
    full = np.full((max(n, len(rows)), n), np.nan)
    for i, r in enumerate(rows):
        full[i, : len(r)] = r
    img = colormap(full)
    return np.repeat(np.repeat(img, cell, axis=0), cell, axis=1)
