"""``incremental package``: a model package from a model trained elsewhere (weights file + classes file).

    incremental package --architecture torchvision:resnet18 --weights W.pth --classes CLASSES.txt \\
        --out model.pt [--input-size 224] [--mean 0.485 0.456 0.406 --std 0.229 0.224 0.225]

The weights file is what ``torch.save(model.state_dict())`` wrote, or a checkpoint dict holding it (see
:func:`incremental.importing.read_state_dict`). Checks, each a one-line error with exit code 2 and
nothing written: weights that do not fit the architecture name the first offending key; a classes file
whose count does not match the model's head names both numbers.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from torch import nn

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "package", help="make a model package from your own trained model (weights file + class names)",
        description="Package a model trained elsewhere so that `incremental update` and `incremental predict`\n"
                    "can use it. The preprocessing given here is stored in the package and applied by every\n"
                    "later command. Errors are one line (exit code 2) and nothing is written.",
        epilog="examples:\n"
               "  incremental package --architecture torchvision:resnet18 --weights resnet.pth --classes classes.txt \\\n"
               "      --out model.pt --input-size 224 --mean 0.485 0.456 0.406 --std 0.229 0.224 0.225\n"
               "  incremental package --architecture torchvision:fasterrcnn_mobilenet_v3_large_320_fpn \\\n"
               "      --weights det.pth --classes objects.txt --out detector.pt\n"
               "  incremental package --architecture my_models:FashionNet --kwargs '{\"num_classes\": 8}' \\\n"
               "      --weights net.pt --classes classes.txt --out model.pt --input-size 28",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--architecture", required=True, metavar="ARCH",
                   help="torchvision:<classification model> (torchvision:resnet18, ...), torchvision:fasterrcnn_resnet50_fpn "
                        "/ fasterrcnn_mobilenet_v3_large_fpn / fasterrcnn_mobilenet_v3_large_320_fpn, or module:Class "
                        "for your own nn.Module class (importable, or in the current directory)")
    p.add_argument("--weights", required=True, metavar="FILE",
                   help="state dict (torch.save(model.state_dict())) or a checkpoint dict with a state_dict / model "
                        "entry; a 'module.' prefix (DataParallel) is removed")
    p.add_argument("--classes", required=True, metavar="FILE",
                   help="class names in output order, one per line (detectors: without the background); or JSON: "
                        "a list of names, or COCO categories (their ids are kept)")
    p.add_argument("--out", required=True, help="package file to write")
    p.add_argument("--kwargs", metavar="JSON", default=None,
                   help="constructor arguments as a JSON object: of module:Class; of the torchvision builder; for "
                        "detectors FasterRCNN settings (min_size, max_size, box_score_thresh, ...), norm "
                        "('frozen' or 'batch', default: read from the weights) and trainable_backbone_layers (default 3)")
    p.add_argument("--input-size", type=int, nargs="+", metavar="N",
                   help="classifiers: input size, one side or H W (default 224 for torchvision; required for "
                        "module:Class); detectors: min_size (the shorter side images are resized to)")
    p.add_argument("--resize", type=int, metavar="N",
                   help="classifiers: resize the shorter side to N, then centre-crop --input-size (e.g. 256 for 224)")
    p.add_argument("--channels", type=int, choices=(1, 3),
                   help="classifiers: image channels the model takes (default: from its first convolution)")
    p.add_argument("--flat", action="store_true",
                   help="classifiers: the model takes flattened images, (N, C*H*W) (default for models without convolutions)")
    p.add_argument("--pixel-max", type=float, default=1.0, metavar="V",
                   help="classifiers: pixels are scaled to [0, V] before normalisation (default 1)")
    p.add_argument("--mean", type=float, nargs="+", help="normalisation mean, one per channel (or one for all)")
    p.add_argument("--std", type=float, nargs="+", help="normalisation std, one per channel (or one for all)")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(handler=cmd_package)


def cmd_package(args: argparse.Namespace) -> int:
    from ..cli import UsageError, one_line
    from ..importing import is_torchvision_detector, read_class_names, read_state_dict
    from . import output_path

    out = output_path(args.out, args.force)
    try:
        kwargs = parse_kwargs(args.kwargs)
        names, ids = read_class_names(args.classes)
        state = read_state_dict(args.weights)
        if is_torchvision_detector(args.architecture):
            model, summary = package_detector(args, kwargs, names, ids, state, out)
        else:
            model, summary = package_classifier(args, kwargs, names, state, out)
    except ValueError as exc:  # PackageError, DataError, bad preprocessing values: all one line
        raise UsageError(one_line(exc)) from None
    if not args.quiet:
        print(summary)
        print(f"wrote {out}")
    del model
    return 0


def parse_kwargs(text: str | None) -> dict[str, Any]:
    if text is None:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"--kwargs: not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise ValueError(f"--kwargs: must be a JSON object of keyword arguments, got {text}")
    return value


def _head_check(head_key: str, n_names: int, extra_rows: int, classes: str, describe: Any) -> Any:
    """A check for :func:`fit_state_dict`: the weights' head has one row per class of the classes file
    (plus ``extra_rows``: the detector's background)."""
    from ..package import PackageError

    def check(state: dict[str, Any]) -> None:
        rows = int(state[head_key].shape[0])
        if rows != n_names + extra_rows:
            raise PackageError(f"{classes} lists {n_names} classes, {describe(rows)}")

    return check


def package_classifier(args: argparse.Namespace, kwargs: dict[str, Any], names: list[str], state: dict[str, Any],
                       out: Path) -> tuple[nn.Module, str]:
    from ..importing import (TORCHVISION_PREFIX, fit_state_dict, infer_input, instantiate, package_model,
                             resolve_module_class)
    from ..models import last_linear
    from ..package import PackageError
    from ..preprocessing import Preprocessing

    arch = args.architecture
    if arch.startswith(TORCHVISION_PREFIX):
        import torchvision

        name = arch.removeprefix(TORCHVISION_PREFIX)
        known = torchvision.models.list_models(torchvision.models)
        if name not in known:
            raise PackageError(f"--architecture: {name!r} is not a torchvision classification model nor a supported "
                               f"detector; classification models: {', '.join(known)}")
        try:
            model = torchvision.models.get_model(name, weights=None, **{"num_classes": len(names), **kwargs})
        except (TypeError, ValueError) as exc:
            raise PackageError(f"--kwargs: torchvision {name} does not take {kwargs} ({exc})") from None
        size = args.input_size or [224]
    elif ":" in arch:
        model = instantiate(resolve_module_class(arch), kwargs, arch)
        if not args.input_size:
            raise PackageError(f"--input-size is needed for {arch} (the image size the model was trained on)")
        size = args.input_size
    else:
        raise PackageError(f"--architecture: expected torchvision:<name> or module:Class, got {arch!r}")
    if len(size) > 2:
        raise PackageError(f"--input-size: one size or H W, got {size}")
    head_name, _ = last_linear(model)
    check = _head_check(f"{head_name}.weight", len(names), 0, args.classes,
                        lambda rows: f"the weights' head {head_name!r} has {rows} outputs")
    model.load_state_dict(fit_state_dict(state, model.state_dict(), args.weights, arch, check))
    given: dict[str, Any] = {"size": size, "max_value": args.pixel_max, "resize": args.resize,
                             "mean": _per_channel(args.mean), "std": _per_channel(args.std)}
    if args.channels is not None:
        given["channels"] = args.channels
    if args.flat:
        given["flat"] = True
    defaults = {"channels": 3, "flat": False} if arch.startswith(TORCHVISION_PREFIX) else infer_input(model, given)
    prep = Preprocessing.from_any({k: v for k, v in given.items() if v is not None}, **defaults)
    package_model(model, names, out, architecture=arch, kwargs=kwargs, preprocessing=prep,
                  provenance={"weights": str(args.weights), "classes": str(args.classes)})
    summary = f"packaged {arch}: classifier of {len(names)} classes ({_short(names)}); head {head_name!r}; " \
              f"input {prep.describe()}"
    if prep.mean is None and arch.startswith(TORCHVISION_PREFIX):
        summary += ("\nnote: no --mean/--std: the model gets pixels in [0, 1] without normalisation (torchvision's "
                    f"ImageNet recipe is --mean {' '.join(map(str, IMAGENET_MEAN))} --std {' '.join(map(str, IMAGENET_STD))})")
    return model, summary


def package_detector(args: argparse.Namespace, kwargs: dict[str, Any], names: list[str], ids: list[int] | None,
                     state: dict[str, Any], out: Path) -> tuple[nn.Module, str]:
    from ..detection.model import build_torchvision_detector
    from ..importing import TORCHVISION_PREFIX, fit_state_dict, package_model
    from ..package import PackageError

    arch = args.architecture
    for flag, value in (("--resize", args.resize), ("--channels", args.channels), ("--flat", args.flat or None),
                        ("--pixel-max", None if args.pixel_max == 1.0 else args.pixel_max)):
        if value is not None:
            raise PackageError(f"{flag} is for classifiers; a detector resizes and normalises inside the model "
                               "(--input-size, --mean, --std, --kwargs)")
    options = dict(kwargs)
    if args.input_size:
        if len(args.input_size) != 1:
            raise PackageError(f"--input-size: a detector takes one size (min_size, the shorter side), got {args.input_size}")
        options["min_size"] = args.input_size[0]
    if args.mean is not None:
        options["image_mean"] = _per_channel(args.mean, 3)
    if args.std is not None:
        options["image_std"] = _per_channel(args.std, 3)
    if "num_classes" in options:
        raise PackageError("--kwargs: num_classes comes from the classes file, leave it out")
    options.setdefault("norm", "batch" if any(k.endswith("num_batches_tracked") and "backbone" in k for k in state)
                       else "frozen")
    try:
        model = build_torchvision_detector(arch.removeprefix(TORCHVISION_PREFIX), len(names), **options)
    except (TypeError, ValueError) as exc:
        raise PackageError(f"--kwargs: {str(exc).splitlines()[0]}") from None
    check = _head_check("roi_heads.box_predictor.cls_score.weight", len(names), 1, args.classes,
                        lambda rows: f"the weights' box predictor has {rows} outputs ({rows - 1} classes + background; "
                                     "list the classes without the background)")
    model.load_state_dict(fit_state_dict(state, model.state_dict(), args.weights, arch, check))
    package_model(model, names, out, architecture=arch, category_ids=ids,
                  kwargs={k: options[k] for k in ("norm", "trainable_backbone_layers") if k in options},
                  provenance={"weights": str(args.weights), "classes": str(args.classes)})
    t = model.transform
    summary = (f"packaged {arch}: detector of {len(names)} classes ({_short(names)}); images resized to shorter "
               f"side {t.min_size[-1]} (longer at most {t.max_size}), normalised with mean {t.image_mean} std "
               f"{t.image_std}; backbone norm {options['norm']}")
    return model, summary


def _per_channel(values: list[float] | None, n: int | None = None) -> list[float] | None:
    """Detectors (``n`` = 3): one value is used for every channel; classifiers are checked by Preprocessing."""
    if values is None or n is None:
        return values
    if len(values) not in (1, n):
        raise ValueError(f"--mean / --std: a detector takes {n} values (RGB) or one for all, got {values}")
    return values * n if len(values) == 1 else values


def _short(names: list[str], k: int = 6) -> str:
    return ", ".join(names[:k]) + (f", ... ({len(names) - k} more)" if len(names) > k else "")
