"""Models trained elsewhere, brought into model packages (``incremental package``, :func:`package_model`).

The people who update models usually already have one: a torchvision ResNet or MobileNet fine-tuned on
their classes, a torchvision Faster R-CNN on their objects, or their own ``nn.Module``, saved with
``torch.save(model.state_dict())``. A package of it is what ``incremental update`` and
``incremental predict`` work on. Architectures, by name:

- ``torchvision:<classification model>`` (``torchvision:resnet18``, ``torchvision:mobilenet_v3_small``,
  any name of ``torchvision.models.list_models(torchvision.models)``): the model's last ``nn.Linear``
  becomes the growing head (:class:`incremental.models.TorchvisionClassifier`);
- ``torchvision:fasterrcnn_resnet50_fpn``, ``torchvision:fasterrcnn_mobilenet_v3_large_fpn``,
  ``torchvision:fasterrcnn_mobilenet_v3_large_320_fpn``: detectors
  (:func:`incremental.detection.model.build_torchvision_detector`);
- ``module:callable`` (``my_models.nets:FashionNet``): the user's own ``nn.Module`` class, built with the
  stored keyword arguments; its last ``nn.Linear`` becomes the growing head (:class:`ImportedClassifier`).

A classifier's package must behave exactly as the model it came from: :func:`package_model` rebuilds the
packaged model from its stored description, loads the weights strictly, and compares its outputs with
the given model's on a probe batch. A model whose last ``nn.Linear`` is not the layer its ``forward``
ends with (a softmax after it, a head used through ``F.linear``) is refused there rather than packaged
wrong. Every problem is a one-line :class:`~incremental.package.PackageError`.
"""
from __future__ import annotations

import copy
import importlib
import json
import sys
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from .guards import first_non_finite_tensor
from .package import PackageError, build_architecture, save_model
from .preprocessing import Preprocessing, as_pair

TORCHVISION_PREFIX = "torchvision:"

#: Entries of a checkpoint dict that may hold the state dict (Lightning, torchvision's references, tutorials).
CHECKPOINT_ENTRIES = ("state_dict", "model_state_dict", "model", "net", "weights")

#: Prefixes wrappers add to every key: DataParallel / DDP, torch.compile, a LightningModule's attribute.
WRAPPER_PREFIXES = ("module.", "_orig_mod.", "model.", "net.")


# ----------------------------------------------------------------------------- architecture names
def is_torchvision_detector(architecture: str) -> bool:
    from .detection.model import TORCHVISION_DETECTORS

    return architecture.startswith(TORCHVISION_PREFIX) and architecture.removeprefix(TORCHVISION_PREFIX) in TORCHVISION_DETECTORS


def is_module_target(architecture: str) -> bool:
    """``package.module:Class`` (not ``torchvision:...``)."""
    return ":" in architecture and not architecture.startswith(TORCHVISION_PREFIX)


def resolve_module_class(target: str) -> type[nn.Module]:
    """The ``nn.Module`` subclass named by ``module:Class`` (``Class`` may be dotted).

    Only classes of non-standard-library modules are accepted: a package names its architecture, and
    building a package must never call an arbitrary function it names. The current directory is searched after ``sys.path``
    (``incremental`` started as a console script does not have it there, ``python -m`` does).
    """
    module_name, _, attr = target.partition(":")
    if not module_name or not attr:
        raise PackageError(f"architecture {target!r}: expected module:Class (e.g. my_models.nets:FashionNet)")
    if module_name.split(".")[0] in sys.stdlib_module_names:  # importing some of them has side effects
        raise PackageError(f"architecture {target!r}: {module_name} is a standard-library module, not a model's")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        cwd = str(Path.cwd())
        if exc.name != module_name.split(".")[0] or cwd in sys.path:
            raise PackageError(f"architecture {target!r}: cannot import {module_name!r} ({exc})") from None
        sys.path.append(cwd)
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError:
            raise PackageError(f"architecture {target!r}: cannot import {module_name!r} (not on PYTHONPATH nor in the "
                               "current directory)") from None
    obj: Any = module
    for part in attr.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            raise PackageError(f"architecture {target!r}: {module_name} has no {attr!r}")
    if not (isinstance(obj, type) and issubclass(obj, nn.Module)):
        raise PackageError(f"architecture {target!r}: {attr} is a {type(obj).__name__}, not an nn.Module class")
    return obj


def instantiate(cls: type[nn.Module], kwargs: Mapping[str, Any], target: str) -> nn.Module:
    try:
        return cls(**dict(kwargs))
    except TypeError as exc:
        raise PackageError(f"architecture {target!r}: {cls.__name__}(**{dict(kwargs)}) fails ({exc}); "
                           "pass its constructor arguments with --kwargs") from None


class ImportedClassifier(nn.Module):
    """A user's own classifier class with its last ``nn.Linear`` replaced by a growing head.

    ``features`` is the user's model with that layer set to ``nn.Identity`` (its other keys unchanged),
    ``classifier`` the :class:`~incremental.models.GrowingClassifier`; ``head_name`` the replaced layer's
    dotted name. ``kwargs`` are the class's constructor arguments, stored in the package.
    """

    def __init__(self, target: str, n_classes: int, kwargs: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        from .models import GrowingClassifier, detach_head

        self.target = target
        model = instantiate(resolve_module_class(target), kwargs or {}, target)
        try:
            self.head_name, head = detach_head(model)
        except ValueError as exc:
            raise PackageError(f"architecture {target!r}: {exc}") from None
        self.features = model
        self.classifier = GrowingClassifier(head.in_features, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def build_imported(architecture: str, kwargs: Mapping[str, Any]) -> nn.Module:
    """Build a package architecture of this module's kinds (called by :func:`incremental.package.build_architecture`)."""
    kwargs = dict(kwargs)
    if is_torchvision_detector(architecture):
        from .detection.model import build_torchvision_detector

        return build_torchvision_detector(architecture.removeprefix(TORCHVISION_PREFIX), **kwargs)
    if architecture.startswith(TORCHVISION_PREFIX):
        from .models import build_model

        kwargs.pop("weights", None)  # a package carries its weights
        return build_model(architecture, **kwargs)
    return ImportedClassifier(architecture, int(kwargs.pop("n_classes")), kwargs.pop("kwargs", {}))


# ----------------------------------------------------------------------------- weights files
def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict in a weights file: a plain ``state_dict()``, or a checkpoint dict holding one under
    ``state_dict`` / ``model_state_dict`` / ``model`` / ``net`` / ``weights``. Read with
    ``weights_only=True``: a file that needs unpickling of code (a whole pickled model) is refused."""
    path = Path(path)
    if not path.is_file():
        raise PackageError(f"weights file {str(path)!r} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure means "not a state dict we can read safely"
        text = str(exc)
        if "weights_only" in text or "Unsupported global" in text:
            raise PackageError(f"{path} holds pickled Python objects (a whole model saved with torch.save(model)?), "
                               "not a state dict: save model.state_dict() instead") from None
        first = text.splitlines()[0][:200] if text else type(exc).__name__
        raise PackageError(f"{path} is not a readable weights file ({first})") from None
    state = _find_state_dict(obj)
    if state is None:
        keys = ", ".join(map(str, list(obj)[:8])) if isinstance(obj, dict) else type(obj).__name__
        raise PackageError(f"{path} holds no state dict (found: {keys}; expected parameter names -> tensors, or a "
                           f"checkpoint with one of {', '.join(CHECKPOINT_ENTRIES)})")
    bad = first_non_finite_tensor(state)
    if bad is not None:  # the user's file is bad input (exit 2), not a run that diverged here
        raise PackageError(f"{path}: weight {bad!r} holds NaN or inf; a model with such weights cannot be updated")
    return state


def _find_state_dict(obj: Any) -> dict[str, torch.Tensor] | None:
    if not isinstance(obj, dict) or not obj:
        return None
    if all(isinstance(v, torch.Tensor) for v in obj.values()):
        return {str(k): v for k, v in obj.items()}
    for entry in CHECKPOINT_ENTRIES:
        found = _find_state_dict(obj.get(entry))
        if found is not None:
            return found
    return None


def _prefix_variants(state: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """``state`` and the versions of it with wrapper prefixes stripped, one layer at a time."""
    variants = [state]
    current = state
    while True:
        prefix = next((p for p in WRAPPER_PREFIXES if current and all(k.startswith(p) for k in current)), None)
        if prefix is None:
            return variants
        current = {k[len(prefix):]: v for k, v in current.items()}
        variants.append(current)


def fit_state_dict(state: dict[str, torch.Tensor], expected: Mapping[str, torch.Tensor], where: str, target: str,
                   head_check: Callable[[dict[str, torch.Tensor]], None] | None = None) -> dict[str, torch.Tensor]:
    """``state`` with its keys matched to ``expected``, checked key by key.

    Wrapper prefixes (``module.`` from DataParallel, ``_orig_mod.``, ``model.``) are stripped when that
    matches more keys. Then, in this order, the first problem is a one-line error naming it: a missing
    key, an unexpected key, ``head_check`` (the class count), a shape mismatch.
    """
    best = max(_prefix_variants(state), key=lambda s: len(set(s) & set(expected)))  # first wins ties
    missing = [k for k in expected if k not in best]
    unexpected = [k for k in best if k not in expected]
    for keys, kind in ((missing, "missing"), (unexpected, "unexpected")):
        if keys:
            more = f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""
            raise PackageError(f"{where} does not fit {target}: {kind} key {keys[0]!r}{more}")
    if head_check is not None:
        head_check(best)
    for key, value in best.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise PackageError(f"{where} does not fit {target}: {key!r} has shape {tuple(value.shape)}, "
                               f"{target} needs {tuple(expected[key].shape)}")
    return best


# ----------------------------------------------------------------------------- class names
def read_class_names(path: str | Path) -> tuple[list[str], list[int] | None]:
    """Class names in output order from ``path``, and COCO category ids when the file gives them.

    A text file has one name per line (blank lines skipped); a ``.json`` file holds a list of names, a
    list of COCO categories (``{"id", "name"}``) or a COCO file with ``categories``.
    """
    path = Path(path)
    if not path.is_file():
        raise PackageError(f"classes file {str(path)!r} does not exist")
    ids: list[int] | None = None
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise PackageError(f"{path}: not valid JSON ({exc})") from None
        if isinstance(data, dict):
            data = data.get("categories")
        if not isinstance(data, list):
            raise PackageError(f"{path}: expected a list of class names, a list of COCO categories or a COCO file")
        if data and all(isinstance(c, dict) for c in data):
            if not all(isinstance(c.get("name"), str) and isinstance(c.get("id"), int) for c in data):
                raise PackageError(f"{path}: every category needs an integer 'id' and a string 'name'")
            ids = [int(c["id"]) for c in data]
            data = [c["name"] for c in data]
        if not all(isinstance(n, str) for n in data):
            raise PackageError(f"{path}: class names must be strings")
        names = [n.strip() for n in data]
    else:
        try:
            lines = path.read_text().splitlines()
        except UnicodeDecodeError:
            raise PackageError(f"{path}: not a text file (one class name per line)") from None
        names = [line.strip() for line in lines if line.strip()]
    if not names:
        raise PackageError(f"{path}: lists no class")
    seen: dict[str, int] = {}
    for i, name in enumerate(names):
        if name in seen:
            raise PackageError(f"{path}: class {name!r} is listed twice (entries {seen[name] + 1} and {i + 1})")
        seen[name] = i
    if ids is not None and len(set(ids)) != len(ids):
        raise PackageError(f"{path}: category ids must be unique, got {ids}")
    return names, ids


# ----------------------------------------------------------------------------- packaging
def package_model(
    model: nn.Module,
    class_names: Sequence[str],
    path: str | Path,
    *,
    architecture: str | None = None,
    kwargs: Mapping[str, Any] | None = None,
    preprocessing: Preprocessing | Mapping[str, Any] | None = None,
    category_ids: Sequence[int] | None = None,
    provenance: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``model`` (with its weights as they are) as a package that ``incremental update`` and
    ``incremental predict`` take; returns the path.

    ``architecture`` names how to rebuild it: ``torchvision:<name>`` (a torchvision classifier or Faster
    R-CNN) or ``module:Class`` (default for other models: the model's own class, built with ``kwargs``).
    ``class_names`` are in output order (detectors: without the background). ``preprocessing``
    (classifiers; a :class:`~incremental.preprocessing.Preprocessing` or a dict with ``size``,
    ``channels``, ``mean``, ``std``, ``resize``, ``flat``, ``max_value``) is stored and applied by every
    command that feeds the model; torchvision classifiers default to 3x224x224 without normalisation.
    Detectors carry theirs in the model (``min_size``, ``image_mean``, ...: read from ``model``).
    """
    from torchvision.models.detection import FasterRCNN

    names = [str(n) for n in class_names]
    if isinstance(model, FasterRCNN) or (architecture is not None and is_torchvision_detector(architecture)):
        if architecture is None or not is_torchvision_detector(architecture):
            from .detection.model import TORCHVISION_DETECTORS

            raise PackageError(f"a Faster R-CNN needs architecture='torchvision:<name>' with <name> one of "
                               f"{', '.join(TORCHVISION_DETECTORS)}, got {architecture!r}")
        if preprocessing is not None:
            raise PackageError("a detector's preprocessing is part of the model (min_size, max_size, image_mean, "
                               "image_std); set it there, not with preprocessing=")
        return _package_detector(model, names, Path(path), architecture, kwargs or {}, category_ids, provenance)
    return _package_classifier(model, names, Path(path), architecture, kwargs or {}, preprocessing, provenance)


def default_architecture(model: nn.Module) -> str:
    cls = type(model)
    if cls.__module__.startswith("torchvision."):
        raise PackageError(f"pass architecture='torchvision:<name>' for a torchvision {cls.__name__} "
                           "(several torchvision names build that class)")
    if cls.__module__ == "__main__":
        raise PackageError(f"{cls.__name__} is defined in the script being run (__main__): move it to a module "
                           "that can be imported, or pass architecture='module:Class'")
    return f"{cls.__module__}:{cls.__qualname__}"


def _package_classifier(model: nn.Module, names: list[str], path: Path, architecture: str | None,
                        kwargs: Mapping[str, Any], preprocessing: Any, provenance: Mapping[str, Any] | None) -> Path:
    from .models import detach_head

    architecture = architecture or default_architecture(model)
    is_tv = architecture.startswith(TORCHVISION_PREFIX)
    if is_tv:
        prep = Preprocessing.from_any(preprocessing, channels=3, size=224)
        if prep.channels != 3:
            raise PackageError(f"{architecture} takes 3-channel images (grayscale images are repeated to 3 channels "
                               "by the preprocessing); leave channels at 3")
    elif preprocessing is None:
        raise PackageError(f"{architecture}: preprocessing= must give at least the input size (e.g. {{'size': 28}})")
    else:
        prep = Preprocessing.from_any(preprocessing, **infer_input(model, preprocessing))
    features = copy.deepcopy(model)
    try:
        head_name, head = detach_head(features)
    except ValueError as exc:
        raise PackageError(f"{architecture}: {exc}") from None
    if head.out_features != len(names):
        raise PackageError(f"{len(names)} class names for a model whose head {head_name!r} has {head.out_features} outputs")
    if is_tv:
        arch_kwargs: dict[str, Any] = {"n_classes": len(names), "in_channels": 3, **({"options": dict(kwargs)} if kwargs else {})}
    else:
        arch_kwargs = {"n_classes": len(names), "kwargs": dict(kwargs)}
    try:
        rebuilt = build_architecture(architecture, arch_kwargs)
    except (TypeError, ValueError) as exc:
        raise PackageError(f"{architecture}: cannot be built ({str(exc).splitlines()[0]})") from None
    state = {f"features.{k}": v for k, v in features.state_dict().items()}
    state["classifier.linear.weight"] = head.weight.detach()
    state["classifier.linear.bias"] = head.bias.detach() if head.bias is not None else torch.zeros(head.out_features)
    try:
        rebuilt.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).splitlines()[1].strip() if len(str(exc).splitlines()) > 1 else str(exc)
        raise PackageError(f"{architecture} with {dict(kwargs)} builds another model than the one given ({first}); "
                           "pass the constructor arguments it was made with") from None
    check_same_outputs(model, rebuilt, prep, head_name)
    extra = {"input": prep.to_extra(), "imported": {"architecture": architecture, "head": head_name, **(provenance or {})}}
    return save_model(path, rebuilt, kind="classifier", architecture=architecture, arch_kwargs=arch_kwargs,
                      class_names=names, extra=extra)


def infer_input(model: nn.Module, given: Mapping[str, Any] | Preprocessing) -> dict[str, Any]:
    """Defaults for what ``given`` leaves out: ``channels`` from the first ``Conv2d`` (3 if none and the
    first ``Linear`` takes 3*H*W values, else 1); ``flat`` when the model has no convolution."""
    given = given.to_extra() if isinstance(given, Preprocessing) else dict(given)
    size = given.get("size", given.get("input_size"))
    if size is None:
        raise PackageError("preprocessing: the input size is needed (--input-size)")
    h, w = as_pair(size, "size")
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if conv is not None:
        return {"channels": conv.in_channels, "flat": False}
    first = next((m for m in model.modules() if isinstance(m, nn.Linear)), None)
    channels = 3 if first is not None and first.in_features == 3 * h * w else 1
    return {"channels": channels, "flat": True}


def check_same_outputs(original: nn.Module, rebuilt: nn.Module, prep: Preprocessing, head_name: str) -> None:
    """The packaged model must compute what the user's model computes: compared on a seeded probe batch
    in eval mode (the user's model is put back in the mode it was in)."""
    probe = torch.rand((2, *prep.input_shape), generator=torch.Generator().manual_seed(0))
    was_training = original.training
    original.eval()
    rebuilt.eval()
    try:
        with torch.no_grad():
            try:
                expected = original(probe)
            except Exception as exc:  # noqa: BLE001 - any failure: the stored input does not fit the model
                raise PackageError(f"the model does not take inputs of {prep.describe()} "
                                   f"({type(exc).__name__}: {str(exc).splitlines()[0][:160]}); check the input size, "
                                   "channels and --flat") from None
            got = rebuilt(probe)
    finally:
        original.train(was_training)
    if not isinstance(expected, torch.Tensor) or expected.shape != got.shape:
        shape = tuple(expected.shape) if isinstance(expected, torch.Tensor) else type(expected).__name__
        raise PackageError(f"the model returns {shape}, the packaged model {tuple(got.shape)}: its last nn.Linear "
                           f"{head_name!r} is not the layer its forward() ends with")
    diff = float((expected - got).abs().max())
    if diff > 1e-4 * max(1.0, float(expected.abs().max())):
        raise PackageError(f"the packaged model does not reproduce the model's outputs (max difference {diff:.3g}): "
                           f"its last nn.Linear {head_name!r} is not the layer its forward() ends with")


def _package_detector(model: nn.Module, names: list[str], path: Path, architecture: str, kwargs: Mapping[str, Any],
                      category_ids: Sequence[int] | None, provenance: Mapping[str, Any] | None) -> Path:
    from .detection.model import build_torchvision_detector, detector_settings
    from .detection.packaging import save_detector

    rows = int(model.roi_heads.box_predictor.cls_score.out_features)
    if rows != len(names) + 1:
        raise PackageError(f"{len(names)} class names for a detector whose box predictor has {rows} outputs "
                           f"({rows - 1} classes + background); list the classes without the background")
    norm = "batch" if any(isinstance(m, nn.BatchNorm2d) for m in model.backbone.modules()) else "frozen"
    options = {"norm": norm, "trainable_backbone_layers": 3, **detector_settings(model), **dict(kwargs)}
    name = architecture.removeprefix(TORCHVISION_PREFIX)
    try:
        rebuilt = build_torchvision_detector(name, len(names), **options)
    except (TypeError, ValueError) as exc:
        raise PackageError(str(exc).splitlines()[0]) from None
    fitted = fit_state_dict(dict(model.state_dict()), rebuilt.state_dict(), "the model", architecture)
    rebuilt.load_state_dict(fitted)
    extra = {"imported": {"architecture": architecture, **(provenance or {})}}
    return save_detector(path, rebuilt, names, category_ids, extra=extra)
