"""Runners: one per family of scenarios, chosen by ``scenario.name``.

A runner module exposes ``Config`` (a dataclass validated by :mod:`incremental.config`) and
``run(config, out_dir, *, progress, resume) -> dict`` returning the results to write. Runners are
imported lazily so that ``incremental run`` on digits does not import detection or panoptic code.
"""
from __future__ import annotations

import importlib
from types import ModuleType

from ..config import ConfigError

RUNNERS: dict[str, str] = {
    "split_digits": "incremental.runners.classification",
    "class_incremental": "incremental.runners.classification",
    "split_mnist": "incremental.runners.classification",
    "split_fashion_mnist": "incremental.runners.classification",
    "split_cifar10": "incremental.runners.classification",
    "split_cifar100": "incremental.runners.classification",
    "digits_transfer": "incremental.runners.transfer",
    "fashion_transfer": "incremental.runners.transfer",
    "synthfaces": "incremental.runners.multitask",
    "utkface": "incremental.runners.multitask",
    "csv_multitask": "incremental.runners.multitask",
    "panoptic_shapes": "incremental.runners.panoptic",
    "coco_panoptic": "incremental.runners.panoptic",
    "detection_scenes": "incremental.runners.detection",
}


def runner_for(scenario_name: object) -> ModuleType:
    if not isinstance(scenario_name, str) or scenario_name not in RUNNERS:
        raise ConfigError("scenario.name", f"unknown scenario {scenario_name!r}; known: {', '.join(sorted(RUNNERS))}")
    try:
        return importlib.import_module(RUNNERS[scenario_name])
    except ModuleNotFoundError as exc:  # a runner not built yet in this checkout
        if exc.name == RUNNERS[scenario_name]:
            raise ConfigError("scenario.name", f"scenario {scenario_name!r} is not available in this version") from None
        raise
