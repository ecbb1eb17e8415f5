"""``incremental update`` for panoptic model packages: learn the new classes of COCO panoptic data.

The data (a COCO panoptic JSON, or a directory holding ``panoptic.json``, ``panoptic/`` and
``images/``) brings categories the model does not know; they become new classes (the class head
grows between the old classes and "no object", old rows kept). The usual case is METHODS section 3:
the images are annotated for the new classes only, the old-class objects in them are unlabelled, and
plain fine-tuning would learn them as "no object". Methods (``options.strategy``):

- ``pseudo_distill`` (default; ``replay`` without exemplars and ``lwf`` map to it, with a note):
  the package's model, frozen, labels old-class objects (pseudo labels) and its class probabilities
  are distilled where it saw an object (:class:`strategies.PseudoLabelDistillationPlugin`);
- ``pseudo_labels`` / ``distillation``: one half (ablations); ``naive``: fine-tune as is.

The report gives PQ of the old and the new classes before and after on a held-out part of the new
data (old classes there are unlabelled, hence void: only ``--old-data``, a COCO panoptic file
annotated with old classes, measures forgetting honestly).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch

from ..data import Experience, ListSamples
from ..datasets import DataError
from ..trainer import seed_everything
from ..update import option_value
from .coco import PanopticData, PanopticFormatError, load_coco_panoptic, to_samples

PANOPTIC_STRATEGIES = ("pseudo_distill", "pseudo_labels", "distillation", "naive")
_DEFAULTS: dict[str, Any] = {"strategy": "pseudo_distill", "epochs": 10, "lr": 1e-4, "batch_size": 16, "holdout": 0.2,
                             "seed": 0, "old_data": None, "progress": False, "lambda_distill": 1.0, "gamma": 1.0,
                             "head_lr": 1e-3}


def _option(options: Any, name: str) -> Any:
    return option_value(options, name, _DEFAULTS)


def resolve_data(data_path: str | Path) -> Path:
    """The panoptic JSON of ``data_path`` (a file, or a directory with ``panoptic.json``)."""
    path = Path(data_path)
    if path.is_dir():
        candidates = [path / "panoptic.json", *sorted(path.glob("panoptic*.json"))]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise FileNotFoundError(f"{path} holds no COCO panoptic file (panoptic.json)")
        return found
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    return path


def _load(path: Path, size: tuple[int, int]) -> PanopticData:
    try:
        return load_coco_panoptic(path, size=size)
    except PanopticFormatError as exc:
        raise DataError(str(exc)) from None


def _class_mapping(data: PanopticData, names: list[str]) -> dict[int, int]:
    index = {n: i for i, n in enumerate(names)}
    return {int(c["id"]): index[c["name"]] for c in data.categories if c["name"] in index}


def _split(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    order = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed))).tolist()
    k = int(round(fraction * n))
    if fraction > 0 and n >= 2:
        k = min(max(k, 1), n - 1)
    return sorted(order[k:]), sorted(order[:k])


@torch.no_grad()
def _pq(model: torch.nn.Module, samples: ListSamples | None, names: list[str], things: list[int],
        old: list[int], new: list[int]) -> dict[str, Any] | None:
    from .pq import PanopticQualityAccumulator

    if samples is None or len(samples) == 0:
        return None
    n = int(model.n_classes)
    acc = PanopticQualityAccumulator(names[:n], [c for c in things if c < n],
                                     {"old": [c for c in old if c < n], "new": [c for c in new if c < n]})
    was = model.training
    model.eval()
    for start in range(0, len(samples), 32):
        images, targets, _ = samples.batch(torch.arange(start, min(start + 32, len(samples))))
        acc.update(model(images), targets)
    model.train(was)
    r = acc.result()
    labels = torch.cat([sample[1]["labels"] for sample in samples.samples]) if len(samples) else torch.zeros(0)
    return {"pq_old": r.get("pq_old"), "pq_new": r.get("pq_new"), "pq_all": r.get("pq_all"),
            "pq_per_class": r["pq_per_class"],
            # segments of each group in the ground truth: with none, that group's PQ counts only false
            # positives (e.g. old classes on new-class-only data, where old objects are unlabelled)
            "n_old_segments": int(sum(int((labels == c).sum()) for c in old)),
            "n_new_segments": int(sum(int((labels == c).sum()) for c in new))}


def update(package: Any, data_path: str | Path, out_dir: Path, options: Any = None) -> dict[str, Any]:
    """Learn the new classes of ``data_path`` into the panoptic model of ``package``; writes
    ``out_dir/model.pt`` and returns the report (the caller writes it)."""
    from ..package import save_model
    from .criterion import SetCriterion

    notes: list[str] = []
    strategy = str(_option(options, "strategy"))
    if strategy in ("replay", "lwf"):
        notes.append(f"strategy {strategy!r} maps to pseudo_distill for panoptic packages (no exemplars needed)")
        strategy = "pseudo_distill"
    if strategy not in PANOPTIC_STRATEGIES:
        raise DataError(f"unknown update strategy {strategy!r} for a panoptic model; known: "
                        f"{', '.join(PANOPTIC_STRATEGIES)} (replay, lwf = pseudo_distill)")
    lr = float(_option(options, "lr"))
    seed = int(_option(options, "seed"))
    extra = dict(getattr(package, "extra", {}) or {})
    size = tuple(int(v) for v in extra.get("input", {}).get("size", [64, 64]))
    old_names = list(package.class_names)
    if "thing_classes" not in extra:
        from ..package import PackageError

        raise PackageError(f"{getattr(package, 'path', 'package')}: a panoptic package needs extra['thing_classes'] "
                           "(the names of its countable classes); write it with incremental.panoptic.update.package_extra")
    old_things = [str(n) for n in extra["thing_classes"]]
    unknown = sorted(set(old_things) - set(old_names))
    if unknown:
        from ..package import PackageError

        raise PackageError(f"{getattr(package, 'path', 'package')}: thing_classes {unknown} are not class names")

    json_path = resolve_data(data_path)
    data = _load(json_path, size)  # type: ignore[arg-type]
    used = {int(s["category_id"]) for item in data.images for s in item.segments}
    by_id = data.category_by_id
    folded = {n.strip().casefold(): n for n in old_names}
    new_names: list[str] = []
    for cid in sorted(used):
        name = str(by_id[cid]["name"])
        if name in old_names:
            continue
        if name.strip().casefold() in folded:
            raise DataError(f"{json_path}: category {name!r} clashes with the model's class {folded[name.strip().casefold()]!r} "
                            "(same name up to case or spaces); rename one of them")
        new_names.append(name)
    if not new_names:
        raise DataError(f"{json_path}: no new class (every annotated category is already one of the model's: "
                        f"{sorted({str(by_id[c]['name']) for c in used})})")
    names = old_names + new_names
    things = [names.index(n) for n in old_things] + [
        len(old_names) + k for k, n in enumerate(new_names) if int(data.category_by_id[data.category_id(n)]["isthing"])]
    old_idx, new_idx = list(range(len(old_names))), list(range(len(old_names), len(names)))
    stuff = [c for c in range(len(names)) if c not in set(things)]

    samples = to_samples(data, _class_mapping(data, names))
    train_idx, held_idx = _split(len(samples), float(_option(options, "holdout")), seed)
    train = samples.subset(torch.tensor(train_idx, dtype=torch.long))
    held = samples.subset(torch.tensor(held_idx, dtype=torch.long)) if held_idx else None
    old_samples = None
    if _option(options, "old_data"):
        old_path = resolve_data(_option(options, "old_data"))
        old_data = _load(old_path, size)  # type: ignore[arg-type]
        unknown = sorted({str(old_data.category_by_id[int(s["category_id"])]["name"]) for it in old_data.images
                          for s in it.segments} - set(old_names))
        if unknown:
            raise DataError(f"{old_path}: --old-data must hold the model's classes only; unknown: {unknown}")
        old_samples = to_samples(old_data, _class_mapping(old_data, names))

    model = package.build()
    if getattr(model, "prompt_queries", 0):  # incremental.panoptic.prompts: nothing to distil into
        if strategy != "naive":
            notes.append(f"strategy {strategy!r} does not apply: this model learns new classes in a query group of "
                         "their own, with the deployed model frozen")
        strategy = "query_groups"
    before = {"on_holdout": _pq(model, held, names, things, old_idx, new_idx),
              "on_old_data": _pq(model, old_samples, names, things, old_idx, new_idx)}

    seed_everything(seed)
    plugins: list[Any] = []
    plugin = None
    if strategy not in ("naive", "query_groups"):
        from strategies.pseudo_label_distillation import PseudoLabelDistillationPlugin

        plugin = PseudoLabelDistillationPlugin(
            model, pseudo_labels=strategy != "distillation", distillation=strategy != "pseudo_labels",
            lambda_distill=float(_option(options, "lambda_distill")), gamma=float(_option(options, "gamma")),
            stuff_classes=[c for c in stuff if c < len(old_names)])
        plugins.append(plugin)
    from .training import PanopticTrainer, ScheduleAndClip, make_optimizer

    plugins.append(ScheduleAndClip("cosine", 1.0))
    model.train()
    model.grow_to(len(names))  # before the optimizer, so that it holds the new rows (or query group)
    if getattr(model, "prompt_queries", 0):  # query groups: the claim rule's yield counts thing queries only
        model.thing_classes = list(things)
    head_lr = _option(options, "head_lr")
    trainer = PanopticTrainer(model, make_optimizer(model, lr, 1e-4, None if head_lr is None else float(head_lr)),
                              SetCriterion(),
                              train_mb_size=int(_option(options, "batch_size")),
                              train_epochs=int(_option(options, "epochs")), plugins=plugins, seed=seed,
                              progress=bool(_option(options, "progress")))
    trainer.classes_seen = set(old_idx) | set(new_idx)
    trainer.train(Experience(train, 1, new_idx, previous_classes=old_idx))
    updated = trainer.model.eval()
    after = {"on_holdout": _pq(updated, held, names, things, old_idx, new_idx),
             "on_old_data": _pq(updated, old_samples, names, things, old_idx, new_idx)}

    kwargs = updated.arch_kwargs()
    extra_out = {**extra, "thing_classes": [names[c] for c in things], "input": {**extra.get("input", {}), "size": list(size)}}
    model_path = save_model(Path(out_dir) / "model.pt", updated, kind="panoptic", architecture=package.architecture,
                            arch_kwargs=kwargs, class_names=names, extra=extra_out)

    def headline(r: dict[str, Any]) -> dict[str, Any]:
        old_src = r["on_old_data"] if r["on_old_data"] is not None else r["on_holdout"]
        return {"old_pq": None if old_src is None else old_src["pq_old"],
                "new_pq": None if r["on_holdout"] is None else r["on_holdout"]["pq_new"], **r}

    return {
        "kind": "panoptic",
        "model": str(getattr(package, "path", "")),
        "data": str(json_path),
        "updated_model": str(model_path),
        "strategy": strategy,
        "notes": notes,
        "old_classes": old_names,
        "new_classes": new_names,
        "n_train": len(train),
        "n_holdout": 0 if held is None else len(held),
        "n_old_data": 0 if old_samples is None else len(old_samples),
        "epochs": trainer.train_epochs,
        "steps": trainer.clock.train_iterations,
        "lr": lr,
        "plugin": plugin.summary() if plugin is not None else {},
        "before": headline(before),
        "after": headline(after),
    }


def package_extra(class_names: list[str], thing_classes: list[int], image_size: int) -> dict[str, Any]:
    """The extras a panoptic package carries: which classes are things, and the input size."""
    return {"thing_classes": [class_names[c] for c in thing_classes], "input": {"size": [image_size, image_size]}}


def format_report(report: Mapping[str, Any]) -> str:
    """Before / after PQ table of an update report."""
    def f(v: Any) -> str:
        return "   n/a" if v is None else f"{v:6.3f}"

    lines = [f"note: {n}" for n in report.get("notes", [])]
    lines.append(f"updated {report['model']} with {len(report['new_classes'])} new classes "
                 f"({', '.join(report['new_classes'])}) using {report['strategy']} ({report['steps']} steps)")
    lines.append(f"{'':<34}{'PQ before':>10}{'PQ after':>10}")
    for where, label in (("on_holdout", "held-out new data"), ("on_old_data", "--old-data")):
        b, a = report["before"][where], report["after"][where]
        if b is None:
            continue
        for key, cls in (("pq_old", "old classes"), ("pq_new", "new classes")):
            if not (a or b).get(f"n_{key[3:]}_segments", 1):
                continue  # no ground truth of these classes there: their PQ would count false positives only
            if b.get(key) is not None or a.get(key) is not None:
                lines.append(f"{label + ', ' + cls:<34}{f(b.get(key)):>10}{f(a.get(key)):>10}")
    if report["before"]["on_old_data"] is None:
        lines.append("(old classes are unlabelled in new-class data: pass --old-data with old-class images to measure them)")
    return "\n".join(lines)
