"""Deterministic panoptic scenes ("panoptic shapes") written in the COCO panoptic format.

Every image has a background made of two textured *stuff* regions (``sky``: horizontal stripes
above a wavy horizon, ``ground``: speckle below; sometimes only one of them) and a few *thing*
objects (circle, square, triangle, cross, ring) of varied size, rotation and colour, which may
occlude each other. Each thing class has its own hue band, jittered per object, so a small CNN can
learn the classes on a CPU in minutes while shape, size, overlap and texture still matter.

Files follow COCO panoptic exactly, so :mod:`incremental.panoptic.coco` reads them with the same
code as real COCO: ``DIR/<split>/images/NNNNNN.png`` (RGB), ``DIR/<split>/panoptic/NNNNNN.png``
(segment id encoded as ``R + 256 G + 256^2 B``, 0 = void) and ``DIR/<split>/panoptic.json``
(``images``, ``annotations`` with ``segments_info``, ``categories`` with ``isthing``).

The same ``seed``, split name and parameters give byte-identical files; a split whose JSON already
records the same parameters is not rewritten.
"""
from __future__ import annotations

import colorsys
import json
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from ..io import atomic_write, write_json

#: COCO category records of the generator (ids are COCO ids, not model class indices).
CATEGORIES: list[dict] = [
    {"id": 1, "name": "circle", "isthing": 1, "color": [230, 40, 40]},
    {"id": 2, "name": "square", "isthing": 1, "color": [230, 200, 40]},
    {"id": 3, "name": "triangle", "isthing": 1, "color": [40, 200, 60]},
    {"id": 4, "name": "cross", "isthing": 1, "color": [220, 40, 210]},
    {"id": 5, "name": "ring", "isthing": 1, "color": [40, 210, 220]},
    {"id": 6, "name": "sky", "isthing": 0, "color": [110, 140, 200]},
    {"id": 7, "name": "ground", "isthing": 0, "color": [130, 110, 80]},
]
THING_NAMES: tuple[str, ...] = tuple(c["name"] for c in CATEGORIES if c["isthing"])
STUFF_NAMES: tuple[str, ...] = tuple(c["name"] for c in CATEGORIES if not c["isthing"])
_CATEGORY_ID = {c["name"]: c["id"] for c in CATEGORIES}
#: Hue band centre of every thing class (HSV hue in [0, 1)); the sky is a desaturated blue.
_HUE = {"circle": 0.0, "square": 0.14, "triangle": 0.33, "cross": 0.84, "ring": 0.5}


@dataclass
class SplitSpec:
    """What the images of one split contain.

    Every image gets between ``n_required[0]`` and ``n_required[1]`` objects drawn from
    ``required`` (at least one when the minimum is >= 1) plus ``n_other`` objects drawn from
    ``others``. Object classes are drawn uniformly from the given list. ``annotate`` lists the
    classes written to the annotations (None: all); the pixels of the others are void (id 0), which
    is what new-class-only annotations of an incremental update look like on disk.
    """

    n_images: int
    required: list[str]
    n_required: tuple[int, int] = (1, 3)
    others: list[str] = field(default_factory=list)
    n_other: tuple[int, int] = (0, 0)
    image_size: int = 64
    annotate: list[str] | None = None

    def validate(self) -> None:
        for name in [*self.required, *self.others, *(self.annotate or [])]:
            if name not in _CATEGORY_ID:
                raise ValueError(f"unknown class {name!r}; known: {', '.join(_CATEGORY_ID)}")
        for name in [*self.required, *self.others]:
            if name not in THING_NAMES:
                raise ValueError(f"unknown thing class {name!r}; known: {', '.join(THING_NAMES)}")
        for key, (lo, hi) in (("n_required", self.n_required), ("n_other", self.n_other)):
            if not 0 <= lo <= hi:
                raise ValueError(f"{key} must be (min, max) with 0 <= min <= max, got {(lo, hi)}")
        if not self.required and self.n_required[1] > 0:
            raise ValueError("n_required > 0 needs a non-empty 'required' list")
        if self.others == [] and self.n_other[1] > 0:
            raise ValueError("n_other > 0 needs a non-empty 'others' list")
        if self.image_size < 32:
            raise ValueError(f"image_size must be >= 32, got {self.image_size}")
        if self.n_images < 1:
            raise ValueError(f"n_images must be >= 1, got {self.n_images}")


# ----------------------------------------------------------------------------- shape masks
def shape_mask(kind: str, size: int, cx: float, cy: float, r: float, angle: float) -> np.ndarray:
    """Boolean (size, size) mask of one shape centred at (cx, cy) with outer radius ``r``."""
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    dx, dy = xs - cx, ys - cy
    c, s = np.cos(angle), np.sin(angle)
    u, v = c * dx + s * dy, -s * dx + c * dy  # coordinates in the shape's rotated frame
    if kind == "circle":
        return dx**2 + dy**2 <= r**2
    if kind == "square":
        half = 0.8 * r
        return (np.abs(u) <= half) & (np.abs(v) <= half)
    if kind == "triangle":
        inside = np.ones_like(u, dtype=bool)
        for k in range(3):  # three half-planes, edge normals 120 degrees apart
            a = np.pi / 2 + 2 * np.pi * k / 3
            inside &= np.cos(a) * u + np.sin(a) * v <= 0.5 * r
        return inside
    if kind == "cross":
        arm = 0.34 * r
        return ((np.abs(u) <= r) & (np.abs(v) <= arm)) | ((np.abs(u) <= arm) & (np.abs(v) <= r))
    if kind == "ring":
        d2 = dx**2 + dy**2
        return (d2 <= r**2) & (d2 >= (0.5 * r) ** 2)
    raise ValueError(f"unknown shape {kind!r}")


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v), dtype=np.float64) * 255.0


def _background(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Textured stuff background: (image float (size, size, 3), stuff index map: 0 sky, 1 ground)."""
    ys, xs = np.mgrid[0:size, 0:size]
    mode = rng.random()
    if mode < 0.1:
        region = np.zeros((size, size), dtype=np.int64)  # sky only
    elif mode < 0.2:
        region = np.ones((size, size), dtype=np.int64)  # ground only
    else:
        y0 = rng.uniform(0.3, 0.7) * size
        amp = rng.uniform(0.0, 0.08) * size
        period = rng.uniform(0.5, 1.5) * size
        phase = rng.uniform(0, 2 * np.pi)
        horizon = y0 + amp * np.sin(2 * np.pi * xs / period + phase)
        region = (ys >= horizon).astype(np.int64)
    # sky: horizontal stripes of two desaturated blues
    sky_a = _hsv(rng.uniform(0.56, 0.64), rng.uniform(0.25, 0.45), rng.uniform(0.7, 0.9))
    sky_b = sky_a * rng.uniform(0.75, 0.9)
    stripe = rng.integers(3, 6)
    sky = np.where(((ys // stripe) % 2 == 0)[..., None], sky_a, sky_b)
    # ground: brown-grey speckle
    ground_base = _hsv(rng.uniform(0.06, 0.12), rng.uniform(0.2, 0.45), rng.uniform(0.35, 0.6))
    speckle = rng.normal(0.0, 22.0, size=(size, size, 1))
    ground = ground_base + speckle
    image = np.where((region == 0)[..., None], sky, ground)
    return image, region


def _place_objects(rng: np.random.Generator, classes: list[str], size: int) -> list[tuple[str, np.ndarray]]:
    """Draw objects in order (later ones occlude earlier ones); an object that would hide more than
    40% of an earlier one is re-placed (up to 30 tries) or skipped. Returns (class, visible mask)."""
    placed: list[tuple[str, np.ndarray, int]] = []  # (class, visible mask, full area)
    for kind in classes:
        for _ in range(30):
            r = rng.uniform(0.09, 0.2) * size
            cx = rng.uniform(r, size - r)
            cy = rng.uniform(r, size - r)
            full = shape_mask(kind, size, cx, cy, r, rng.uniform(0, 2 * np.pi))
            if full.sum() < 12:
                continue
            if all(((vis & ~full).sum() >= 0.6 * area) for _, vis, area in placed):
                placed = [(k, vis & ~full, area) for k, vis, area in placed]
                placed.append((kind, full, int(full.sum())))
                break
    return [(k, vis) for k, vis, _ in placed if vis.sum() > 0]


def _encode_ids(segment_map: np.ndarray) -> np.ndarray:
    """Segment ids -> RGB (COCO panoptic: id = R + 256 G + 256^2 B)."""
    rgb = np.zeros((*segment_map.shape, 3), dtype=np.uint8)
    rgb[..., 0] = segment_map % 256
    rgb[..., 1] = (segment_map // 256) % 256
    rgb[..., 2] = (segment_map // 65536) % 256
    return rgb


def _bbox(mask: np.ndarray) -> list[int]:
    ys, xs = np.nonzero(mask)
    return [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]


def render_scene(rng: np.random.Generator, spec: SplitSpec) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """One scene: (RGB uint8 image, segment id map int64, segments_info)."""
    size = spec.image_size
    image, region = _background(rng, size)
    n_req = int(rng.integers(spec.n_required[0], spec.n_required[1] + 1)) if spec.required else 0
    n_oth = int(rng.integers(spec.n_other[0], spec.n_other[1] + 1)) if spec.others else 0
    classes = [spec.required[i] for i in rng.integers(0, len(spec.required), n_req)] if n_req else []
    classes += [spec.others[i] for i in rng.integers(0, len(spec.others), n_oth)] if n_oth else []
    classes = [classes[i] for i in rng.permutation(len(classes))]  # random drawing (occlusion) order
    objects = _place_objects(rng, classes, size)

    segment_map = np.zeros((size, size), dtype=np.int64)
    segments: list[dict] = []
    next_id = 1
    thing_pixels = np.zeros((size, size), dtype=bool)
    for kind, mask in objects:
        thing_pixels |= mask
    for stuff_index, name in enumerate(STUFF_NAMES):
        mask = (region == stuff_index) & ~thing_pixels
        if mask.any():
            segment_map[mask] = next_id
            segments.append({"id": next_id, "category_id": _CATEGORY_ID[name], "iscrowd": 0,
                             "area": int(mask.sum()), "bbox": _bbox(mask)})
            next_id += 1
    for kind, mask in objects:
        colour = _hsv(_HUE[kind] + rng.uniform(-0.04, 0.04), rng.uniform(0.6, 1.0), rng.uniform(0.65, 1.0))
        shade = rng.normal(0.0, 8.0, size=(size, size, 1))
        image = np.where(mask[..., None], colour + shade, image)
        segment_map[mask] = next_id
        segments.append({"id": next_id, "category_id": _CATEGORY_ID[kind], "iscrowd": 0,
                         "area": int(mask.sum()), "bbox": _bbox(mask)})
        next_id += 1
    image = image + rng.normal(0.0, 4.0, size=image.shape)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), segment_map, segments


def _save_png(path: Path, array: np.ndarray) -> None:
    atomic_write(path, lambda p: Image.fromarray(array).save(p, format="PNG"))


def generate_split(root: str | Path, split: str, spec: SplitSpec, seed: int) -> Path:
    """Write one split under ``root/split`` and return the path of its ``panoptic.json``.

    Deterministic in (``seed``, ``split``, ``spec``); the JSON is written last, so a split whose JSON
    exists with the same parameters is complete and is reused as is.
    """
    spec.validate()
    out = Path(root) / split
    json_path = out / "panoptic.json"
    params = {"generator": "panoptic_shapes", "version": 1, "split": split, "seed": int(seed), **asdict(spec)}
    params = json.loads(json.dumps(params))  # tuples -> lists, as they come back from the file
    if json_path.is_file():
        try:
            if json.loads(json_path.read_text()).get("info") == params:
                return json_path
        except (OSError, json.JSONDecodeError):
            pass
    rng = np.random.default_rng([int(seed), zlib.crc32(split.encode())])
    images, annotations = [], []
    for i in range(spec.n_images):
        image, segment_map, segments = render_scene(rng, spec)
        if spec.annotate is not None:
            keep_ids = set(category_ids(spec.annotate))
            dropped = [seg["id"] for seg in segments if seg["category_id"] not in keep_ids]
            segment_map[np.isin(segment_map, dropped)] = 0
            segments = [seg for seg in segments if seg["category_id"] in keep_ids]
        name = f"{i:06d}.png"
        _save_png(out / "images" / name, image)
        _save_png(out / "panoptic" / name, _encode_ids(segment_map))
        images.append({"id": i, "file_name": name, "width": spec.image_size, "height": spec.image_size})
        annotations.append({"image_id": i, "file_name": name, "segments_info": segments})
    write_json(json_path, {"info": params, "images": images, "annotations": annotations, "categories": CATEGORIES})
    return json_path


def category_ids(names: Sequence[str]) -> list[int]:
    """COCO category ids of generator class names (clear error for an unknown name)."""
    unknown = [n for n in names if n not in _CATEGORY_ID]
    if unknown:
        raise ValueError(f"unknown panoptic_shapes classes {unknown}; known: {', '.join(_CATEGORY_ID)}")
    return [_CATEGORY_ID[n] for n in names]
