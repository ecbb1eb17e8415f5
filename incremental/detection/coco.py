"""COCO instances files (real or generated) as detection samples for the loop.

A sample is ``(image, target, task_label)``: the image a uint8 tensor (3, H, W) (or, with
``lazy=True``, the path of its file, read when a minibatch is built), the target torchvision's dict
``{"boxes": float (K, 4) x1 y1 x2 y2, "labels": int64 (K,), "image_id": int64 scalar}``. Labels are
contiguous: label ``i + 1`` is ``class_names[i]``; 0 is the background. :func:`detection_collate`
turns a list of samples into ``[list of float images in [0, 1], list of targets, task labels]``.

Nothing is dropped silently: crowd annotations (``iscrowd: 1``) are left out of training and counted,
boxes that reach past the image border are clipped and counted, and a box that is degenerate or lies
outside its image, an annotation of an unknown image or category, or a missing image file is an error
naming the file, the annotation id and the value.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch

from ..data import Batch, ListSamples
from ..datasets import DataError

#: How far (pixels) a box may reach past the border before it is an error rather than clipped.
BORDER_TOLERANCE = 2.0


class CocoFormatError(DataError):
    """A malformed COCO file: the message names the file, the entry and the value (a
    :class:`~incremental.datasets.DataError`, so ``incremental update`` exits with code 2)."""


@dataclass
class DetectionData:
    """Samples of one COCO file plus what is needed to evaluate and to explain them."""

    samples: ListSamples
    class_names: list[str]
    category_ids: list[int]  # COCO id of label i + 1
    image_ids: list[int]
    skipped: dict[str, int] = field(default_factory=dict)
    source: str = ""

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def targets(self) -> list[dict[str, torch.Tensor]]:
        return [s[1] for s in self.samples.samples]

    def images(self) -> list[torch.Tensor]:
        """Float images in [0, 1] (files are read now when the data is lazy)."""
        return [to_float_image(s[0]) for s in self.samples.samples]


def read_image(path: str | Path) -> torch.Tensor:
    """A uint8 tensor (3, H, W) from an image file (any mode PIL reads, converted to RGB)."""
    from PIL import Image

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file {path} does not exist")
    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def image_size_of(path: str | Path) -> tuple[int, int]:
    """(width, height) of an image file without decoding its pixels."""
    from PIL import Image

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file {path} does not exist")
    with Image.open(path) as im:
        return int(im.width), int(im.height)


def to_float_image(x: Any) -> torch.Tensor:
    """uint8 tensor, float tensor or file path -> float tensor (3, H, W) in [0, 1]."""
    if isinstance(x, (str, Path)):
        x = read_image(x)
    if x.dtype == torch.uint8:
        return x.float().div_(255.0)
    return x.float()


def detection_collate(items: Sequence[tuple[Any, Any, int]]) -> Batch:
    """``[images, targets, t]`` keeping lists (what torchvision's detectors take); images as floats."""
    return [
        [to_float_image(x) for x, _, _ in items],
        [y for _, y, _ in items],
        torch.tensor([int(t) for _, _, t in items], dtype=torch.long),
    ]


def empty_target(image_id: int) -> dict[str, torch.Tensor]:
    return {"boxes": torch.zeros((0, 4)), "labels": torch.zeros(0, dtype=torch.long),
            "image_id": torch.tensor(int(image_id))}


def load_json(path: str | Path) -> dict[str, Any]:
    """A JSON object from ``path`` with errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError, a 5000-digit number
        raise CocoFormatError(f"{path}: not valid JSON ({type(exc).__name__}: {str(exc)[:200]})") from None
    return data


def _require(cond: bool, source: str, message: str) -> None:
    if not cond:
        raise CocoFormatError(f"{source}: {message}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_instances(coco: Any, source: str) -> None:
    """Structure of a COCO instances dict: lists ``images``, ``annotations``, ``categories`` of objects
    with unique integer ids; integer ``image_id`` / ``category_id``; image sizes positive numbers."""
    _require(isinstance(coco, dict), source, f"the top level must be an object, got {type(coco).__name__}")
    for key in ("images", "annotations", "categories"):
        _require(isinstance(coco.get(key), list), source, f"'{key}' must be a list (COCO instances format)")
    for key in ("images", "categories", "annotations"):
        seen: set[Any] = set()
        for k, entry in enumerate(coco[key]):
            _require(isinstance(entry, dict) and "id" in entry, source, f"{key}[{k}] has no 'id'")
            _require(_is_int(entry["id"]), source, f"{key}[{k}]: id must be an integer, got {entry['id']!r:.80}")
            _require(entry["id"] not in seen, source, f"{key}[{k}]: duplicate id {entry['id']!r}")
            seen.add(entry["id"])
    for k, cat in enumerate(coco["categories"]):
        _require(isinstance(cat.get("name"), str), source, f"categories[{k}] (id {cat['id']}) has no 'name'")
    for k, im in enumerate(coco["images"]):
        for side in ("width", "height"):
            value = im.get(side)
            _require(value is None or (_is_number(value) and value > 0), source,
                     f"images[{k}] (id {im['id']}): {side} must be a positive number, got {value!r:.80}")
        name = im.get("file_name")
        _require(name is None or isinstance(name, str), source, f"images[{k}] (id {im['id']}): file_name must be a string")
    for k, ann in enumerate(coco["annotations"]):
        for field_name in ("image_id", "category_id"):
            _require(_is_int(ann.get(field_name)), source,
                     f"annotation id {ann['id']}: {field_name} must be an integer, got {ann.get(field_name)!r:.80}")


def check_results(results: Any, source: str) -> None:
    """Structure of a COCO results file: a list of ``{image_id, category_id, bbox, score}`` objects with
    integer ids and a finite score (boxes are checked against their image where they are read)."""
    _require(isinstance(results, list), source,
             f"predictions must be a list in the COCO results format, got {type(results).__name__}")
    for k, det in enumerate(results):
        where = f"prediction [{k}]"
        _require(isinstance(det, dict) and {"image_id", "category_id", "bbox", "score"} <= set(det), source,
                 f"{where}: needs image_id, category_id, bbox and score, got {det!r:.120}")
        for field_name in ("image_id", "category_id"):
            _require(_is_int(det[field_name]), source, f"{where}: {field_name} must be an integer, got {det[field_name]!r:.80}")
        _require(_is_number(det["score"]), source, f"{where}: score must be a finite number, got {det['score']!r:.80}")


def xywh_to_xyxy_checked(bbox: Any, width: float | None, height: float | None, where: str,
                         counts: dict[str, int] | None = None) -> list[float]:
    """A COCO ``[x, y, w, h]`` as ``[x1, y1, x2, y2]`` clipped to the image, or a clear error.

    Within :data:`BORDER_TOLERANCE` pixels past the border the box is clipped (counted as
    ``clipped_boxes``); farther out, or with ``w`` or ``h`` <= 0, it is an error: such a box means
    the file does not belong to these images (or was written in another box convention).
    """
    if not (isinstance(bbox, (list, tuple)) and len(bbox) == 4 and all(_is_number(v) for v in bbox)):
        raise CocoFormatError(f"{where}: bbox must be 4 numbers [x, y, w, h], all finite, got {bbox!r:.120}")
    x, y, w, h = (float(v) for v in bbox)
    if not (w > 0 and h > 0):
        raise CocoFormatError(f"{where}: bbox {bbox} has zero or negative width/height")
    x1, y1, x2, y2 = x, y, x + w, y + h
    if width is not None and height is not None:
        tol = BORDER_TOLERANCE
        if x1 < -tol or y1 < -tol or x2 > width + tol or y2 > height + tol:
            raise CocoFormatError(f"{where}: bbox {bbox} lies outside the {width:g}x{height:g} image")
        cx1, cy1, cx2, cy2 = max(x1, 0.0), max(y1, 0.0), min(x2, float(width)), min(y2, float(height))
        if (cx1, cy1, cx2, cy2) != (x1, y1, x2, y2):
            if counts is not None:
                counts["clipped_boxes"] = counts.get("clipped_boxes", 0) + 1
            x1, y1, x2, y2 = cx1, cy1, cx2, cy2
        if not (x2 - x1 > 0 and y2 - y1 > 0):
            raise CocoFormatError(f"{where}: bbox {bbox} has no area inside the {width:g}x{height:g} image")
    return [x1, y1, x2, y2]


def resolve_classes(categories: Iterable[Mapping[str, Any]], class_names: Sequence[str] | None,
                    source: str, unknown: str = "error") -> tuple[list[str], dict[int, int]]:
    """Class names and the map COCO category id -> contiguous label (1-based).

    Without ``class_names`` the file's categories in id order are the classes. With them, categories
    are matched by name; a category of the file that is not a class is an error (``unknown="error"``)
    or its annotations are skipped and counted (``unknown="skip"``).
    """
    cats = sorted(categories, key=lambda c: c["id"])
    if class_names is None:
        names = [str(c["name"]) for c in cats]
        if len(set(names)) != len(names):
            raise CocoFormatError(f"{source}: category names are not unique: {names}")
        return names, {int(c["id"]): i + 1 for i, c in enumerate(cats)}
    names = list(class_names)
    index = {n: i + 1 for i, n in enumerate(names)}
    mapping: dict[int, int] = {}
    for c in cats:
        if c["name"] in index:
            mapping[int(c["id"])] = index[c["name"]]
        elif unknown == "error":
            raise CocoFormatError(
                f"{source}: category {c['name']!r} (id {c['id']}) is not one of the model's classes {names}"
            )
    return names, mapping


def samples_from_coco(
    coco: dict[str, Any],
    images: Mapping[int, Any],
    class_names: Sequence[str] | None = None,
    *,
    source: str = "<coco>",
    unknown_categories: str = "error",
    task_label: int = 0,
) -> DetectionData:
    """Detection samples from a COCO instances dict and ``images[image_id]`` (uint8 tensor (3, H, W),
    HxWx3 uint8 array, or path). Every image of ``coco['images']`` becomes a sample, also those
    without annotations (they teach the background)."""
    check_instances(coco, source)
    names, cat_to_label = resolve_classes(coco["categories"], class_names, source, unknown_categories)
    known_cats = {int(c["id"]) for c in coco["categories"]}
    skipped: dict[str, int] = {}
    by_image: dict[int, list[tuple[list[float], int]]] = {int(im["id"]): [] for im in coco["images"]}
    sizes = {int(im["id"]): (im.get("width"), im.get("height")) for im in coco["images"]}
    for k, ann in enumerate(coco["annotations"]):
        where = f"{source}: annotation id {ann['id']}"
        image_id = ann.get("image_id")
        if image_id not in by_image:
            raise CocoFormatError(f"{where}: image_id {image_id!r} is not in 'images'")
        cat = ann.get("category_id")
        if cat not in known_cats:
            raise CocoFormatError(f"{where}: category_id {cat!r} is not in 'categories'")
        if ann.get("iscrowd", 0):
            skipped["crowd_annotations"] = skipped.get("crowd_annotations", 0) + 1
            continue
        if int(cat) not in cat_to_label:
            skipped["unknown_category_annotations"] = skipped.get("unknown_category_annotations", 0) + 1
            continue
        w, h = sizes[int(image_id)]
        box = xywh_to_xyxy_checked(ann.get("bbox"), w, h, where, skipped)
        by_image[int(image_id)].append((box, cat_to_label[int(cat)]))
    samples: list[tuple[Any, dict[str, torch.Tensor], int]] = []
    per_image_label: list[int] = []
    image_ids: list[int] = []
    for im in coco["images"]:
        image_id = int(im["id"])
        if image_id not in images:
            raise CocoFormatError(f"{source}: no image given for image id {image_id} ({im.get('file_name', '?')})")
        x = images[image_id]
        if isinstance(x, np.ndarray):
            x = torch.from_numpy(np.ascontiguousarray(x)).permute(2, 0, 1).contiguous()
        objs = by_image[image_id]
        target = empty_target(image_id)
        if objs:
            target["boxes"] = torch.tensor([b for b, _ in objs], dtype=torch.float32)
            target["labels"] = torch.tensor([label for _, label in objs], dtype=torch.long)
        samples.append((x, target, int(task_label)))
        labels = target["labels"].tolist()
        per_image_label.append(max(set(labels), key=labels.count) if labels else 0)
        image_ids.append(image_id)
    id_of_label = {label: cat for cat, label in cat_to_label.items()}
    category_ids = [id_of_label.get(i + 1, -1) for i in range(len(names))]
    data = ListSamples(samples, torch.tensor(per_image_label, dtype=torch.long), detection_collate)
    return DetectionData(data, names, category_ids, image_ids, skipped, source)


def load_coco_detection(
    instances: str | Path,
    images_dir: str | Path | None = None,
    class_names: Sequence[str] | None = None,
    *,
    lazy: bool = False,
    unknown_categories: str = "error",
    task_label: int = 0,
) -> DetectionData:
    """Read a COCO instances file and its images (default: ``images/`` beside the file, else the
    file's directory). ``lazy`` keeps paths and reads images when minibatches are built (real COCO
    does not fit in memory as tensors); image sizes missing from the file are read from the images."""
    instances = Path(instances)
    coco = load_json(instances)
    source = str(instances)
    check_instances(coco, source)
    root = Path(images_dir) if images_dir is not None else default_images_dir(instances)
    images: dict[int, Any] = {}
    for im in coco["images"]:
        name = im.get("file_name")
        _require(isinstance(name, str), source, f"image id {im['id']} has no 'file_name'")
        path = root / name
        if not path.is_file():
            raise FileNotFoundError(f"{source}: image id {im['id']}: file {path} does not exist")
        if lazy:
            images[int(im["id"])] = str(path)
            if im.get("width") is None or im.get("height") is None:
                im["width"], im["height"] = image_size_of(path)
        else:
            x = read_image(path)
            h, w = int(x.shape[1]), int(x.shape[2])
            said = (im.get("width"), im.get("height"))
            if any(v is not None and v != actual for v, actual in zip(said, (w, h))):
                raise CocoFormatError(f"{source}: image id {im['id']} ({name}) is {w}x{h} but the file says "
                                      f"{said[0]}x{said[1]}")
            im["width"], im["height"] = w, h
            images[int(im["id"])] = x
    return samples_from_coco(coco, images, class_names, source=source,
                             unknown_categories=unknown_categories, task_label=task_label)


def default_images_dir(instances: str | Path) -> Path:
    """``images/`` beside an instances file when it exists, else the file's own directory."""
    instances = Path(instances)
    return instances.parent / "images" if (instances.parent / "images").is_dir() else instances.parent


def targets_to_coco(targets: Sequence[Mapping[str, torch.Tensor]], class_names: Sequence[str],
                    category_ids: Sequence[int] | None = None, image_ids: Sequence[int] | None = None,
                    sizes: Sequence[tuple[int, int]] | None = None) -> dict[str, Any]:
    """Targets back to a COCO instances dict (boxes as ``[x, y, w, h]``), e.g. to write training files."""
    category_ids = list(category_ids) if category_ids is not None else list(range(1, len(class_names) + 1))
    images, anns = [], []
    for k, t in enumerate(targets):
        image_id = int(image_ids[k]) if image_ids is not None else int(t.get("image_id", torch.tensor(k + 1)))
        entry: dict[str, Any] = {"id": image_id, "file_name": f"{image_id}.png"}
        if sizes is not None:
            entry["width"], entry["height"] = sizes[k]
        images.append(entry)
        for box, label in zip(t["boxes"].tolist(), t["labels"].tolist()):
            x1, y1, x2, y2 = box
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": category_ids[int(label) - 1],
                         "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": 0})
    cats = [{"id": cid, "name": n} for cid, n in zip(category_ids, class_names)]
    return {"images": images, "annotations": anns, "categories": cats}
