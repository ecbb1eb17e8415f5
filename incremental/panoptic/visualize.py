"""Pictures of panoptic results: coloured segment maps beside the images, PQ per class bars."""
from __future__ import annotations

import colorsys
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch

from ..io import save_figure


def class_colours(n_classes: int) -> np.ndarray:
    """(n, 3) float RGB in [0, 1], well separated hues, one per class."""
    return np.array([colorsys.hsv_to_rgb((0.61803 * k) % 1.0, 0.75, 0.95) for k in range(n_classes)])


def colour_panoptic(category_instance: torch.Tensor, n_classes: int) -> np.ndarray:
    """(H, W, 2) (class, instance) map -> (H, W, 3) float image: class hue, instances in different
    brightness, unassigned / void black."""
    cats = category_instance[..., 0].cpu().numpy()
    inst = category_instance[..., 1].cpu().numpy()
    colours = class_colours(n_classes)
    out = np.zeros((*cats.shape, 3))
    for c in np.unique(cats):
        if not 0 <= c < n_classes:
            continue
        where = cats == c
        for i in np.unique(inst[where]):
            shade = 1.0 - 0.35 * ((int(i) * 0.37) % 1.0) if i else 1.0
            out[where & (inst == i)] = colours[c] * shade
    return out


def sample_grid(images: torch.Tensor, rows: Sequence[tuple[str, Sequence[torch.Tensor]]], class_names: Sequence[str],
                path: str | Path, title: str) -> Path:
    """One column per image: the image, then one row per named list of (H, W, 2) panoptic maps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    n = images.shape[0]
    fig, axes = plt.subplots(1 + len(rows), n, figsize=(1.6 * n + 1.8, 1.6 * (1 + len(rows)) + 0.6), squeeze=False)
    for j in range(n):
        axes[0, j].imshow(images[j].permute(1, 2, 0).cpu().numpy().clip(0, 1))
        for r, (_, maps) in enumerate(rows, start=1):
            axes[r, j].imshow(colour_panoptic(maps[j], len(class_names)))
    for r, (name, _) in enumerate([("image", None), *rows]):
        axes[r, 0].set_ylabel(name, fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    colours = class_colours(len(class_names))
    handles = [Patch(color=colours[k], label=name) for k, name in enumerate(class_names)]
    fig.legend(handles=handles, loc="center right", fontsize=7, frameon=False)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0, 0.86, 0.95))
    return save_figure(path, fig, dpi=110)


def pq_per_class_chart(per_class: Mapping[str, Mapping[str, float | None]], path: str | Path, title: str) -> Path:
    """Grouped bars ``per_class[series][class] = PQ`` (None drawn as missing)."""
    from ..plots import bar_chart

    series = list(per_class)
    classes = list(next(iter(per_class.values())))
    groups = {c: {s: (np.nan if per_class[s].get(c) is None else float(per_class[s][c])) for s in series}
              for c in classes}
    return bar_chart(groups, path, ylabel="PQ", title=title)
