"""``incremental predict``: what a packaged model says about a folder of images.

    incremental predict --model model.pt --images DIR --out predictions.json

- classifier packages: every image file below ``DIR`` (or every row of an ``.npz``'s ``x``), prepared
  with the package's stored preprocessing, and the top-k classes with their softmax scores;
- detector packages: the COCO results format (``image_id``, ``category_id`` in the model's category ids,
  ``bbox`` ``[x, y, w, h]``, ``score``), which is what ``incremental feedback --predictions`` reads.
  Image ids come from ``--instances`` (a COCO file naming the images, e.g. the one a person will verify);
  without it the images are numbered 1..N in path order and ``<out>.images.json`` is written beside the
  predictions: a COCO instances skeleton (those ids, the model's categories, no annotations) to verify.

Running the deployed package and the updated one on the same images shows what the update changed.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch


def add_parser(sub: Any) -> None:
    p = sub.add_parser("predict", help="run a model package on images: top-k classes, or COCO detection results",
                       description="Run a model package on images. Classifiers: the top-k classes of every image, "
                                   "prepared with the package's stored preprocessing. Detectors: COCO results "
                                   "(what `incremental feedback --predictions` reads).",
                       epilog="The output is written atomically; an existing --out is kept unless --force.")
    p.add_argument("--model", required=True, help="model package (incremental package / run / update)")
    p.add_argument("--images", required=True,
                   help="directory of images (searched recursively), or for classifiers an .npz with an x array")
    p.add_argument("--out", required=True, help="predictions JSON to write")
    p.add_argument("--top-k", type=int, default=5, help="classifiers: classes listed per image (default 5)")
    p.add_argument("--instances", help="detectors: COCO file whose images (ids, file_name under --images) to predict on")
    p.add_argument("--min-score", type=float, default=0.0,
                   help="detectors: leave out boxes scoring below this (default 0: every box the model returns)")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default 32)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1, ... or auto")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(handler=cmd_predict)


def cmd_predict(args: argparse.Namespace) -> int:
    from ..cli import UsageError, one_line
    from ..package import load_model
    from . import output_path

    out = output_path(args.out, args.force)
    if args.top_k < 1:
        raise UsageError(f"--top-k must be >= 1, got {args.top_k}")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    try:
        device = _device(args.device)
        package = load_model(args.model)
        if package.kind == "classifier":
            if args.instances:
                raise UsageError("--instances is for detector packages")
            message = predict_classifier(package, Path(args.images), out, args.top_k, args.batch_size, device)
        elif package.kind == "detector":
            message = predict_detector(package, Path(args.images), out, args.instances, args.min_score,
                                       args.batch_size, device)
        else:
            raise UsageError(f"{args.model}: incremental predict handles classifier and detector packages, "
                             f"not {package.kind!r}")
    except ValueError as exc:  # PackageError, DataError, CocoFormatError: one line each
        raise UsageError(one_line(exc)) from None
    if not args.quiet:
        print(message)
    return 0


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device: unknown device {name!r} (cpu, cuda, cuda:N or auto)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA device is available")
    return device


@torch.no_grad()
def classify(model: torch.nn.Module, x: torch.Tensor, batch_size: int = 256, device: torch.device | str = "cpu"
             ) -> torch.Tensor:
    """Softmax probabilities of ``model`` (eval mode) on prepared inputs ``x``, on the CPU."""
    model.eval().to(device)
    out = [torch.softmax(model(x[i:i + batch_size].to(device)).float(), dim=1).cpu() for i in range(0, len(x), batch_size)]
    return torch.cat(out) if out else torch.zeros((0, 0))


def predict_classifier(package: Any, images: Path, out: Path, top_k: int, batch_size: int,
                       device: torch.device) -> str:
    from ..datasets import DataError
    from ..io import write_json
    from ..preprocessing import image_files
    from ..update_classifier import package_preprocessing

    prep = package_preprocessing(package)  # a damaged extra['input'] is a PackageError, as in update
    if images.is_file():
        x = prep.load_array(_npz_x(images), str(images))
        if not len(x):
            raise DataError(f"{images}: x holds no images (shape {tuple(x.shape)})")
        keys: list[dict[str, Any]] = [{"index": i} for i in range(len(x))]
    elif images.is_dir():
        files = image_files(images)
        if not files:
            raise DataError(f"{images}: holds no image file")
        x = prep.load_files(files)
        keys = [{"file": str(f.relative_to(images))} for f in files]
    else:
        raise DataError(f"--images {images} does not exist")
    model = package.build()
    probs = classify(model, x, batch_size, device)
    names = package.class_names
    k = min(top_k, len(names))
    scores, idx = probs.topk(k, dim=1)
    predictions = []
    for key, s_row, i_row in zip(keys, scores.tolist(), idx.tolist()):
        top = [{"label": names[i], "score": round(float(s), 6)} for s, i in zip(s_row, i_row)]
        predictions.append({**key, "label": top[0]["label"], "score": top[0]["score"], "top_k": top})
    write_json(out, {"model": str(package.path), "kind": "classifier", "class_names": names,
                     "preprocessing": prep.to_extra(), "top_k": k, "predictions": predictions})
    counts: dict[str, int] = {}
    for p in predictions:
        counts[p["label"]] = counts.get(p["label"], 0) + 1
    common = ", ".join(f"{n} {c}" for n, c in sorted(counts.items(), key=lambda kv: -kv[1])[:5])
    return f"wrote {out}: {len(predictions)} predictions (top {k}); most predicted: {common}"


def _npz_x(path: Path) -> Any:
    import numpy as np

    from ..datasets import DataError

    try:
        with np.load(path, allow_pickle=False) as data:
            if "x" not in data.files:
                raise DataError(f"{path}: missing array 'x' (it has {', '.join(data.files) or 'nothing'})")
            return data["x"]
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise DataError(f"{path}: not a readable .npz file ({exc})") from None


def predict_detector(package: Any, images: Path, out: Path, instances: str | None, min_score: float,
                     batch_size: int, device: torch.device) -> str:
    from ..datasets import DataError
    from ..detection.coco import check_instances, load_json, read_image
    from ..detection.feedback import predictions_to_results
    from ..detection.model import predict
    from ..detection.packaging import detector_from_package
    from ..io import write_json
    from ..preprocessing import image_files

    if not images.is_dir():
        raise DataError(f"--images {images} is not a directory")
    model, info = detector_from_package(package)
    model.to(device)
    skeleton = None
    if instances:
        coco = load_json(instances)
        check_instances(coco, str(instances))
        entries = [(int(im["id"]), images / str(im.get("file_name", ""))) for im in coco["images"]]
        for image_id, path in entries:
            if not path.is_file():
                raise DataError(f"{instances}: image id {image_id}: {path} does not exist")
    else:
        files = image_files(images)
        if not files:
            raise DataError(f"{images}: holds no image file")
        entries = list(enumerate(files, start=1))
        skeleton = {"images": [], "annotations": [],
                    "categories": [{"id": int(c), "name": n} for c, n in zip(info["category_ids"], info["class_names"])]}
    results: list[dict[str, Any]] = []
    for start in range(0, len(entries), batch_size):
        chunk = entries[start:start + batch_size]
        pixels = [read_image(p) for _, p in chunk]
        preds = predict(model, [x.float().div(255.0) for x in pixels], batch_size)
        results += predictions_to_results(preds, [i for i, _ in chunk], info["category_ids"], min_score)
        if skeleton is not None:
            skeleton["images"] += [{"id": i, "file_name": str(p.relative_to(images)), "width": int(x.shape[2]),
                                    "height": int(x.shape[1])} for (i, p), x in zip(chunk, pixels)]
    write_json(out, results)
    message = f"wrote {out}: {len(results)} boxes on {len(entries)} images (COCO results, the model's category ids)"
    if skeleton is not None:
        images_json = out.with_name(out.stem + ".images.json")
        write_json(images_json, skeleton)
        message += f"\nwrote {images_json}: the image ids used (COCO instances without annotations, to verify)"
    return message
