"""``incremental update`` for detector packages: learn the new classes of a COCO data set.

The data (a COCO instances file, or a directory holding ``instances.json`` and ``images/``) brings
categories the model does not know; they become new classes (the box head grows, old rows kept).
Images whose annotations cover the new classes only are the usual case (METHODS section 3): the
old-class objects in them are unlabelled, and fine-tuning alone would learn them as background.

Methods (``options.strategy``):

- ``pseudo_distill`` (default for detectors; ``lwf`` is accepted as its alias): the package's
  detector, frozen, labels old-class objects in every training image (pseudo labels) and its box-head
  probabilities are distilled where it saw an object (:mod:`incremental.detection.distillation` with
  :class:`strategies.pseudo_label_distillation.PseudoLabelDistillationPlugin`);
- ``pseudo_labels`` / ``distillation``: one half of it (ablations);
- ``naive``: fine-tune on the new data as it is;
- ``replay``: ``naive`` plus rehearsal of the exemplars the package carries (``extra["history"]``),
  or, for a package without them (a detector packaged from a user's weights), of images of
  ``options.old_data``, of which a ``holdout`` part is kept apart for the report; with neither, the
  update uses ``pseudo_distill`` instead and the report says so (``strategy_note``), because
  ``replay`` is the command's default for every kind of model.

The report gives COCO AP (points) on a held-out part of the data (``options.holdout``) for the old
and the new classes before and after, plus AP on ``options.old_data`` (a COCO file of old-class
images) when given: the only honest measure of forgetting when the new data has no old labels.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch

from ..data import Experience, ListSamples
from ..models import outputs_kept
from ..trainer import seed_everything
from ..update import option_value
from .coco import CocoFormatError, DetectionData, check_instances, load_coco_detection, load_json

DETECTOR_STRATEGIES = ("pseudo_distill", "pseudo_labels", "distillation", "naive", "replay")
_DEFAULTS: dict[str, Any] = {"strategy": "pseudo_distill", "epochs": 10, "lr": 0.01, "batch_size": 8, "holdout": 0.2,
                             "seed": 0, "old_data": None, "progress": False, "mem_size": 200, "min_steps": 40,
                             "momentum": 0.9, "lambda_distill": 0.1, "pseudo_score": 0.5}


def _option(options: Any, name: str) -> Any:
    return option_value(options, name, _DEFAULTS)


def resolve_data(data_path: str | Path) -> tuple[Path, Path]:
    """``(instances JSON, images directory)`` from a file or a directory with ``instances.json``."""
    path = Path(data_path)
    if path.is_dir():
        candidates = [path / "instances.json", *sorted(path.glob("*.json"))]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise FileNotFoundError(f"{path} holds no COCO instances file (instances.json)")
        path = found
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    images = path.parent / "images" if (path.parent / "images").is_dir() else path.parent
    return path, images


def split_images(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """``(train, held out)`` indices: ``round(fraction * n)`` held out, at least one of each when
    ``n >= 2`` and ``fraction > 0``."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed))).tolist()
    k = int(round(fraction * n))
    if fraction > 0 and n >= 2:
        k = min(max(k, 1), n - 1)
    return sorted(order[k:]), sorted(order[:k])


def _subset(data: DetectionData, idx: list[int]) -> DetectionData:
    return DetectionData(data.samples.subset(torch.tensor(idx, dtype=torch.long)), data.class_names, data.category_ids,
                         [data.image_ids[i] for i in idx], data.skipped, data.source)


def _ap(model: torch.nn.Module, data: DetectionData | None, names: list[str], old: list[str]) -> dict[str, Any] | None:
    from .evaluation import coco_map
    from .model import predict

    if data is None or len(data) == 0:
        return None
    r = coco_map(data.targets, predict(model, data.images()), names, old)
    return {k: r.get(k) for k in ("AP", "AP50", "AP_old", "AP50_old", "AP_new", "AP50_new")} | {"per_class": r["per_class"]}


def _summary(holdout: dict[str, Any] | None, old_data: dict[str, Any] | None) -> dict[str, Any]:
    """Flat headline numbers (``old_AP`` from ``--old-data`` when given, else from the hold-out;
    ``new_AP`` from the hold-out) plus both full results."""
    old_src = old_data if old_data is not None else holdout
    return {
        "old_AP": None if old_src is None else old_src.get("AP_old"),
        "old_AP50": None if old_src is None else old_src.get("AP50_old"),
        "new_AP": None if holdout is None else holdout.get("AP_new"),
        "new_AP50": None if holdout is None else holdout.get("AP50_new"),
        "on_holdout": holdout,
        "on_old_data": old_data,
    }


@torch.no_grad()
def grow_box_predictor(predictor: torch.nn.Module, num_outputs: int) -> bool:
    """Grow the box predictor to ``num_outputs`` class outputs (background included) before training;
    returns True when the old outputs (class scores and box deltas) are unchanged after the growth (to
    float rounding, ``models.outputs_kept``), checked on a seeded probe of box features."""
    old = int(predictor.cls_score.out_features)
    probe = torch.randn(8, predictor.cls_score.in_features, generator=torch.Generator().manual_seed(0))
    probe = probe.to(predictor.cls_score.weight)
    scores, deltas = predictor(probe)
    predictor.grow_to(num_outputs)
    new_scores, new_deltas = predictor(probe)
    return outputs_kept(new_scores[:, :old], scores) and outputs_kept(new_deltas[:, : 4 * old], deltas)


def update(package: Any, data_path: str | Path, out_dir: Path, options: Any = None) -> dict[str, Any]:
    """Learn the new classes of ``data_path`` into the detector of ``package``; writes
    ``out_dir/model.pt`` and returns the report (the caller writes it)."""
    from .model import num_foreground_classes
    from .packaging import detector_from_package, save_detector
    from .trainer import DetectionTrainer

    strategy = str(_option(options, "strategy"))
    if strategy == "lwf":
        strategy = "pseudo_distill"
    if strategy not in DETECTOR_STRATEGIES:
        raise ValueError(f"unknown update strategy {strategy!r} for a detector; known: {', '.join(DETECTOR_STRATEGIES)} (lwf = pseudo_distill)")
    seed = int(_option(options, "seed"))
    note = None
    saved_history = getattr(package, "extra", {}).get("history")
    has_exemplars = bool(saved_history) and saved_history.get("samples") is not None
    if strategy == "replay" and not has_exemplars and not _option(options, "old_data"):
        # `incremental update` defaults to replay for every kind; a detector package usually carries
        # no exemplars, and the method that needs no old data is the right default then.
        note = "the package carries no exemplars to rehearse and no --old-data was given: used pseudo_distill instead of replay"
        strategy = "pseudo_distill"
    model, info = detector_from_package(package)
    old_names: list[str] = list(info["class_names"])
    old_ids: list[int] = list(info["category_ids"])

    instances, images_dir = resolve_data(data_path)
    coco = load_json(instances)
    check_instances(coco, str(instances))
    file_names = [str(c.get("name")) for c in coco.get("categories", []) if isinstance(c, dict)]
    new_names = [n for n in file_names if n not in old_names]
    if not new_names:
        raise CocoFormatError(f"{instances}: no new class (every category is already one of the model's: {file_names})")
    folded = {n.strip().casefold(): n for n in old_names}
    for n in new_names:
        if n.strip().casefold() in folded:
            raise CocoFormatError(f"{instances}: category {n!r} clashes with the model's class {folded[n.strip().casefold()]!r} "
                                  "(same name up to case or spaces); rename one of them")
    names = old_names + new_names
    data = load_coco_detection(instances, images_dir, names)
    id_of = {str(c["name"]): int(c["id"]) for c in coco["categories"]}
    used = set(old_ids)
    all_ids = list(old_ids)
    for n in new_names:  # keep the data's id when it is free, else the next free one
        cid = id_of[n] if id_of[n] not in used else max(used) + 1
        used.add(cid)
        all_ids.append(cid)

    train_idx, held_idx = split_images(len(data), float(_option(options, "holdout")), seed)
    train, held = _subset(data, train_idx), _subset(data, held_idx)
    old_data = None
    exemplar_data = None
    if _option(options, "old_data"):
        old_instances, old_images = resolve_data(_option(options, "old_data"))
        old_data = load_coco_detection(old_instances, old_images, names, unknown_categories="error")
        if strategy == "replay" and not has_exemplars:  # its images become the exemplars, a hold-out measures
            rehearse_idx, eval_idx = split_images(len(old_data), float(_option(options, "holdout")), seed)
            exemplar_data, old_data = _subset(old_data, rehearse_idx), _subset(old_data, eval_idx)
    model.eval()
    before = _summary(_ap(model, held, names, old_names), _ap(model, old_data, names, old_names))

    seed_everything(seed)
    plugins: list[Any] = []
    history = None
    if strategy in ("pseudo_distill", "pseudo_labels", "distillation"):
        from strategies.pseudo_label_distillation import PseudoLabelDistillationPlugin

        from .distillation import FasterRCNNAdapter, PseudoBoxConfig

        plugins.append(PseudoLabelDistillationPlugin(
            model, adapter=FasterRCNNAdapter(PseudoBoxConfig(score=float(_option(options, "pseudo_score")))),
            pseudo_labels=strategy != "distillation", distillation=strategy != "pseudo_labels",
            lambda_distill=float(_option(options, "lambda_distill"))))
    elif strategy == "replay":
        from ..buffer import HistoryLibrary
        from .coco import detection_collate

        if exemplar_data is not None:
            history = HistoryLibrary(int(_option(options, "mem_size")), "reservoir", seed=seed)
            history.update(exemplar_data.samples)
        else:
            history = HistoryLibrary(int(_option(options, "mem_size")), saved_history.get("policy", "reservoir"), seed=seed)
            history.load_state_dict(saved_history)
        if isinstance(history.samples, ListSamples):
            history.samples.collate_fn = detection_collate

    head_kept = grow_box_predictor(model.roi_heads.box_predictor, len(names) + 1)
    rehearsed = 0 if history is None else len(history)
    model.train()
    batch_size = int(_option(options, "batch_size"))
    per_epoch = max(1, -(-len(train) // batch_size))
    epochs = max(int(_option(options, "epochs")), -(-int(_option(options, "min_steps")) // per_epoch))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=float(_option(options, "lr")),
                                momentum=float(_option(options, "momentum")), weight_decay=1e-4)
    trainer = DetectionTrainer(model, optimizer, class_names=names, old_classes=old_names, train_mb_size=batch_size,
                               train_epochs=epochs, plugins=plugins, history=history, seed=seed,
                               progress=bool(_option(options, "progress")))
    trainer.classes_seen = set(range(1, len(old_names) + 1))
    trainer.train(Experience(train.samples, 0, list(range(1, len(names) + 1)), previous_classes=list(range(1, len(old_names) + 1))))
    for p in plugins:
        close = getattr(getattr(p, "adapter", None), "close", None)
        if callable(close):
            close()
    updated = trainer.model.eval()
    if num_foreground_classes(updated) != len(names):  # a new class with no training box still gets its row
        updated.roi_heads.box_predictor.grow_to(len(names) + 1)
    after = _summary(_ap(updated, held, names, old_names), _ap(updated, old_data, names, old_names))
    extra = {k: v for k, v in getattr(package, "extra", {}).items() if k not in ("category_ids", "image_size")}
    if history is not None:
        extra["history"] = history.state_dict()
    out_dir = Path(out_dir)
    model_path = save_detector(out_dir / "model.pt", updated, names, all_ids, extra=extra)
    plugin_summary = plugins[0].summary() if plugins and hasattr(plugins[0], "summary") else {}
    return {
        "kind": "detector",
        "model": str(getattr(package, "path", "")),
        "data": str(instances),
        "updated_model": str(model_path),
        "strategy": strategy,
        "strategy_note": note,
        "old_classes": old_names,
        "new_classes": new_names,
        "category_ids": dict(zip(names, all_ids)),
        "n_train": len(train),
        "n_holdout": len(held),
        "n_old_data": 0 if old_data is None else len(old_data),
        "exemplars": {"source": None if history is None else ("--old-data" if exemplar_data is not None else "package"),
                      "rehearsed": rehearsed, "kept_in_package": 0 if history is None else len(history)},
        "skipped": data.skipped,
        "head": {"old_outputs": len(old_names) + 1, "outputs": len(names) + 1, "old_outputs_unchanged_at_growth": head_kept},
        "epochs": epochs,
        "steps": trainer.clock.train_iterations,
        "plugin": plugin_summary,
        "before": before,
        "after": after,
    }


def format_report(report: Mapping[str, Any]) -> str:
    """Before / after AP table of an update report."""
    from .evaluation import fmt_ap

    lines = [] if not report.get("strategy_note") else [f"note: {report['strategy_note']}"]
    lines += [f"updated {report['model']} with {len(report['new_classes'])} new classes ({', '.join(report['new_classes'])}) "
             f"using {report['strategy']} ({report['steps']} steps)",
             f"{'':<34}{'AP before':>10}{'AP after':>10}"]
    for where, label in (("on_holdout", "held-out new data"), ("on_old_data", "--old-data")):
        b, a = report["before"][where], report["after"][where]
        if b is None:
            continue
        for key, cls in (("AP_old", "old classes"), ("AP_new", "new classes")):
            if b.get(key) is not None or a.get(key) is not None:
                lines.append(f"{label + ', ' + cls:<34}{fmt_ap(b.get(key)):>10}{fmt_ap(a.get(key)):>10}")
    if report["before"]["on_old_data"] is None:
        lines.append("(old classes measured on the held-out new data only: pass --old-data with old-class images)")
    return "\n".join(lines)
