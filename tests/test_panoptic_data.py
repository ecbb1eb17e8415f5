"""Generated panoptic shapes, the COCO panoptic loader (hand-written files, malformed files), scenarios."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from incremental.panoptic.coco import PanopticFormatError, class_mapping, collate_panoptic, decode_ids, load_coco_panoptic, to_samples
from incremental.panoptic.scenario import shapes_scenario
from incremental.panoptic.shapes import CATEGORIES, SplitSpec, generate_split


def write_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array.astype(np.uint8)).save(path)


def hand_written(root: Path, segment_ids: list[list[int]], segments: list[dict], categories: list[dict] | None = None) -> Path:
    """A 2x3 COCO panoptic file written by hand: ids encoded as R + 256 G + 256^2 B."""
    ids = np.array(segment_ids)
    rgb = np.stack([ids % 256, ids // 256 % 256, ids // 65536], -1)
    write_png(root / "panoptic" / "0.png", rgb)
    write_png(root / "images" / "img0.png", np.full((*ids.shape, 3), 128))
    data = {
        "images": [{"id": 7, "file_name": "img0.png", "width": ids.shape[1], "height": ids.shape[0]}],
        "annotations": [{"image_id": 7, "file_name": "0.png", "segments_info": segments}],
        "categories": categories or [{"id": 1, "name": "cat", "isthing": 1}, {"id": 5, "name": "grass", "isthing": 0}],
    }
    path = root / "panoptic.json"
    path.write_text(json.dumps(data))
    return path


def test_hand_written_file_loads_into_targets(tmp_path):
    # segment 300 = RGB (44, 1, 0) checks the 256-base decoding; 0 is void
    path = hand_written(tmp_path, [[300, 300, 2], [0, 2, 2]],
                        [{"id": 300, "category_id": 1, "iscrowd": 0}, {"id": 2, "category_id": 5, "iscrowd": 0}])
    data = load_coco_panoptic(path)
    assert data.images[0].segment_map.tolist() == [[300, 300, 2], [0, 2, 2]]
    samples = to_samples(data, class_mapping(data, ["grass", "cat"]))  # grass -> class 0, cat -> class 1
    x, y, t = samples[0]
    assert x.shape == (3, 2, 3) and x.max() <= 1.0 and t == 0
    assert y["labels"].tolist() == [1, 0]
    assert y["masks"][0].tolist() == [[True, True, False], [False, False, False]]
    assert y["masks"][1].tolist() == [[False, False, True], [False, True, True]]
    # keeping only "cat" leaves the grass pixels void
    only_cat = to_samples(data, {1: 0})[0][1]
    assert only_cat["labels"].tolist() == [0] and only_cat["masks"].shape == (1, 2, 3)
    images, targets, tasks = collate_panoptic([samples[0], samples[0]])
    assert images.shape == (2, 3, 2, 3) and len(targets) == 2 and tasks.tolist() == [0, 0]


def test_decode_ids():
    assert decode_ids(np.array([[[1, 2, 3]]], dtype=np.uint8)).item() == 1 + 2 * 256 + 3 * 65536


def test_segment_in_png_but_not_in_json_is_a_clear_error(tmp_path):
    path = hand_written(tmp_path, [[1, 1, 9], [1, 1, 1]], [{"id": 1, "category_id": 1, "iscrowd": 0}])
    with pytest.raises(PanopticFormatError, match=r"0\.png: segment id 9 .* is not in segments_info of image 0\.png"):
        load_coco_panoptic(path)


def test_unknown_category_is_a_clear_error(tmp_path):
    path = hand_written(tmp_path, [[1, 1, 1], [1, 1, 1]], [{"id": 1, "category_id": 42, "iscrowd": 0}])
    with pytest.raises(PanopticFormatError, match=r"panoptic\.json: image 0\.png segment 1 has category_id 42"):
        load_coco_panoptic(path)


def test_missing_files_and_fields_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_coco_panoptic(tmp_path / "nope.json")
    path = hand_written(tmp_path, [[1, 1, 1], [1, 1, 1]], [{"id": 1, "category_id": 1}])
    (tmp_path / "images" / "img0.png").unlink()
    with pytest.raises(FileNotFoundError, match="img0.png"):
        load_coco_panoptic(path)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"images": [], "categories": []}))
    with pytest.raises(PanopticFormatError, match="missing field 'annotations'"):
        load_coco_panoptic(bad)


def test_generator_is_deterministic_and_coco_consistent(tmp_path):
    spec = SplitSpec(6, required=["circle", "square", "triangle", "cross", "ring"], n_required=(2, 4), image_size=64)
    a = generate_split(tmp_path / "a", "test", spec, seed=3)
    b = generate_split(tmp_path / "b", "test", spec, seed=3)
    c = generate_split(tmp_path / "c", "test", spec, seed=4)
    assert a.read_bytes() == b.read_bytes()
    for name in ("images/000003.png", "panoptic/000003.png"):
        assert (a.parent / name).read_bytes() == (b.parent / name).read_bytes()
    assert (a.parent / "images/000003.png").read_bytes() != (c.parent / "images/000003.png").read_bytes()
    meta = json.loads(a.read_text())
    assert sum(c["isthing"] for c in meta["categories"]) >= 5 and sum(1 - c["isthing"] for c in meta["categories"]) >= 2
    data = load_coco_panoptic(a)  # the loader's checks pass: every PNG id is listed
    for item, ann in zip(data.images, meta["annotations"]):
        assert item.segment_map.shape == (64, 64)
        for seg in ann["segments_info"]:  # listed areas are the PNG's pixel counts
            assert int((item.segment_map == seg["id"]).sum()) == seg["area"]
        assert (item.segment_map > 0).all()  # every pixel is a thing or stuff
    # a second call with the same parameters reuses the files
    mtime = a.stat().st_mtime_ns
    generate_split(tmp_path / "a", "test", spec, seed=3)
    assert a.stat().st_mtime_ns == mtime


def test_generator_rejects_unknown_classes(tmp_path):
    with pytest.raises(ValueError, match="unknown class 'hexagon'"):
        generate_split(tmp_path, "x", SplitSpec(1, required=["hexagon"]), seed=0)


def test_incremental_steps_annotate_only_new_classes(tmp_path):
    steps = [["circle", "square", "triangle", "sky", "ground"], ["cross", "ring"]]
    sc = shapes_scenario(tmp_path, steps, train_images=[6, 12], test_images=4, image_size=64, seed=0)
    assert sc.class_names == [*steps[0], *steps[1]]
    assert sc.thing_classes == [0, 1, 2, 5, 6] and sc.stuff_classes == [3, 4]
    step1 = [s[1]["labels"] for s in sc.train_stream[1].dataset.samples]
    assert all(set(l.tolist()) <= {5, 6} for l in step1) and any(len(l) for l in step1)
    # ... although old-class objects and stuff are in those images (full annotations in the JSON)
    full = json.loads((tmp_path / "train_step1" / "panoptic.json").read_text())
    old_ids = {c["id"] for c in CATEGORIES if c["name"] in steps[0]}
    assert any(s["category_id"] in old_ids for a in full["annotations"] for s in a["segments_info"])
    # joint step 1: all images so far, every class annotated
    joint = sc.joint_stream[1].dataset
    assert len(joint) == 18 and {c for s in joint.samples for c in s[1]["labels"].tolist()} >= {0, 3, 5}
    test_labels = {c for s in sc.test.samples for c in s[1]["labels"].tolist()}
    assert {3, 4} <= test_labels
    step0 = {c for s in sc.train_stream[0].dataset.samples for c in s[1]["labels"].tolist()}
    assert step0 <= {0, 1, 2, 3, 4}
