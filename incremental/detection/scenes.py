"""Deterministic detection scenes in COCO format: a general scene and a transfer scene.

The story of METHODS section 2: a detector (the "meta model") is trained on a general scene and
deployed in a transfer scene with the same classes but a clear domain shift. Here both are drawn
from a seed, image by image (image ``i`` of a split depends only on ``(seed, scene, split, i)``, so
asking for more images never changes the first ones):

- ``general``: light, smooth backgrounds; one to four solid shapes of 14-36 pixels (at 128x128);
  no clutter; even lighting.
- ``transfer``: dark textured backgrounds (stripes and blotches), clutter (lines, arcs and dots that
  are not objects), smaller shapes (9-24 pixels) with outlines instead of fills for a part of them,
  dim light with a colour cast and a lighting gradient, more sensor noise.

Classes: ``circle``, ``square``, ``triangle`` (the old classes, in both scenes) and, in the
new-class variant of the transfer scene, ``star`` and ``cross``. Category ids are fixed
(:data:`CATEGORIES`) so that files of every scene can be mixed.

Annotations are exact: the box of a shape is the bounding box of its drawn geometry clipped to the
image. Files: ``DIR/images/<split>_<i>.png`` and ``DIR/instances.json``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw

from ..io import atomic_write, write_json

#: Fixed COCO categories of every generated scene (ids never change).
CATEGORIES: list[dict[str, Any]] = [
    {"id": 1, "name": "circle", "supercategory": "shape"},
    {"id": 2, "name": "square", "supercategory": "shape"},
    {"id": 3, "name": "triangle", "supercategory": "shape"},
    {"id": 4, "name": "star", "supercategory": "shape"},
    {"id": 5, "name": "cross", "supercategory": "shape"},
]
OLD_CLASSES: list[str] = ["circle", "square", "triangle"]
NEW_CLASSES: list[str] = ["star", "cross"]
ALL_CLASSES: list[str] = OLD_CLASSES + NEW_CLASSES
_CATEGORY_ID = {c["name"]: c["id"] for c in CATEGORIES}

SCENES = ("general", "transfer")
_SCENE_CODE = {"general": 11, "transfer": 23}
_SPLIT_CODE = {"train": 1, "test": 2, "pool": 3}


@dataclass(frozen=True)
class SceneStyle:
    """How a scene looks; sizes are fractions of the image side."""

    size_range: tuple[float, float]
    objects: tuple[int, int]
    clutter: tuple[int, int]
    outline_fraction: float
    brightness: tuple[float, float]
    noise_std: float
    background: tuple[float, float]  # range of the background's base grey level (0-255)
    textured: bool  # stripes and blotches instead of a smooth gradient


STYLES: dict[str, SceneStyle] = {
    "general": SceneStyle(size_range=(0.11, 0.28), objects=(1, 4), clutter=(0, 0), outline_fraction=0.0,
                          brightness=(0.95, 1.05), noise_std=4.0, background=(170, 235), textured=False),
    "transfer": SceneStyle(size_range=(0.07, 0.19), objects=(1, 5), clutter=(4, 9), outline_fraction=0.35,
                           brightness=(0.55, 0.8), noise_std=12.0, background=(110, 170), textured=True),
}


@dataclass
class Scene:
    """Generated images (uint8 HxWx3 arrays, in ``coco['images']`` order) and their COCO dict."""

    images: list[np.ndarray]
    coco: dict[str, Any]

    def write(self, out_dir: str | Path) -> Path:
        """Write ``out_dir/images/*.png`` and ``out_dir/instances.json``; returns the JSON path."""
        return write_scene(self, out_dir)


def _image_rng(seed: int, scene: str, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), _SCENE_CODE[scene], _SPLIT_CODE[split], int(index)])


def _background(rng: np.random.Generator, size: int, style: SceneStyle) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    angle = rng.uniform(0, 2 * math.pi)
    ramp = (np.cos(angle) * xx + np.sin(angle) * yy)[..., None]
    base = rng.uniform(*style.background, size=3)
    if not style.textured:
        img = base + 25.0 * (ramp - 0.5) * rng.uniform(0.5, 1.0)
        return np.broadcast_to(img, (size, size, 3)).astype(np.float32).copy()
    period = rng.uniform(6, 16)
    stripes = 0.5 + 0.5 * np.sin(2 * math.pi * (np.cos(angle + 1.0) * xx + np.sin(angle + 1.0) * yy) * size / period)
    img = base + 30.0 * stripes[..., None] * rng.uniform(0.4, 1.0, size=3)
    # blotches: a few soft dark/bright discs
    for _ in range(int(rng.integers(2, 5))):
        cx, cy, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.1, 0.35)
        blob = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r))[..., None]
        img += rng.uniform(-30, 30) * blob
    return img.astype(np.float32)


def _object_color(rng: np.random.Generator, style: SceneStyle) -> tuple[int, int, int]:
    """A saturated colour far enough from the background's brightness."""
    hue = rng.uniform(0, 1)
    c = np.clip(np.abs(((hue * 6 + np.array([0.0, 4.0, 2.0])) % 6) - 3) - 1, 0, 1)
    dark = sum(style.background) / 2 < 128
    lo, hi = (130, 255) if dark else (20, 150)
    value = rng.uniform(lo, hi)
    return tuple(int(v) for v in (value * (0.35 + 0.65 * c)))  # type: ignore[return-value]


def _polygon(name: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    if name == "square":
        pts = [(math.cos(angle + math.pi / 4 + k * math.pi / 2), math.sin(angle + math.pi / 4 + k * math.pi / 2)) for k in range(4)]
        return [(cx + r * x, cy + r * y) for x, y in pts]
    if name == "triangle":
        return [(cx + r * math.cos(angle + k * 2 * math.pi / 3), cy + r * math.sin(angle + k * 2 * math.pi / 3)) for k in range(3)]
    if name == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else 0.42 * r
            a = angle + k * math.pi / 5
            pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
        return pts
    if name == "cross":
        t = 0.33 * r
        base = [(-t, -r), (t, -r), (t, -t), (r, -t), (r, t), (t, t), (t, r), (-t, r), (-t, t), (-r, t), (-r, -t), (-t, -t)]
        ca, sa = math.cos(angle), math.sin(angle)
        return [(cx + x * ca - y * sa, cy + x * sa + y * ca) for x, y in base]
    raise ValueError(f"unknown shape {name!r}")


def _box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _draw_object(draw: ImageDraw.ImageDraw, name: str, cx: float, cy: float, r: float, angle: float,
                 color: tuple[int, int, int], outline: bool, size: int) -> list[float]:
    """Draw one shape; returns its box [x1, y1, x2, y2] clipped to the image."""
    width = max(2, int(round(r * 0.3)))
    if name == "circle":
        box = [cx - r, cy - r, cx + r, cy + r]
        if outline:
            draw.ellipse(box, outline=color, width=width)
        else:
            draw.ellipse(box, fill=color)
    else:
        pts = _polygon(name, cx, cy, r, angle)
        if outline:
            draw.line(pts + [pts[0]], fill=color, width=width, joint="curve")
        else:
            draw.polygon(pts, fill=color)
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        box = [min(xs), min(ys), max(xs), max(ys)]
        if outline:  # the stroke extends half its width beyond the vertices
            box = [box[0] - width / 2, box[1] - width / 2, box[2] + width / 2, box[3] + width / 2]
    return [max(0.0, box[0]), max(0.0, box[1]), min(float(size), box[2]), min(float(size), box[3])]


def _draw_clutter(draw: ImageDraw.ImageDraw, rng: np.random.Generator, size: int, style: SceneStyle) -> None:
    """Things that are not objects: lines, zigzags, open arcs and dots."""
    for _ in range(int(rng.integers(style.clutter[0], style.clutter[1] + 1))):
        color = _object_color(rng, style)
        kind = int(rng.integers(0, 4))
        x, y = rng.uniform(0, size, size=2)
        if kind == 0:
            length, a = rng.uniform(0.1, 0.5) * size, rng.uniform(0, math.pi)
            draw.line([(x, y), (x + length * math.cos(a), y + length * math.sin(a))], fill=color, width=int(rng.integers(1, 3)))
        elif kind == 1:
            pts = [(x + 4 * k, y + (3 if k % 2 else -3)) for k in range(int(rng.integers(3, 7)))]
            draw.line(pts, fill=color, width=1)
        elif kind == 2:
            r = rng.uniform(0.04, 0.1) * size
            start = rng.uniform(0, 360)
            draw.arc([x - r, y - r, x + r, y + r], start, start + rng.uniform(60, 160), fill=color, width=2)
        else:
            r = rng.uniform(1.0, 2.5)
            draw.ellipse([x - r, y - r, x + r, y + r], fill=color)


def render_image(seed: int, scene: str, split: str, index: int, size: int, classes: Sequence[str]) -> tuple[np.ndarray, list[tuple[str, list[float]]]]:
    """One image of a scene and its objects ``[(class name, [x1, y1, x2, y2])]``."""
    style = STYLES[scene]
    rng = _image_rng(seed, scene, split, index)
    canvas = Image.fromarray(np.clip(_background(rng, size, style), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    if style.clutter[1] > 0:
        _draw_clutter(draw, rng, size, style)
    objects: list[tuple[str, list[float]]] = []
    wanted = int(rng.integers(style.objects[0], style.objects[1] + 1))
    for _ in range(wanted):
        name = str(classes[int(rng.integers(0, len(classes)))])
        for _attempt in range(20):  # rejection sampling: shapes overlap little and stay inside
            r = 0.5 * rng.uniform(*style.size_range) * size
            cx, cy = rng.uniform(r + 1, size - r - 1, size=2)
            candidate = [cx - r, cy - r, cx + r, cy + r]
            if all(_box_iou(candidate, b) < 0.1 for _, b in objects):
                break
        else:
            continue
        outline = bool(rng.uniform() < style.outline_fraction)
        box = _draw_object(draw, name, cx, cy, r, rng.uniform(0, 2 * math.pi), _object_color(rng, style), outline, size)
        objects.append((name, box))
    img = np.asarray(canvas, dtype=np.float32)
    if style.textured:  # dim light with a colour cast and a lighting gradient
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
        light = rng.uniform(*style.brightness) * (0.8 + 0.4 * (xx if rng.uniform() < 0.5 else yy))
        cast = rng.uniform(0.75, 1.15, size=3)
        img = img * light[..., None] * cast
    else:
        img = img * rng.uniform(*style.brightness)
    img = img + rng.normal(0.0, style.noise_std, size=img.shape)
    return np.clip(img, 0, 255).astype(np.uint8), objects


def generate_scene(scene: str, n_images: int, seed: int = 0, *, split: str = "train", image_size: int = 128,
                   classes: Sequence[str] | None = None, start_index: int = 0) -> Scene:
    """``n_images`` images of ``scene`` (``general`` or ``transfer``) with COCO annotations.

    ``classes`` (names from :data:`ALL_CLASSES`) are the shapes drawn; default the old classes.
    ``split`` (``train``, ``test`` or ``pool``) selects an independent stream of images, so the
    splits of one seed never share an image. Image ids are ``start_index + i + 1``.
    """
    if scene not in STYLES:
        raise ValueError(f"unknown scene {scene!r}; known: {', '.join(SCENES)}")
    if split not in _SPLIT_CODE:
        raise ValueError(f"unknown split {split!r}; known: {', '.join(_SPLIT_CODE)}")
    classes = list(classes or OLD_CLASSES)
    unknown = [c for c in classes if c not in _CATEGORY_ID]
    if unknown:
        raise ValueError(f"unknown class(es) {unknown}; known: {ALL_CLASSES}")
    if image_size < 32:
        raise ValueError(f"image_size must be >= 32, got {image_size}")
    images: list[np.ndarray] = []
    coco_images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for i in range(start_index, start_index + int(n_images)):
        img, objects = render_image(seed, scene, split, i, image_size, classes)
        image_id = i + 1
        images.append(img)
        coco_images.append({"id": image_id, "file_name": f"{split}_{i:05d}.png", "width": image_size, "height": image_size})
        for name, (x1, y1, x2, y2) in objects:
            w, h = x2 - x1, y2 - y1
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": _CATEGORY_ID[name],
                "bbox": [round(x1, 2), round(y1, 2), round(w, 2), round(h, 2)], "area": round(w * h, 2), "iscrowd": 0,
            })
    used = set(classes)
    coco = {
        "info": {"description": f"synthetic {scene} scene ({split})", "scene": scene, "split": split, "seed": int(seed),
                 "generator": "incremental.detection.scenes"},
        "images": coco_images,
        "annotations": annotations,
        "categories": [dict(c) for c in CATEGORIES if c["name"] in used],
    }
    return Scene(images, coco)


def write_scene(scene: Scene, out_dir: str | Path) -> Path:
    """Write the PNGs (atomically, one by one) and ``instances.json``; returns the JSON path."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    for img, info in zip(scene.images, scene.coco["images"]):
        atomic_write(out / "images" / info["file_name"], lambda p, img=img: Image.fromarray(img).save(p, format="PNG"))
    return write_json(out / "instances.json", scene.coco)


def category_id(name: str) -> int:
    """The fixed COCO id of a generated class."""
    if name not in _CATEGORY_ID:
        raise ValueError(f"unknown class {name!r}; known: {ALL_CLASSES}")
    return _CATEGORY_ID[name]
