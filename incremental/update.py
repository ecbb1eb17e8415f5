"""``incremental update``: learn new classes into a deployed model package, keep the old ones.

Dispatches on the package kind to the updater of that model family; every updater returns a report
(old-class and new-class quality before and after) that is printed and written as JSON and a PNG bar
chart. All inputs are checked before anything is written: a bad model file, a data set with no new
class or a class-name clash leaves the output directory untouched.

An output directory that already holds a package or a report is refused unless ``--force``; even
then the update runs in a staging directory beside it and its files replace the old ones (each by an
atomic rename, the package last) only once the update succeeded. So ``--out`` may be the directory of
``--model`` itself: the deployed package is replaced by a working one or not at all.
"""
from __future__ import annotations

import argparse
import importlib
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Mapping

from .io import write_json
from .package import PackageError, load_model

UPDATERS: dict[str, str] = {
    "classifier": "incremental.update_classifier",
    "panoptic": "incremental.panoptic.update",
    "detector": "incremental.detection.update",
}


def add_parser(sub: Any) -> None:
    p = sub.add_parser("update", help="update a model package with the new classes in a data set")
    p.add_argument("--model", help="model package (.pt written by incremental package / run / update / save_model)")
    p.add_argument("--data", help="new data: ImageFolder directory or .npz (x, y, class_names) for classifiers; "
                                  "COCO files for detection / panoptic packages")
    p.add_argument("--out", help="output directory for the updated package and the report")
    # Unset flags stay None: each model family's updater has its own defaults (a detector wants a
    # smaller learning rate and batch than a digits classifier).
    p.add_argument("--strategy", help="classifiers: replay (default when there are exemplars: the package's or "
                                      "--old-data), gradient_mixing, lwf (default without exemplars), naive; "
                                      "detectors / panoptic: pseudo_distill (default), pseudo_labels, distillation, naive; "
                                      "the config names finetune (= naive) and pseudo_label_distillation "
                                      "(= pseudo_distill) are accepted")
    p.add_argument("--epochs", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--mem-size", type=int, help="exemplars kept in the updated package")
    p.add_argument("--holdout", type=float, help="fraction of the new data held out for the report (default 0.2)")
    p.add_argument("--old-data", help="data of the old classes: measures what is kept; for a package without "
                                      "exemplars, 1 - holdout of it becomes the exemplars rehearsed")
    p.add_argument("--seed", type=int)
    p.add_argument("--demo", action="store_true",
                   help="train a digits model on 0-4, then update it with 5-9 (embedded data; --out optional)")
    p.add_argument("--force", action="store_true",
                   help="replace the package and report in --out (also --model itself) once the update succeeded")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(handler=cmd_update, output_arg="out")


def option_value(options: Any, name: str, defaults: dict[str, Any]) -> Any:
    """An updater's option: the user's value from a mapping or an attribute, else ``defaults[name]``."""
    value = options.get(name) if isinstance(options, Mapping) else getattr(options, name, None)
    return defaults[name] if value is None else value


# The names `incremental run` configs use for the same ideas (issue 15: one name per idea in every
# family): fine-tuning is `naive` everywhere, and the plugin that does pseudo labels + distillation is
# the detector / panoptic updaters' `pseudo_distill`.
STRATEGY_ALIASES = {"finetune": "naive", "pseudo_label_distillation": "pseudo_distill"}


def canonical_strategy(name: str | None) -> str | None:
    """``--strategy`` as the updaters know it (config and plugin names accepted too)."""
    return STRATEGY_ALIASES.get(name, name) if name is not None else None


def _options(args: argparse.Namespace) -> dict[str, Any]:
    """The user's choices; None where a flag was not given (the updater's default applies)."""
    return {"strategy": canonical_strategy(args.strategy), "epochs": args.epochs, "lr": args.lr, "batch_size": args.batch_size,
            "mem_size": args.mem_size, "holdout": args.holdout, "seed": args.seed, "old_data": args.old_data,
            "progress": not args.quiet and sys.stderr.isatty()}


#: What an update writes into ``--out``, in the order the files replace earlier ones (the package last).
OUTPUT_FILES = ("report.json", "report.png", "model.pt")


def run_update(model_path: str, data_path: str, out_dir: Path, options: Any, force: bool = False) -> dict[str, Any]:
    """Check inputs, update in a staging directory, then move results into ``out_dir``."""
    from .cli import UsageError
    from .datasets import DataError

    existing = [name for name in ("model.pt", "report.json") if (out_dir / name).exists()]
    if existing and not force:
        raise UsageError(f"{out_dir} already holds {' and '.join(existing)}; use --force to replace "
                         "(after the update succeeded) or choose another --out")
    package = load_model(model_path)
    target = UPDATERS.get(package.kind)
    if target is None:
        raise UsageError(f"{model_path}: no updater for package kind {package.kind!r}")
    updater = importlib.import_module(target)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        try:
            report = updater.update(package, data_path, staging, options)
        except (DataError, PackageError) as exc:
            raise UsageError(str(exc)) from None
        report["updated_model"] = str(out_dir / "model.pt")
        write_json(staging / "report.json", report)
        _plot_report(report, staging / "report.png")
        out_dir.mkdir(parents=True, exist_ok=True)
        order = {name: k for k, name in enumerate(OUTPUT_FILES)}
        for item in sorted(staging.iterdir(), key=lambda p: order.get(p.name, -1)):
            item.replace(out_dir / item.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return report


def _plot_report(report: dict[str, Any], path: Path) -> None:
    from .plots import bar_chart

    def metric_names() -> list[str]:
        return [k for k in report["before"] if k.startswith(("old_", "new_"))]

    groups = {}
    for key in metric_names():
        groups[key.replace("_", " ")] = {"before": _num(report["before"][key]), "after": _num(report["after"][key])}
    bar_chart(groups, path, ylabel="score", title=f"update with {report['strategy']}: before / after")


def _num(v: Any) -> float:
    return float("nan") if v is None else float(v)


def cmd_update(args: argparse.Namespace) -> int:
    from .cli import UsageError

    if args.demo:
        return run_demo(args)
    missing = [flag for flag, value in (("--model", args.model), ("--data", args.data), ("--out", args.out)) if not value]
    if missing:
        raise UsageError(f"incremental update needs {', '.join(missing)} (or --demo)")
    try:
        report = run_update(args.model, args.data, Path(args.out), _options(args), force=args.force)
    except PackageError as exc:
        raise UsageError(str(exc)) from None
    if not args.quiet:
        print(_format(report))
        print(f"wrote {args.out}/model.pt, report.json, report.png")
    return 0


def _format(report: dict[str, Any]) -> str:
    module = importlib.import_module(UPDATERS.get(report.get("kind", "classifier"), UPDATERS["classifier"]))
    formatter = getattr(module, "format_report", None)
    return formatter(report) if formatter else str(report)


def run_demo(args: argparse.Namespace) -> int:
    """Digits 0-4 model -> package -> update with 5-9 from an ImageFolder -> before/after table."""
    import numpy as np
    import torch

    from .datasets import save_image_folder
    from .scenarios.digits import load_digits_arrays, stratified_split
    from .update_classifier import classifier_package_extra

    out = Path(args.out or "runs/update-demo")
    x, y = load_digits_arrays()
    seed = args.seed if args.seed is not None else 0
    train_idx, test_idx = stratified_split(y, 0.3, seed)
    old = y < 5
    base_path = _train_demo_base(x[train_idx], y[train_idx], out, seed, classifier_package_extra)
    # The new classes arrive as a folder of PNG images, one sub-folder per class name.
    new_idx = train_idx[~old[train_idx]]
    folder = out / "new_digits"
    if folder.exists():
        shutil.rmtree(folder)
    save_image_folder(folder, (x[new_idx] * 16.0).reshape(-1, 8, 8), y[new_idx], [str(c) for c in range(10)])
    old_test = test_idx[old[test_idx]]
    np.savez(out / "old_test.npz", x=x[old_test], y=y[old_test], class_names=np.array([str(c) for c in range(5)]))
    args.old_data = str(out / "old_test.npz")
    args.seed = args.seed if args.seed is not None else 0
    report = run_update(str(base_path), str(folder), out / "updated", _options(args), force=True)
    if not args.quiet:
        print(f"base model (digits 0-4): {base_path}")
        print(_format(report))
        print(f"wrote {out}/updated/model.pt, report.json, report.png")
    del torch
    return 0


def _train_demo_base(x: Any, y: Any, out: Path, seed: int, extra_fn: Any) -> Path:
    import torch
    from torch import nn

    from .buffer import HistoryLibrary
    from .data import Experience, TensorSamples
    from .models import MLP
    from .package import save_model
    from .trainer import Trainer, seed_everything

    seed_everything(seed)
    keep = y < 5
    samples = TensorSamples(torch.from_numpy(x[keep]), torch.from_numpy(y[keep]))
    model = MLP(64, 256, 5)
    history = HistoryLibrary(200, "class_balanced", seed=seed)
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.05), nn.CrossEntropyLoss(),
                      train_mb_size=32, train_epochs=5, history=history, seed=seed)
    trainer.train(Experience(samples, 0, [0, 1, 2, 3, 4]))
    return save_model(out / "base_model.pt", model, kind="classifier", architecture="mlp",
                      arch_kwargs={"input_size": 64, "hidden_size": 256, "n_classes": 5},
                      class_names=[str(c) for c in range(5)], extra=extra_fn(history))
