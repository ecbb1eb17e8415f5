"""The simulated person: ground truth when error-free, each error kind, determinism."""
from __future__ import annotations

import pytest

from incremental.detection.simulated_user import SimulatedUser


def gt():
    images = [{"id": i, "file_name": f"{i}.png", "width": 64, "height": 64} for i in (1, 2, 3)]
    anns = [{"id": k + 1, "image_id": 1 + k % 3, "category_id": 1 + k % 2, "bbox": [4.0 * k, 4.0, 10.0, 12.0],
             "area": 120.0, "iscrowd": 0} for k in range(9)]
    return {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}


def boxes(coco):
    return sorted((a["image_id"], a["category_id"], tuple(a["bbox"])) for a in coco["annotations"])


def test_error_free_person_returns_the_ground_truth():
    g = gt()
    v = SimulatedUser(error_rate=0.0).verify(g, [{"image_id": 1, "category_id": 1, "bbox": [50, 50, 5, 5], "score": 0.9}])
    assert boxes(v) == boxes(g)
    assert v["info"]["simulated_user"]["errors"] == {"miss": 0, "jitter": 0, "label": 0, "accept_false": 0}
    assert g["annotations"][0]["bbox"] == [0.0, 4.0, 10.0, 12.0]  # the input is untouched


def test_each_error_kind():
    g = gt()
    miss = SimulatedUser(error_rate=1.0, error_kinds=["miss"]).verify(g)
    assert miss["annotations"] == [] and miss["info"]["simulated_user"]["errors"]["miss"] == 9
    by_image = sorted(g["annotations"], key=lambda a: (a["image_id"], a["id"]))  # the output's order
    label = SimulatedUser(error_rate=1.0, error_kinds=["label"]).verify(g)
    assert [a["category_id"] for a in label["annotations"]] == [3 - a["category_id"] for a in by_image]  # 1 <-> 2
    jit = SimulatedUser(error_rate=1.0, error_kinds=["jitter"], jitter=0.25).verify(g)
    for a, b in zip(jit["annotations"], by_image):
        x, y, w, h = a["bbox"]
        assert a["bbox"] != b["bbox"] and w >= 1 and h >= 1 and x >= 0 and y >= 0 and x + w <= 64 and y + h <= 64
        # each side moves by at most 0.25 of the size: |dx1| <= 2.5, |dy1| <= 3
        assert abs(x - b["bbox"][0]) <= 2.5 + 1e-6 and abs(y - b["bbox"][1]) <= 3.0 + 1e-6


def test_accepting_false_predictions():
    g = gt()
    preds = [{"image_id": 1, "category_id": 1, "bbox": [50, 50, 5, 5], "score": 0.9},   # false: confirmed
             {"image_id": 1, "category_id": 1, "bbox": [0, 4, 10, 12], "score": 0.9},   # true: not added twice
             {"image_id": 2, "category_id": 2, "bbox": [50, 50, 5, 5], "score": 0.3}]   # not confident
    v = SimulatedUser(error_rate=1.0, error_kinds=["label"], accept_false=True).verify(g, preds)
    assert v["info"]["simulated_user"]["errors"]["accept_false"] == 1
    assert (1, 1, (50.0, 50.0, 5.0, 5.0)) in boxes(v)


def test_rate_is_respected_and_deterministic_per_image():
    g = gt()
    g["annotations"] = [dict(a, id=k + 1, image_id=1 + k % 3) for k, a in enumerate(g["annotations"] * 40)]
    user = SimulatedUser(error_rate=0.3, error_kinds=["miss"], seed=4)
    v = user.verify(g)
    kept = len(v["annotations"])
    assert 0.2 < 1 - kept / len(g["annotations"]) < 0.4  # 360 objects, 30% missed (+-10 points)
    assert boxes(user.verify(g)) == boxes(v)
    # one image alone gets the same verification as inside the full file
    only3 = dict(g, images=[g["images"][2]], annotations=[a for a in g["annotations"] if a["image_id"] == 3])
    assert boxes(user.verify(only3)) == [b for b in boxes(v) if b[0] == 3]
    assert boxes(SimulatedUser(error_rate=0.3, error_kinds=["miss"], seed=5).verify(g)) != boxes(v)


@pytest.mark.parametrize("kwargs, message", [
    ({"error_rate": 1.5}, "error_rate must be in"),
    ({"error_kinds": ["typo"]}, "error_kinds must be a non-empty subset"),
    ({"jitter": -1.0}, "jitter must be in"),
])
def test_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SimulatedUser(**kwargs).verify(gt())
