"""Detection samples to and from Avalanche detection datasets (for ``ObjectDetectionTemplate``).

Avalanche's detection datasets append the task label to each item, so the wrapped dataset yields
``(float image, target)`` and Avalanche yields ``[image, target, task_label]``; its own
``detection_collate_fn`` keeps lists (tuples), which is what torchvision's detectors take.
"""
from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import Dataset

from ..data import ListSamples
from .coco import DetectionData, detection_collate, to_float_image


class _Items(Dataset):
    def __init__(self, samples: ListSamples) -> None:
        self.samples = samples.samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x, target, _ = self.samples[i]
        return to_float_image(x), target


def to_avalanche_dataset(data: DetectionData | ListSamples, task_label: int = 0) -> Any:
    """An Avalanche ``DetectionDataset`` with the same images and targets."""
    from avalanche.benchmarks.utils.collate_functions import detection_collate_fn
    from avalanche.benchmarks.utils.detection_dataset import make_detection_dataset

    samples = data.samples if isinstance(data, DetectionData) else data
    return make_detection_dataset(_Items(samples), task_labels=int(task_label),
                                  targets=[t for _, t, _ in samples.samples], collate_fn=detection_collate_fn)


def samples_from_avalanche(dataset: Any) -> ListSamples:
    """Our :class:`~incremental.data.ListSamples` (collated by :func:`detection_collate`) from an
    Avalanche detection dataset, read once."""
    items = [dataset[i] for i in range(len(dataset))]
    samples = [(x, y, int(t)) for x, y, t in items]
    labels = [int(y["labels"][0]) if len(y["labels"]) else 0 for _, y, _ in samples]
    return ListSamples(samples, torch.tensor(labels, dtype=torch.long), detection_collate)
