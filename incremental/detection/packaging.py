"""Detector model packages: :mod:`incremental.package` files of kind ``detector``.

The package stores the architecture (``fasterrcnn_tiny`` = :func:`~incremental.detection.model.build_detector`,
or ``torchvision:fasterrcnn_*`` = :func:`~incremental.detection.model.build_torchvision_detector`) with
its kwargs (``num_classes`` as the box head is now), the class names in label order (label ``i + 1`` is
``class_names[i]``) and, in ``extra``, the COCO category id of every class (what the model's predictions
files use) and, for the tiny detector, the input size.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from torch import nn

from ..package import PackageError, load_model, save_model
from .model import ARCHITECTURE, detector_kwargs, num_foreground_classes

KIND = "detector"


def save_detector(path: str | Path, model: nn.Module, class_names: Sequence[str],
                  category_ids: Sequence[int] | None = None, extra: dict[str, Any] | None = None) -> Path:
    """Write ``model`` as a detector package (atomically)."""
    names = [str(n) for n in class_names]
    if len(names) != num_foreground_classes(model):
        raise PackageError(f"{len(names)} class names for a detector with {num_foreground_classes(model)} classes")
    ids = [int(c) for c in category_ids] if category_ids is not None else list(range(1, len(names) + 1))
    if len(ids) != len(names) or len(set(ids)) != len(ids):
        raise PackageError(f"category ids {ids} must be unique, one per class {names}")
    kwargs = detector_kwargs(model)
    payload_extra: dict[str, Any] = {"category_ids": ids}
    if "image_size" in kwargs:  # the tiny detector's; torchvision's store min_size / max_size in kwargs
        payload_extra["image_size"] = int(kwargs["image_size"])
    return save_model(path, model, kind=KIND, architecture=getattr(model, "architecture", ARCHITECTURE),
                      arch_kwargs=kwargs, class_names=names, extra={**payload_extra, **(extra or {})})


def load_detector(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """``(model in eval mode, info)`` from a package; info has ``class_names``, ``category_ids``,
    ``package`` (the :class:`~incremental.package.ModelPackage`)."""
    package = load_model(path)
    return detector_from_package(package)


def detector_from_package(package: Any) -> tuple[nn.Module, dict[str, Any]]:
    where = getattr(package, "path", None) or "package"
    if package.kind != KIND:
        raise PackageError(f"{where} holds a {package.kind!r} model, not a detector")
    model = package.build()
    names = list(package.class_names)
    ids = list(package.extra.get("category_ids") or range(1, len(names) + 1))
    if len(ids) != len(names):
        raise PackageError(f"{where}: {len(ids)} category ids for {len(names)} classes")
    return model, {"class_names": names, "category_ids": [int(i) for i in ids], "package": package}
