"""Model packages: one file with everything needed to rebuild a deployed model without its config.

A package holds the model kind (``classifier``, ``panoptic``, ``detector``), the architecture name and
its constructor arguments, the class names in output order, the weights, the versions that wrote it
and a format version, plus optional extras: the exemplars of the history library (so that a later
update can rehearse the old classes without the old data set) and preprocessing facts (input size).

The file is a ``torch.save`` of plain tensors, strings, numbers, lists and dicts and is always read
with ``torch.load(weights_only=True)``: loading a package never executes code from the file.
Architectures are looked up by name in :data:`ARCHITECTURES` (lazy ``module:callable`` strings), so
detection and panoptic models slot in without this module importing them.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from . import __version__
from .io import save_torch

PACKAGE_FORMAT = 1
PACKAGE_MAGIC = "incremental-model-package"

ARCHITECTURES: dict[str, str] = {
    "mlp": "incremental.models:MLP",
    "convnet": "incremental.models:SmallConvNet",
    "resnet18_reduced": "incremental.models:ReducedResNet18",
    "panoptic_tiny": "incremental.panoptic.model:build_panoptic_model",
    "fasterrcnn_tiny": "incremental.detection.model:build_detector",
}


class PackageError(ValueError):
    """A file that is not a usable model package; the message names the file and the problem."""


def register_architecture(name: str, target: str | Callable[..., nn.Module]) -> None:
    """Make ``name`` buildable from packages (``"module:callable"`` or the callable itself)."""
    ARCHITECTURES[name] = target  # type: ignore[assignment]


def build_architecture(name: str, kwargs: dict[str, Any]) -> nn.Module:
    if name.startswith("torchvision:") or (":" in name and name not in ARCHITECTURES):
        from .importing import build_imported  # torchvision classifiers / detectors, a user's module:Class

        return build_imported(name, kwargs)
    target: Any = ARCHITECTURES.get(name)
    if target is None:
        raise PackageError(f"unknown architecture {name!r}; known: {', '.join(sorted(ARCHITECTURES))}")
    if isinstance(target, str):
        module_name, attr = target.split(":")
        target = getattr(importlib.import_module(module_name), attr)
    return target(**kwargs)


@dataclass
class ModelPackage:
    """A loaded package: metadata plus weights; :meth:`build` makes the model."""

    kind: str
    architecture: str
    arch_kwargs: dict[str, Any]
    class_names: list[str]
    state_dict: dict[str, torch.Tensor]
    extra: dict[str, Any] = field(default_factory=dict)
    framework_version: str = __version__
    torch_version: str = str(torch.__version__)
    format_version: int = PACKAGE_FORMAT
    path: Path | None = None

    def build(self) -> nn.Module:
        model = build_architecture(self.architecture, dict(self.arch_kwargs))
        try:
            model.load_state_dict(self.state_dict)
        except RuntimeError as exc:
            first = str(exc).splitlines()[0]
            raise PackageError(f"{self.path or 'package'}: weights do not fit architecture {self.architecture!r} ({first})") from None
        model.eval()
        return model


def save_model(
    path: str | Path,
    model: nn.Module,
    *,
    kind: str,
    architecture: str,
    arch_kwargs: dict[str, Any],
    class_names: list[str],
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write a package atomically. ``arch_kwargs`` must rebuild ``model`` (``n_classes`` included)."""
    names = [str(c) for c in class_names]
    if len(set(names)) != len(names):
        raise PackageError(f"class names must be unique, got {names}")
    payload = {
        "magic": PACKAGE_MAGIC,
        "format_version": PACKAGE_FORMAT,
        "framework_version": __version__,
        "torch_version": str(torch.__version__),
        "kind": kind,
        "architecture": architecture,
        "arch_kwargs": dict(arch_kwargs),
        "class_names": names,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "extra": extra or {},
    }
    return save_torch(path, payload)


def load_model(path: str | Path) -> ModelPackage:
    """Read and check a package (never executes code from the file)."""
    path = Path(path)
    if not path.is_file():
        raise PackageError(f"model package {str(path)!r} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure means "not a package we can read"
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise PackageError(f"{path} is not a model package (cannot be read safely: {reason})") from None
    if not isinstance(payload, dict) or payload.get("magic") != PACKAGE_MAGIC:
        raise PackageError(f"{path} is not a model package (no package header; was it saved with incremental.save_model?)")
    version = payload.get("format_version")
    if not isinstance(version, int) or version > PACKAGE_FORMAT:
        raise PackageError(
            f"{path} has package format {version!r}, newer than this version of incremental reads "
            f"({PACKAGE_FORMAT}); upgrade incremental-adapt"
        )
    for key in ("kind", "architecture", "arch_kwargs", "class_names", "state_dict"):
        if key not in payload:
            raise PackageError(f"{path}: package field {key!r} is missing")
    return ModelPackage(
        kind=payload["kind"], architecture=payload["architecture"], arch_kwargs=dict(payload["arch_kwargs"]),
        class_names=list(payload["class_names"]), state_dict=payload["state_dict"], extra=dict(payload.get("extra", {})),
        framework_version=payload.get("framework_version", "?"), torch_version=payload.get("torch_version", "?"),
        format_version=version, path=path,
    )
