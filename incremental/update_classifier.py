"""Update a deployed classifier package with new classes, keeping the old ones.

Every input the model sees (the new data, ``--old-data``, the exemplars, the report's evaluation) is
prepared by the package's stored :class:`~incremental.preprocessing.Preprocessing`, so an update uses
exactly the size and normalisation the model was trained with.

Old knowledge is kept by rehearsal of exemplars (the history library): the package's own, or, for a
package that has none (a model packaged from a user's weights), samples of the old classes from
``--old-data``, of which a stratified ``holdout`` part is kept apart to measure the old classes. The
head grows for the new classes with the old rows copied over (checked: the old classes' outputs are
unchanged right after the growth, to float rounding: ``models.outputs_kept``). The report gives old-class and new-class accuracy before and
after on held-out data: a stratified hold-out of the new data, plus the held-out ``--old-data``.

Strategies: ``replay`` (default when there are exemplars), ``gradient_mixing`` (METHODS 2 step B on the
exemplars), ``lwf`` (distillation from the deployed model; the default when there are no exemplars),
``naive`` (plain fine-tuning).
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
from .datasets import DataError, LabelledData
from .models import outputs_kept
from .package import ModelPackage, PackageError, save_model
from .preprocessing import LEGACY_INPUT, Preprocessing, load_labelled
from .trainer import Trainer, grow_model, seed_everything

#: Kept for callers that build packages by hand (``classifier_package_extra``).
DEFAULT_INPUT = LEGACY_INPUT
STRATEGIES = ("replay", "gradient_mixing", "lwf", "naive")
REHEARSING = ("replay", "gradient_mixing")


@dataclass
class UpdateOptions:
    strategy: str | None = None  # None: replay when there are exemplars, else lwf (with a note in the report)
    epochs: int = 5
    lr: float = 0.05
    batch_size: int = 32
    mem_size: int = 200
    holdout: float = 0.2
    seed: int = 0
    old_data: str | None = None
    progress: bool = False
    device: str = "cpu"

    @classmethod
    def from_any(cls, options: Any) -> "UpdateOptions":
        """From an ``UpdateOptions``, a mapping or None; missing / None values take the defaults."""
        if isinstance(options, cls):
            return options
        given = dict(options or {})
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in given.items() if k in names and v is not None})


def package_preprocessing(package: ModelPackage) -> Preprocessing:
    """The package's stored preprocessing, or a PackageError naming ``extra['input']`` (the package is
    input: a damaged or hand-edited file must not become a confusing failure later)."""
    given = package.extra.get("input")
    if given is not None and not isinstance(given, dict):
        raise PackageError(f"{package.path}: extra['input'] must be a dict, got {type(given).__name__}")
    try:
        return Preprocessing.of_package(package)
    except (TypeError, ValueError) as exc:
        raise PackageError(f"{package.path}: extra['input'] is unusable ({str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__})") from None


def saved_history(package: ModelPackage, capacity: int, seed: int, prep: Preprocessing) -> HistoryLibrary:
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
        shape = list(prep.input_shape)
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


def load_old_data(path: str, package: ModelPackage, prep: Preprocessing) -> tuple[torch.Tensor, torch.Tensor]:
    """``--old-data`` as model inputs and labels in the model's index space (old classes only)."""
    old = load_labelled(path, prep)
    unknown = sorted({old.class_names[i] for i in set(old.y.tolist())} - set(package.class_names))
    if unknown:
        raise DataError(f"{old.source}: --old-data must hold the model's classes only; unknown: {unknown}")
    lookup = torch.tensor([package.class_names.index(n) if n in package.class_names else -1 for n in old.class_names])
    return old.x, lookup[old.y]


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
def logits_on(model: nn.Module, x: torch.Tensor, device: torch.device | str = "cpu", batch: int = 256) -> torch.Tensor:
    """The model's outputs on ``x`` in eval mode (in batches, on ``device``), on the CPU."""
    model.eval()
    outs = [model(x[i:i + batch].to(device)).float().cpu() for i in range(0, len(x), batch)]
    return torch.cat(outs) if outs else torch.zeros((0, 0))


def accuracy_on(model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device | str = "cpu") -> float | None:
    if len(y) == 0:
        return None
    return float((logits_on(model, x, device).argmax(1) == y).float().mean())


def _exemplars(package: ModelPackage, options: UpdateOptions, old_x: torch.Tensor, old_y: torch.Tensor,
               prep: Preprocessing) -> tuple[str, HistoryLibrary | None, str | None, str | None, torch.Tensor]:
    """(strategy, library, where its samples came from, note, mask of the ``--old-data`` samples kept
    for evaluation): the package's exemplars, else ``--old-data`` split into exemplars and a hold-out."""
    strategy = options.strategy
    if strategy is not None and strategy not in STRATEGIES:
        raise DataError(f"unknown update strategy {strategy!r}; known: {', '.join(STRATEGIES)}")
    keep_for_eval = torch.ones(len(old_y), dtype=torch.bool)
    if strategy is not None and strategy not in REHEARSING:
        return strategy, None, None, None, keep_for_eval
    saved = package.extra.get("history")
    if saved is not None and not isinstance(saved, dict):
        raise PackageError(f"{package.path}: extra['history'] must be a dict, got {type(saved).__name__}")
    if saved and saved.get("samples") is not None:
        history = saved_history(package, options.mem_size, options.seed, prep)
        return strategy or "replay", history, "package", None, keep_for_eval
    if len(old_y):
        train_idx, _ = stratified_holdout(old_y, options.holdout, options.seed)
        keep_for_eval[train_idx] = False
        history = HistoryLibrary(options.mem_size, "class_balanced", seed=options.seed)
        history.update(TensorSamples(old_x[train_idx], old_y[train_idx]))
        return strategy or "replay", history, "--old-data", None, keep_for_eval
    if strategy is None:
        note = ("the package carries no exemplars and no --old-data was given: used lwf (distillation from the "
                "deployed model) instead of replay; pass --old-data with samples of the old classes to rehearse them")
        return "lwf", None, None, note, keep_for_eval
    raise DataError(f"{package.path}: --strategy {strategy} rehearses exemplars, and the package carries none: pass "
                    "--old-data with samples of the old classes (they become the exemplars), or use --strategy lwf "
                    "(distillation, no old data needed) or naive")


def update(package: ModelPackage, data_path: str | Path, out_dir: Path, options: Any = None) -> dict[str, Any]:
    """Learn the new classes in ``data_path``; writes ``out_dir/model.pt`` and returns the report."""
    options = UpdateOptions.from_any(options)
    device = torch.device(options.device)
    prep = package_preprocessing(package)
    data = load_labelled(data_path, prep)
    y, new_names, all_names = map_classes(package.class_names, data)
    x = data.x
    n_old = len(package.class_names)
    old_x, old_y = x[:0], y[:0]
    if options.old_data:
        old_x, old_y = load_old_data(options.old_data, package, prep)
    strategy, history, exemplar_source, note, old_eval = _exemplars(package, options, old_x, old_y, prep)

    seed_everything(options.seed)
    train_idx, held_idx = stratified_holdout(y, options.holdout, options.seed)
    held_x, held_y = x[held_idx], y[held_idx]
    is_new_held = held_y >= n_old
    eval_old_x = torch.cat([old_x[old_eval], held_x[~is_new_held]])
    eval_old_y = torch.cat([old_y[old_eval], held_y[~is_new_held]])
    eval_new_x, eval_new_y = held_x[is_new_held], held_y[is_new_held]

    model = package.build().to(device)
    before = {"old_accuracy": accuracy_on(model, eval_old_x, eval_old_y, device),
              "new_accuracy": accuracy_on(model, eval_new_x, eval_new_y, device)}
    teacher = copy.deepcopy(model) if strategy == "lwf" else None
    probe = x[train_idx[:64]]
    reference = logits_on(model, probe, device)
    grow_model(model, len(all_names))
    old_outputs_unchanged = outputs_kept(logits_on(model, probe, device)[:, :n_old], reference)

    plugins: list[Any] = []
    if strategy == "lwf":
        from avalanche.training.plugins import LwFPlugin

        lwf = LwFPlugin(alpha=1.0, temperature=2.0)
        # The deployed model is the teacher for the classes it knows.
        lwf.lwf.prev_model = teacher
        lwf.lwf.prev_classes_by_task[0] = set(range(n_old))
        lwf.lwf.expcount = 1
        plugins.append(lwf)
    elif strategy == "gradient_mixing":
        from strategies.gradient_mixing import GradientMixingPlugin

        plugins.append(GradientMixingPlugin())

    rehearsed = 0 if history is None else len(history)
    model.train()
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=options.lr), nn.CrossEntropyLoss(),
                      train_mb_size=options.batch_size, train_epochs=options.epochs, plugins=plugins,
                      history=history, seed=options.seed, progress=options.progress, device=device)
    trainer.classes_seen = set(range(n_old))
    train_y = y[train_idx]
    experience = Experience(TensorSamples(x[train_idx], train_y), 0, sorted(set(train_y.tolist())),
                            previous_classes=list(range(n_old)))
    trainer.train(experience)
    after = {"old_accuracy": accuracy_on(trainer.model, eval_old_x, eval_old_y, device),
             "new_accuracy": accuracy_on(trainer.model, eval_new_x, eval_new_y, device)}

    kwargs = {**package.arch_kwargs, "n_classes": len(all_names)}
    extra = {**package.extra, "input": prep.to_extra()}
    if history is not None:
        extra["history"] = history.state_dict()
    elif "history" in package.extra:
        extra.pop("history")
    model_path = save_model(out_dir / "model.pt", trainer.model.cpu(), kind="classifier",
                            architecture=package.architecture, arch_kwargs=kwargs, class_names=all_names, extra=extra)
    return {
        "kind": "classifier",
        "model": str(package.path),
        "data": str(data.source),
        "updated_model": str(model_path),
        "strategy": strategy,
        "strategy_note": note,
        "old_classes": list(package.class_names),
        "new_classes": new_names,
        "preprocessing": prep.describe(),
        "exemplars": {"source": exemplar_source, "rehearsed": rehearsed,
                      "kept_in_package": 0 if history is None else len(history)},
        "head": {"old_outputs": n_old, "outputs": len(all_names), "old_outputs_unchanged_at_growth": old_outputs_unchanged},
        "n_train": int(len(train_idx)),
        "n_eval_old": int(len(eval_old_y)),
        "n_eval_new": int(len(eval_new_y)),
        "before": before,
        "after": after,
    }


def classifier_package_extra(history: HistoryLibrary | None, spec: dict[str, Any] | None = None) -> dict[str, Any]:
    """The extras a classifier package carries: input format and the exemplars for later updates."""
    extra: dict[str, Any] = {"input": Preprocessing.from_any({**DEFAULT_INPUT, **(spec or {})}).to_extra()}
    if history is not None and len(history):
        extra["history"] = history.export_state()
    return extra


def format_report(report: dict[str, Any]) -> str:
    def pct(v: float | None) -> str:
        return "   n/a" if v is None else f"{100 * v:6.1f}"

    lines = [] if not report.get("strategy_note") else [f"note: {report['strategy_note']}"]
    exemplars = report.get("exemplars") or {}
    rehearsed = f", rehearsing {exemplars['rehearsed']} exemplars from {exemplars['source']}" if exemplars.get("source") else ""
    lines += [
        f"updated {report['model']} with {len(report['new_classes'])} new classes "
        f"({', '.join(report['new_classes'])}) using {report['strategy']}{rehearsed}",
        f"{'':>14} | {'before':>7} {'after':>7}",
        f"{'old classes':>14} | {pct(report['before']['old_accuracy']):>7} {pct(report['after']['old_accuracy']):>7}",
        f"{'new classes':>14} | {pct(report['before']['new_accuracy']):>7} {pct(report['after']['new_accuracy']):>7}",
    ]
    if report["n_eval_old"] == 0:
        lines.append("(no old-class samples to measure: pass --old-data with held-out data of the old classes)")
    return "\n".join(lines)
