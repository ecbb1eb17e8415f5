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
from .config import InputError
from .guards import NonFiniteWeightsError, first_non_finite_tensor
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


class PackageError(InputError):
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
        """The model with the package's weights.

        The file is untrusted input: the architecture is first built on the ``meta`` device (no memory)
        and its weight shapes compared with the package's, so that ``arch_kwargs`` cannot make this
        allocate more than the weights the file carries, and any constructor failure is a PackageError.
        """
        where = self.path or "package"
        _check_kwargs_within_weights(self.arch_kwargs, self.state_dict, where)
        try:
            with torch.device("meta"):
                skeleton = build_architecture(self.architecture, dict(self.arch_kwargs))
        except PackageError:
            raise
        except Exception as exc:  # noqa: BLE001 - the constructor's arguments come from the file
            raise PackageError(f"{where}: architecture {self.architecture!r} cannot be built from arch_kwargs "
                               f"{self.arch_kwargs} ({type(exc).__name__}: {_first_line(exc)})") from None
        expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
        given = {k: tuple(v.shape) for k, v in self.state_dict.items()}
        if expected != given:
            missing = sorted(set(expected) - set(given))
            unexpected = sorted(set(given) - set(expected))
            shapes = sorted(k for k in set(expected) & set(given) if expected[k] != given[k])
            detail = (f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}" if unexpected
                      else f"{shapes[0]} is {list(given[shapes[0]])} in the file, the architecture needs {list(expected[shapes[0]])}")
            raise PackageError(f"{where}: weights do not fit architecture {self.architecture!r} ({detail})")
        model = build_architecture(self.architecture, dict(self.arch_kwargs))
        try:
            model.load_state_dict(self.state_dict)
        except RuntimeError as exc:
            raise PackageError(f"{where}: weights do not fit architecture {self.architecture!r} ({_first_line(exc)})") from None
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
    state = model.state_dict()
    bad = first_non_finite_tensor(state)
    if bad is not None:  # a diverged model must never replace a working one
        raise NonFiniteWeightsError(f"not saving {path}: weight {bad!r} holds NaN or inf (training diverged)")
    payload = {
        "magic": PACKAGE_MAGIC,
        "format_version": PACKAGE_FORMAT,
        "framework_version": __version__,
        "torch_version": str(torch.__version__),
        "kind": kind,
        "architecture": architecture,
        "arch_kwargs": dict(arch_kwargs),
        "class_names": names,
        "state_dict": {k: v.detach().cpu() for k, v in state.items()},
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
    _check_fields(payload, path)
    return ModelPackage(
        kind=payload["kind"], architecture=payload["architecture"], arch_kwargs=dict(payload["arch_kwargs"]),
        class_names=list(payload["class_names"]), state_dict=payload["state_dict"],
        extra={} if payload.get("extra") is None else dict(payload["extra"]),
        framework_version=str(payload.get("framework_version", "?")), torch_version=str(payload.get("torch_version", "?")),
        format_version=version, path=path,
    )


#: Package fields and the type each must have.
FIELDS: dict[str, type] = {"kind": str, "architecture": str, "arch_kwargs": dict, "class_names": list, "state_dict": dict}


def _check_fields(payload: dict[str, Any], path: Path) -> None:
    """Types of every field, unique string class names, tensors as weights, no NaN / inf weight."""
    for key, kind in FIELDS.items():
        if key not in payload:
            raise PackageError(f"{path}: package field {key!r} is missing")
        if not isinstance(payload[key], kind):
            raise PackageError(f"{path}: package field {key!r} must be a {kind.__name__}, got {type(payload[key]).__name__}")
    if payload.get("extra") is not None and not isinstance(payload["extra"], dict):
        raise PackageError(f"{path}: package field 'extra' must be a dict, got {type(payload['extra']).__name__}")
    names = payload["class_names"]
    if not names or not all(isinstance(n, str) for n in names) or len(set(names)) != len(names):
        raise PackageError(f"{path}: class_names must be distinct strings, got {names!r:.200}")
    if not all(isinstance(k, str) for k in payload["arch_kwargs"]):
        raise PackageError(f"{path}: arch_kwargs keys must be strings, got {list(payload['arch_kwargs'])!r:.200}")
    for key, value in payload["state_dict"].items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise PackageError(f"{path}: state_dict entry {key!r:.80} must be a named tensor, got {type(value).__name__}")
    bad = first_non_finite_tensor(payload["state_dict"])
    if bad is not None:
        raise PackageError(f"{path}: weight {bad!r} holds NaN or inf; the model it was saved from had diverged")


def _check_kwargs_within_weights(kwargs: dict[str, Any], state_dict: dict[str, torch.Tensor], where: Any) -> None:
    """Refuse an integer argument larger than the number of weights in the file (a model cannot need
    more sizes or layers than it has weights), so a damaged ``arch_kwargs`` cannot make building hang."""
    limit = max(4096, sum(int(v.numel()) for v in state_dict.values()))

    def check(name: str, value: Any) -> None:
        if isinstance(value, bool):
            return
        if isinstance(value, int) and abs(value) > limit:
            raise PackageError(f"{where}: arch_kwargs {name} = {value} is larger than the model's weights allow ({limit})")
        if isinstance(value, (list, tuple)):
            for k, item in enumerate(value):
                check(f"{name}[{k}]", item)

    for name, value in kwargs.items():
        check(name, value)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__
