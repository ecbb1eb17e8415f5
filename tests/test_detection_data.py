"""Detection scenes (deterministic COCO generator) and the COCO loader with its error cases."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from incremental.detection.coco import (
    CocoFormatError,
    detection_collate,
    load_coco_detection,
    samples_from_coco,
    xywh_to_xyxy_checked,
)
from incremental.detection.scenes import ALL_CLASSES, CATEGORIES, OLD_CLASSES, generate_scene


def test_scene_is_deterministic_and_prefix_stable():
    a = generate_scene("transfer", 3, seed=5, image_size=64)
    b = generate_scene("transfer", 5, seed=5, image_size=64)
    for x, y in zip(a.images, b.images[:3]):
        assert np.array_equal(x, y)
    assert a.coco["annotations"] == b.coco["annotations"][: len(a.coco["annotations"])]
    c = generate_scene("transfer", 3, seed=6, image_size=64)
    assert not np.array_equal(a.images[0], c.images[0])


def test_splits_and_scenes_differ():
    train = generate_scene("general", 2, seed=0, split="train", image_size=64)
    test = generate_scene("general", 2, seed=0, split="test", image_size=64)
    transfer = generate_scene("transfer", 2, seed=0, split="train", image_size=64)
    assert not np.array_equal(train.images[0], test.images[0])
    assert not np.array_equal(train.images[0], transfer.images[0])


def test_domain_shift_is_visible_in_the_statistics():
    # general: smooth light backgrounds; transfer: darker, textured, noisier, smaller objects
    g = generate_scene("general", 20, seed=0, image_size=64)
    t = generate_scene("transfer", 20, seed=0, image_size=64)
    g_mean = np.mean([im.mean() for im in g.images])
    t_mean = np.mean([im.mean() for im in t.images])
    assert g_mean - t_mean > 40
    g_size = np.mean([a["bbox"][2] for a in g.coco["annotations"]])
    t_size = np.mean([a["bbox"][2] for a in t.coco["annotations"]])
    assert t_size < 0.8 * g_size


def test_annotations_are_valid_coco_boxes_inside_the_image():
    s = generate_scene("transfer", 10, seed=1, image_size=64, classes=ALL_CLASSES)
    ids = {im["id"] for im in s.coco["images"]}
    names = {c["id"]: c["name"] for c in s.coco["categories"]}
    assert set(names.values()) == set(ALL_CLASSES)
    for a in s.coco["annotations"]:
        x, y, w, h = a["bbox"]
        assert a["image_id"] in ids and a["category_id"] in names
        assert w > 0 and h > 0 and x >= 0 and y >= 0 and x + w <= 64.01 and y + h <= 64.01
    assert {names[a["category_id"]] for a in s.coco["annotations"]} - set(OLD_CLASSES)  # new classes drawn


def test_box_matches_the_drawn_pixels():
    # one general image: every annotated box must contain pixels that differ from the background,
    # and its border rows/columns just outside must be background-like (the box is tight).
    s = generate_scene("general", 1, seed=3, image_size=128)
    img = s.images[0].astype(float)
    for a in s.coco["annotations"]:
        x, y, w, h = a["bbox"]
        inside = img[int(y) + 1:int(y + h) - 1, int(x) + 1:int(x + w) - 1]
        corner = img[:4, :4].mean(axis=(0, 1))
        assert np.abs(inside - corner).sum(-1).max() > 60  # the object is in the box


def test_write_and_load_round_trip(tmp_path):
    s = generate_scene("general", 3, seed=0, image_size=64)
    path = s.write(tmp_path / "scene")
    data = load_coco_detection(path)
    assert data.class_names == OLD_CLASSES and data.category_ids == [1, 2, 3]
    assert len(data) == 3 and data.skipped == {}
    x, target, t = data.samples.samples[0]
    assert x.dtype == torch.uint8 and tuple(x.shape) == (3, 64, 64)
    assert np.array_equal(x.permute(1, 2, 0).numpy(), s.images[0])
    first = [a for a in s.coco["annotations"] if a["image_id"] == 1]
    bx, by, bw, bh = first[0]["bbox"]
    assert torch.allclose(target["boxes"][0], torch.tensor([bx, by, bx + bw, by + bh], dtype=torch.float32))
    assert target["labels"][0].item() == first[0]["category_id"]
    lazy = load_coco_detection(path, lazy=True)
    assert isinstance(lazy.samples.samples[0][0], str)
    batch = lazy.samples.batch(torch.tensor([0, 2]))
    assert batch[0][0].dtype == torch.float32 and float(batch[0][0].max()) <= 1.0
    assert torch.equal(batch[0][0], detection_collate([data.samples.samples[0]])[0][0])


def coco_file(tmp_path, annotations, categories=None, images=None):
    s = generate_scene("general", 2, seed=0, image_size=64)
    s.write(tmp_path)
    coco = {"images": images or s.coco["images"], "annotations": annotations,
            "categories": categories or [dict(c) for c in CATEGORIES[:3]]}
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(coco))
    return path


def ann(i, image_id=1, cat=1, bbox=(5, 5, 10, 10), **kw):
    return {"id": i, "image_id": image_id, "category_id": cat, "bbox": list(bbox), **kw}


@pytest.mark.parametrize("annotation, message", [
    (ann(7, image_id=99), "annotation id 7: image_id 99 is not in 'images'"),
    (ann(7, cat=42), "annotation id 7: category_id 42 is not in 'categories'"),
    (ann(7, bbox=(5, 5, 0, 10)), "zero or negative width"),
    (ann(7, bbox=(70, 5, 10, 10)), "lies outside the 64x64 image"),
    (ann(7, bbox=(5, 5, 10)), "bbox must be 4 numbers"),
])
def test_malformed_annotations_are_clear_errors(tmp_path, annotation, message):
    path = coco_file(tmp_path, [annotation])
    with pytest.raises(CocoFormatError, match=message) as err:
        load_coco_detection(path, tmp_path / "images")
    assert str(path) in str(err.value)


def test_crowd_and_clipped_boxes_are_counted_not_silent(tmp_path):
    path = coco_file(tmp_path, [ann(1, iscrowd=1), ann(2, bbox=(60, 60, 5.5, 5.5)), ann(3)])
    data = load_coco_detection(path, tmp_path / "images")
    assert data.skipped == {"crowd_annotations": 1, "clipped_boxes": 1}
    boxes = data.samples.samples[0][1]["boxes"]
    assert boxes.tolist() == [[60.0, 60.0, 64.0, 64.0], [5.0, 5.0, 15.0, 15.0]]


def test_unknown_category_of_the_model_error_or_skip(tmp_path):
    cats = [dict(c) for c in CATEGORIES]
    path = coco_file(tmp_path, [ann(1, cat=4), ann(2, cat=2)], categories=cats)
    with pytest.raises(CocoFormatError, match="category 'star' \\(id 4\\) is not one of the model's classes"):
        load_coco_detection(path, tmp_path / "images", class_names=OLD_CLASSES)
    data = load_coco_detection(path, tmp_path / "images", class_names=["square", "circle"], unknown_categories="skip")
    assert data.skipped == {"unknown_category_annotations": 1}
    assert data.samples.samples[0][1]["labels"].tolist() == [1]  # square is label 1 of the given names
    assert data.category_ids == [2, 1]


def test_missing_image_file_and_bad_json(tmp_path):
    path = coco_file(tmp_path, [], images=[{"id": 1, "file_name": "nope.png", "width": 64, "height": 64}])
    with pytest.raises(FileNotFoundError, match="nope.png"):
        load_coco_detection(path, tmp_path / "images")
    bad = tmp_path / "broken.json"
    bad.write_text("{not json")
    with pytest.raises(CocoFormatError, match="not valid JSON"):
        load_coco_detection(bad)


def test_images_without_annotations_are_background_samples():
    s = generate_scene("general", 2, seed=0, image_size=64)
    coco = dict(s.coco, annotations=[])
    data = samples_from_coco(coco, {im["id"]: a for im, a in zip(coco["images"], s.images)})
    target = data.samples.samples[0][1]
    assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)
    assert data.samples.labels.tolist() == [0, 0]


def test_clipping_rule_by_hand():
    # [x, y, w, h] = [-1, 2, 10, 70] in a 64x64 image: x1=-1 (within 2 px) -> 0, y2=72 is 8 px out -> error
    with pytest.raises(CocoFormatError, match="outside"):
        xywh_to_xyxy_checked([-1, 2, 10, 70], 64, 64, "here")
    counts: dict[str, int] = {}
    # [x, y, w, h] = [-1, 2, 10, 63]: x1 -1 -> 0, y2 = 65 -> 64 (1 px out): clipped box [0, 2, 9, 64]
    assert xywh_to_xyxy_checked([-1, 2, 10, 63], 64, 64, "here", counts) == [0.0, 2.0, 9.0, 64.0]
    assert counts == {"clipped_boxes": 1}
