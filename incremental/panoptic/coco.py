"""COCO panoptic files -> samples for the loop (real COCO, generated shapes, hand-written test files).

A COCO panoptic data set is a JSON file (``images``, ``annotations`` with ``segments_info``,
``categories`` with ``isthing``) plus one PNG per image whose RGB colour encodes the segment id
(``id = R + 256 G + 256^2 B``, 0 = void). Every segment id found in a PNG must be listed in that
image's ``segments_info`` and every ``category_id`` must be a known category; anything else is a
:class:`PanopticFormatError` naming the file, the image and the segment.

Samples are ``(image float (3, H, W) in [0, 1], target, 0)`` with ``target = {"labels": (K,) long
model class indices, "masks": (K, H, W) bool, "image_id": int}``. Segments of categories the
caller does not keep (classes not annotated in this step, crowd regions) are left out, so their
pixels are void. One stuff category appearing as several segments in an image is merged into one
mask (the model predicts one segment per stuff class).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch
from PIL import Image

from ..data import Batch, ListSamples
from ..datasets import DataError


class PanopticFormatError(DataError):
    """A malformed panoptic file; the message names the file, image and segment."""


@dataclass
class PanopticImage:
    """One image with its segment id map and the segments listed for it in the JSON."""

    image_id: int
    file_name: str
    image: np.ndarray  # uint8 (H, W, 3)
    segment_map: np.ndarray  # int64 (H, W), 0 = void
    segments: list[dict[str, Any]]


@dataclass
class PanopticData:
    """A loaded panoptic data set: its categories (COCO records) and images."""

    json_path: Path
    categories: list[dict[str, Any]]
    images: list[PanopticImage]

    @property
    def category_by_id(self) -> dict[int, dict[str, Any]]:
        return {int(c["id"]): c for c in self.categories}

    def category_id(self, name: str) -> int:
        for c in self.categories:
            if c["name"] == name:
                return int(c["id"])
        raise KeyError(f"{self.json_path}: no category named {name!r}; known: {', '.join(c['name'] for c in self.categories)}")


def decode_ids(rgb: np.ndarray) -> np.ndarray:
    """RGB uint8 (H, W, 3) -> segment ids int64 (H, W): ``R + 256 G + 256^2 B``."""
    rgb = rgb.astype(np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]


def _require(mapping: Any, key: str, where: str) -> Any:
    if not isinstance(mapping, dict) or key not in mapping:
        raise PanopticFormatError(f"{where}: missing field {key!r}")
    return mapping[key]


def _check_structure(data: Any, json_path: Path) -> None:
    """Types of every field the loader reads, so that a damaged file is one error naming the entry."""
    def is_int(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    def check_entries(entries: Any, where: str, fields: dict[str, Any], unique: str) -> None:
        if not isinstance(entries, list):
            raise PanopticFormatError(f"{where} must be a list, got {type(entries).__name__}")
        seen: set[Any] = set()
        for k, entry in enumerate(entries):
            for key, valid in fields.items():
                value = _require(entry, key, f"{where}[{k}]")
                if not valid(value):
                    raise PanopticFormatError(f"{where}[{k}]: field {key!r} has the wrong type or value: {value!r:.80}")
            if entry[unique] in seen:
                raise PanopticFormatError(f"{where}[{k}]: duplicate {unique} {entry[unique]!r}")
            seen.add(entry[unique])

    if not isinstance(data, dict):
        raise PanopticFormatError(f"{json_path}: the top level must be an object, got {type(data).__name__}")
    text = lambda v: isinstance(v, str)  # noqa: E731
    check_entries(_require(data, "categories", str(json_path)), f"{json_path}: categories",
                  {"id": is_int, "name": text, "isthing": lambda v: v in (0, 1)}, "id")
    check_entries(_require(data, "images", str(json_path)), f"{json_path}: images", {"id": is_int, "file_name": text}, "id")
    annotations = _require(data, "annotations", str(json_path))
    check_entries(annotations, f"{json_path}: annotations",
                  {"image_id": is_int, "file_name": text, "segments_info": lambda v: isinstance(v, list)}, "image_id")
    for k, ann in enumerate(annotations):
        check_entries(ann["segments_info"], f"{json_path}: annotations[{k}].segments_info",
                      {"id": is_int, "category_id": is_int}, "id")


def _resize(array: np.ndarray, size: tuple[int, int] | None, nearest: bool) -> np.ndarray:
    if size is None or array.shape[:2] == size:
        return array
    height, width = size
    resample = Image.NEAREST if nearest else Image.BILINEAR
    if array.dtype == np.int64:  # segment ids: resize the RGB encoding with nearest neighbour
        rgb = np.stack([array % 256, (array // 256) % 256, (array // 65536) % 256], -1).astype(np.uint8)
        return decode_ids(np.asarray(Image.fromarray(rgb).resize((width, height), Image.NEAREST)))
    return np.asarray(Image.fromarray(array).resize((width, height), resample))


def _read_rgb(path: Path) -> np.ndarray:
    """An image file as RGB uint8 (H, W, 3); a damaged file is a PanopticFormatError naming it."""
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:  # PIL's ways to say "broken"
        raise PanopticFormatError(f"{path}: cannot be read as an image ({type(exc).__name__}: {exc})") from None


def load_coco_panoptic(
    json_path: str | Path,
    masks_dir: str | Path | None = None,
    images_dir: str | Path | None = None,
    *,
    size: int | tuple[int, int] | None = None,
    limit: int | None = None,
) -> PanopticData:
    """Read a COCO panoptic JSON, its segment PNGs and its images, checking that they agree.

    ``masks_dir`` defaults to COCO's layout (the JSON path without ``.json``, e.g.
    ``panoptic_val2017.json`` -> ``panoptic_val2017/``) or ``panoptic/`` beside the JSON, whichever
    exists; ``images_dir`` defaults to ``images/`` beside the JSON. ``size`` resizes images (bilinear)
    and id maps (nearest) to ``(H, W)`` (an int means square). ``limit`` reads the first images only.
    """
    json_path = Path(json_path)
    if not json_path.is_file():
        raise FileNotFoundError(f"panoptic annotation file {json_path} does not exist")
    try:
        data = json.loads(json_path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError, a 5000-digit number
        raise PanopticFormatError(f"{json_path}: not valid JSON ({type(exc).__name__}: {str(exc)[:200]})") from None
    _check_structure(data, json_path)
    if masks_dir is None:
        candidates = [json_path.with_suffix(""), json_path.parent / "panoptic"]
        masks_dir = next((c for c in candidates if c.is_dir()), candidates[0])
    masks_dir = Path(masks_dir)
    images_dir = Path(images_dir) if images_dir is not None else json_path.parent / "images"
    if isinstance(size, int):
        size = (size, size)

    categories = _require(data, "categories", str(json_path))
    known = {}
    for k, cat in enumerate(categories):
        where = f"{json_path}: categories[{k}]"
        cid = int(_require(cat, "id", where))
        _require(cat, "name", where)
        _require(cat, "isthing", where)
        known[cid] = cat
    image_files = {int(_require(im, "id", f"{json_path}: images[{k}]")): _require(im, "file_name", f"{json_path}: images[{k}]")
                   for k, im in enumerate(_require(data, "images", str(json_path)))}
    annotations = _require(data, "annotations", str(json_path))
    if limit is not None:
        annotations = annotations[:limit]

    images: list[PanopticImage] = []
    for k, ann in enumerate(annotations):
        where = f"{json_path}: annotations[{k}]"
        image_id = int(_require(ann, "image_id", where))
        png_name = _require(ann, "file_name", where)
        segments = _require(ann, "segments_info", where)
        listed: dict[int, dict] = {}
        for j, seg in enumerate(segments):
            swhere = f"{where} (image {png_name}) segments_info[{j}]"
            sid = int(_require(seg, "id", swhere))
            cid = int(_require(seg, "category_id", swhere))
            if cid not in known:
                raise PanopticFormatError(
                    f"{json_path}: image {png_name} segment {sid} has category_id {cid}, which is not in categories "
                    f"(known ids: {sorted(known)})")
            listed[sid] = seg
        if image_id not in image_files:
            raise PanopticFormatError(f"{where}: image_id {image_id} is not in images")
        png_path = masks_dir / png_name
        if not png_path.is_file():
            raise FileNotFoundError(f"{png_path}: segment PNG of image {image_id} listed in {json_path} does not exist")
        image_path = images_dir / image_files[image_id]
        if not image_path.is_file():
            raise FileNotFoundError(f"{image_path}: image {image_id} listed in {json_path} does not exist")
        segment_map = decode_ids(_read_rgb(png_path))
        present = set(np.unique(segment_map).tolist()) - {0}
        missing = sorted(present - set(listed))
        if missing:
            sid = missing[0]
            ys, xs = np.nonzero(segment_map == sid)
            raise PanopticFormatError(
                f"{png_path}: segment id {sid} (RGB {sid % 256},{sid // 256 % 256},{sid // 65536}) first at pixel "
                f"(row {ys[0]}, col {xs[0]}) is not in segments_info of image {png_name} in {json_path}")
        image = _read_rgb(image_path)
        if image.shape[:2] != segment_map.shape:
            raise PanopticFormatError(
                f"{image_path}: image is {image.shape[1]}x{image.shape[0]} but its segment PNG {png_path} is "
                f"{segment_map.shape[1]}x{segment_map.shape[0]}")
        images.append(PanopticImage(image_id, png_name, _resize(image, size, nearest=False),
                                    _resize(segment_map, size, nearest=True), list(listed.values())))
    return PanopticData(json_path, list(categories), images)


def image_target(item: PanopticImage, class_of_category: Mapping[int, int],
                 categories: Mapping[int, Mapping[str, Any]]) -> dict[str, torch.Tensor]:
    """Model target of one image, keeping only categories in ``class_of_category`` (-> class index).

    Crowd segments and segments of other categories are dropped (their pixels become void); the
    segments of one stuff category are merged into one mask.
    """
    labels: list[int] = []
    masks: list[np.ndarray] = []
    stuff_slot: dict[int, int] = {}
    for seg in item.segments:
        cid = int(seg["category_id"])
        if cid not in class_of_category or int(seg.get("iscrowd", 0)):
            continue
        mask = item.segment_map == int(seg["id"])
        if not mask.any():
            continue  # resized away, or listed without pixels
        cls = int(class_of_category[cid])
        if not int(categories[cid]["isthing"]):
            if cls in stuff_slot:
                masks[stuff_slot[cls]] |= mask
                continue
            stuff_slot[cls] = len(masks)
        labels.append(cls)
        masks.append(mask)
    h, w = item.segment_map.shape
    return {
        "labels": torch.tensor(labels, dtype=torch.long),
        "masks": torch.from_numpy(np.stack(masks)) if masks else torch.zeros(0, h, w, dtype=torch.bool),
        "image_id": torch.tensor(item.image_id),
    }


def image_tensor(item: PanopticImage) -> torch.Tensor:
    return torch.from_numpy(np.array(item.image, dtype=np.float32)).permute(2, 0, 1).div_(255.0).contiguous()


def collate_panoptic(items: list[tuple[Any, Any, int]]) -> Batch:
    """``[images (B, 3, H, W), [target dicts], task labels (B,)]``; images must share one size."""
    xs, ys, ts = zip(*items)
    return [torch.stack(list(xs)), list(ys), torch.tensor(ts, dtype=torch.long)]


def to_samples(data: PanopticData, class_of_category: Mapping[int, int],
               image_ids: Iterable[int] | None = None) -> ListSamples:
    """Samples of ``data`` (optionally only ``image_ids``) with targets restricted to the mapped
    categories. ``ListSamples.targets`` holds each image's smallest kept class (-1 if none), which
    is what class-balanced storage groups by."""
    wanted = None if image_ids is None else set(int(i) for i in image_ids)
    categories = data.category_by_id
    samples, first = [], []
    for item in data.images:
        if wanted is not None and item.image_id not in wanted:
            continue
        target = image_target(item, class_of_category, categories)
        samples.append((image_tensor(item), target, 0))
        first.append(int(target["labels"].min()) if len(target["labels"]) else -1)
    return ListSamples(samples, torch.tensor(first, dtype=torch.long), collate_panoptic)


def class_mapping(data: PanopticData, class_names: Sequence[str]) -> dict[int, int]:
    """COCO category id -> model class index, in the order of ``class_names``."""
    return {data.category_id(name): index for index, name in enumerate(class_names)}
