"""Update a deployed classifier package with new classes, keeping the old ones.

The package's exemplars (the history library saved with it) are rehearsed while the new classes are
learned, so the old training set is not needed. Old-class rows of the output layer are kept as they
were and new rows are added. The report measures old-class and new-class accuracy before and after on
held-out data: a stratified hold-out of the new data, plus ``--old-data`` when given (the only honest
way to measure old classes when the new data has none of them).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .buffer import HistoryLibrary
from .data import Experience, TensorSamples
from .datasets import DataError, LabelledData, load_classification_data
from .package import ModelPackage, PackageError, save_model
from .trainer import Trainer, seed_everything

DEFAULT_INPUT = {"channels": 1, "size": [8, 8], "max_value": 1.0, "flat": True}


@dataclass
class UpdateOptions:
    strategy: str = "replay"
    epochs: int = 5
    lr: float = 0.05
    batch_size: int = 32
    mem_size: int = 200
    holdout: float = 0.2
    seed: int = 0
    old_data: str | None = None
    progress: bool = False

    @classmethod
    def from_any(cls, options: Any) -> "UpdateOptions":
        """From an ``UpdateOptions``, a mapping or None; missing / None values take the defaults."""
        if isinstance(options, cls):
            return options
        given = dict(options or {})
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in given.items() if k in names and v is not None})


def input_spec(package: ModelPackage) -> dict[str, Any]:
    """The input format the model was trained on (``extra['input']``), checked: the package is input."""
    given = package.extra.get("input")
    given = {} if given is None else given
    if not isinstance(given, dict):
        raise PackageError(f"{package.path}: extra['input'] must be a dict, got {type(given).__name__}")
    spec = {**DEFAULT_INPUT, **given}
    channels, size, max_value = spec["channels"], spec["size"], spec["max_value"]
    if not (isinstance(channels, int) and not isinstance(channels, bool) and channels in (1, 3)):
        raise PackageError(f"{package.path}: extra['input']['channels'] must be 1 or 3, got {channels!r:.80}")
    if not (isinstance(size, (list, tuple)) and len(size) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 4096 for v in size)):
        raise PackageError(f"{package.path}: extra['input']['size'] must be [height, width] in 1..4096, got {size!r:.80}")
    if not (isinstance(max_value, (int, float)) and not isinstance(max_value, bool) and 0 < max_value < 1e30):
        raise PackageError(f"{package.path}: extra['input']['max_value'] must be a positive number, got {max_value!r:.80}")
    if not isinstance(spec["flat"], bool):
        raise PackageError(f"{package.path}: extra['input']['flat'] must be true or false, got {spec['flat']!r:.80}")
    return spec


def saved_history(package: ModelPackage, capacity: int, seed: int, spec: dict[str, Any]) -> HistoryLibrary:
    """The package's exemplars as a history library, or a PackageError naming what is wrong with them
    (they are rehearsed beside the new data, so they must have its shape and the model's labels)."""
    saved = package.extra.get("history")
    if not isinstance(saved, dict) or saved.get("samples") is None:
        raise DataError(f"{package.path}: the package carries no exemplars to rehearse; "
                        "use --strategy lwf (distillation, no old data needed) or naive")
    try:
        history = HistoryLibrary(capacity, saved.get("policy", "reservoir"), seed=seed)
        history.load_state_dict(saved)
        samples = history.samples
        if not isinstance(samples, TensorSamples) or not isinstance(samples.y, torch.Tensor):
            raise TypeError("not a tensor sample set")
        channels, (height, width) = int(spec["channels"]), spec["size"]
        shape = [channels * height * width] if spec["flat"] else [channels, height, width]
        x, y = samples.x, samples.y
        if x.dtype in (torch.bool, torch.complex64, torch.complex128) or list(x.shape[1:]) != shape:
            raise ValueError(f"samples must be numbers of shape (N, {', '.join(map(str, shape))}), "
                             f"got {x.dtype} {list(x.shape)}")
        if not (y.dim() == 1 and len(y) == len(x) and not y.is_floating_point()
                and (not len(y) or 0 <= int(y.min()) <= int(y.max()) < len(package.class_names))):
            raise ValueError("labels must be class indices of the package, one per sample")
        if x.is_floating_point() and not bool(torch.isfinite(x).all()):
            raise ValueError("samples hold NaN or inf")
        if not (len(samples.t) == len(samples.labels) == len(x)):
            raise ValueError("task labels and class labels must have one entry per sample")
    except Exception as exc:  # noqa: BLE001 - the exemplars come from the file
        raise PackageError(f"{package.path}: the exemplars in extra['history'] are unusable "
                           f"({type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''})") from None
    history.capacity = capacity
    return history


def to_model_input(data: LabelledData, spec: dict[str, Any]) -> torch.Tensor:
    """Reshape ``data.x`` to what the model takes; a size mismatch is a clear error."""
    expected = int(spec["channels"]) * int(spec["size"][0]) * int(spec["size"][1])
    x = data.x.reshape(len(data.x), -1)
    if x.shape[1] != expected:
        raise DataError(f"{data.source}: samples have {x.shape[1]} values, the model takes {expected} "
                        f"({spec['channels']}x{spec['size'][0]}x{spec['size'][1]})")
    if spec.get("flat", True):
        return x
    return x.view(len(x), int(spec["channels"]), int(spec["size"][0]), int(spec["size"][1]))


def map_classes(model_names: list[str], data: LabelledData) -> tuple[torch.Tensor, list[str], list[str]]:
    """Labels in the model's index space; returns (y, new class names, all class names).

    The same name is the same class. Names that differ only by case or surrounding spaces are a clash
    (``Cat`` against ``cat``): almost always a labelling mistake that would silently create a second class.
    """
    folded = {name.strip().casefold(): name for name in model_names}
    used = sorted(set(data.y.tolist()))
    names = list(model_names)
    index = {name: i for i, name in enumerate(names)}
    new: list[str] = []
    for local in used:
        name = data.class_names[local]
        if name in index:
            continue
        twin = folded.get(name.strip().casefold())
        if twin is not None:
            raise DataError(f"{data.source}: class {name!r} clashes with the model's class {twin!r} "
                            "(same name up to case or spaces); rename one of them")
        index[name] = len(names)
        names.append(name)
        new.append(name)
    if not new:
        raise DataError(f"{data.source}: no new class (every class in the data is already one of the model's: "
                        f"{', '.join(data.class_names[i] for i in used)})")
    lookup = torch.tensor([index.get(n, -1) for n in data.class_names])
    return lookup[data.y], new, names


def stratified_holdout(y: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class split: ``fraction`` of each class (at least one sample if it has two) held out."""
    gen = torch.Generator().manual_seed(seed)
    train, held = [], []
    for c in sorted(set(y.tolist())):
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        k = int(round(fraction * len(idx)))
        k = min(max(k, 1 if len(idx) > 1 and fraction > 0 else 0), len(idx) - 1) if len(idx) > 1 else 0
        held.append(idx[:k])
        train.append(idx[k:])
    return torch.cat(train).sort().values, torch.cat(held).sort().values


@torch.no_grad()
def accuracy_on(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float | None:
    if len(y) == 0:
        return None
    model.eval()
    return float((model(x).argmax(1) == y).float().mean())


def update(package: ModelPackage, data_path: str | Path, out_dir: Path, options: Any = None) -> dict[str, Any]:
    """Learn the new classes in ``data_path``; returns the report (files are written by the caller)."""
    options = UpdateOptions.from_any(options)
    spec = input_spec(package)
    size = (int(spec["size"][0]), int(spec["size"][1]))
    data = load_classification_data(data_path, int(spec["channels"]), size, float(spec["max_value"]))
    y, new_names, all_names = map_classes(package.class_names, data)
    x = to_model_input(data, spec)
    n_old = len(package.class_names)
    old_eval_x, old_eval_y = x[:0], y[:0]
    if options.old_data:
        old = load_classification_data(options.old_data, int(spec["channels"]), size, float(spec["max_value"]))
        unknown = sorted({old.class_names[i] for i in set(old.y.tolist())} - set(package.class_names))
        if unknown:
            raise DataError(f"{old.source}: --old-data must hold the model's classes only; unknown: {unknown}")
        lookup = torch.tensor([package.class_names.index(n) if n in package.class_names else -1 for n in old.class_names])
        old_eval_x, old_eval_y = to_model_input(old, spec), lookup[old.y]
    history = None
    if options.strategy in ("replay", "gradient_mixing"):
        history = saved_history(package, options.mem_size, options.seed, spec)

    seed_everything(options.seed)
    train_idx, held_idx = stratified_holdout(y, options.holdout, options.seed)
    held_x, held_y = x[held_idx], y[held_idx]
    is_new_held = held_y >= n_old
    eval_old_x = torch.cat([old_eval_x, held_x[~is_new_held]])
    eval_old_y = torch.cat([old_eval_y, held_y[~is_new_held]])
    eval_new_x, eval_new_y = held_x[is_new_held], held_y[is_new_held]

    model = package.build()
    before = {"old_accuracy": accuracy_on(model, eval_old_x, eval_old_y),
              "new_accuracy": accuracy_on(model, eval_new_x, eval_new_y)}

    plugins: list[Any] = []
    if options.strategy == "lwf":
        from avalanche.training.plugins import LwFPlugin

        lwf = LwFPlugin(alpha=1.0, temperature=2.0)
        # The deployed model is the teacher for the classes it knows.
        lwf.lwf.prev_model = copy.deepcopy(model)
        lwf.lwf.prev_classes_by_task[0] = set(range(n_old))
        lwf.lwf.expcount = 1
        plugins.append(lwf)
    elif options.strategy == "gradient_mixing":
        from strategies.gradient_mixing import GradientMixingPlugin

        plugins.append(GradientMixingPlugin())
    elif options.strategy not in ("replay", "naive"):
        raise DataError(f"unknown update strategy {options.strategy!r}; known: replay, gradient_mixing, lwf, naive")

    model.train()
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=options.lr), nn.CrossEntropyLoss(),
                      train_mb_size=options.batch_size, train_epochs=options.epochs, plugins=plugins,
                      history=history, seed=options.seed, progress=options.progress)
    trainer.classes_seen = set(range(n_old))
    train_y = y[train_idx]
    experience = Experience(TensorSamples(x[train_idx], train_y), 0, sorted(set(train_y.tolist())),
                            previous_classes=list(range(n_old)))
    trainer.train(experience)
    after = {"old_accuracy": accuracy_on(trainer.model, eval_old_x, eval_old_y),
             "new_accuracy": accuracy_on(trainer.model, eval_new_x, eval_new_y)}

    kwargs = {**package.arch_kwargs, "n_classes": len(all_names)}
    extra = {**package.extra, "input": spec}
    if history is not None:
        extra["history"] = history.state_dict()
    elif "history" in package.extra:
        extra.pop("history")
    model_path = save_model(out_dir / "model.pt", trainer.model, kind="classifier", architecture=package.architecture,
                            arch_kwargs=kwargs, class_names=all_names, extra=extra)
    return {
        "model": str(package.path),
        "data": str(data.source),
        "updated_model": str(model_path),
        "strategy": options.strategy,
        "old_classes": list(package.class_names),
        "new_classes": new_names,
        "n_train": int(len(train_idx)),
        "n_eval_old": int(len(eval_old_y)),
        "n_eval_new": int(len(eval_new_y)),
        "before": before,
        "after": after,
    }


def classifier_package_extra(history: HistoryLibrary | None, spec: dict[str, Any] | None = None) -> dict[str, Any]:
    """The extras a classifier package carries: input format and the exemplars for later updates."""
    extra: dict[str, Any] = {"input": {**DEFAULT_INPUT, **(spec or {})}}
    if history is not None and len(history):
        extra["history"] = history.export_state()
    return extra


def format_report(report: dict[str, Any]) -> str:
    def pct(v: float | None) -> str:
        return "   n/a" if v is None else f"{100 * v:6.1f}"

    rows = [
        f"{'':>14} | {'before':>7} {'after':>7}",
        f"{'old classes':>14} | {pct(report['before']['old_accuracy']):>7} {pct(report['after']['old_accuracy']):>7}",
        f"{'new classes':>14} | {pct(report['before']['new_accuracy']):>7} {pct(report['after']['new_accuracy']):>7}",
    ]
    header = (f"updated {report['model']} with {len(report['new_classes'])} new classes "
              f"({', '.join(report['new_classes'])}) using {report['strategy']}")
    if report["n_eval_old"] == 0:
        rows.append("(no old-class samples to measure: pass --old-data with held-out data of the old classes)")
    return "\n".join([header, *rows])

