"""Feedback step A (METHODS 2): matching, categories, training annotations, errors, the CLI."""
from __future__ import annotations

import json

import pytest
import torch

from incremental.cli import main
from incremental.detection.coco import CocoFormatError
from incremental.detection.feedback import (
    FeedbackThresholds,
    build_training_set,
    categorize,
    correct_image_annotation,
    match_boxes,
)

B = lambda rows: torch.tensor(rows, dtype=torch.float32).reshape(-1, 4)  # noqa: E731
L = lambda rows: torch.tensor(rows, dtype=torch.long)  # noqa: E731


def test_matching_maximises_the_number_of_matches():
    # user1 [0,0,10,10], user2 [2,0,12,10]; prediction A [0.5,0,10.5,10] (score order first),
    # prediction B [-1,0,9,10].
    # IoU(A,u1) = 95/105 = .905, IoU(A,u2) = 85/115 = .739, IoU(B,u1) = 90/110 = .818,
    # IoU(B,u2) = 70/130 = .538 (< .6, not admissible). A greedy pass by score gives u1 to A and leaves
    # B and u2 unmatched; the assignment A-u2, B-u1 matches everything.
    pm, um = match_boxes(B([[0.5, 0, 10.5, 10], [-1, 0, 9, 10]]), L([1, 1]),
                         B([[0, 0, 10, 10], [2, 0, 12, 10]]), L([1, 1]), 0.6)
    assert pm.tolist() == [True, True] and um.tolist() == [True, True]


def test_matching_needs_same_class_and_iou():
    # same box but another class: no match; IoU 0.45 < 0.5: no match
    pm, um = match_boxes(B([[0, 0, 10, 10], [0, 0, 10, 4.5]]), L([2, 1]), B([[0, 0, 10, 10]]), L([1]), 0.5)
    assert pm.tolist() == [False, False] and um.tolist() == [False]
    pm, um = match_boxes(B([]), L([]), B([[0, 0, 1, 1]]), L([1]), 0.5)
    assert pm.tolist() == [] and um.tolist() == [False]


@pytest.mark.parametrize("pm, um, expected", [
    ([True], [True], "correct"),
    ([], [], "correct"),  # nothing there, nothing predicted
    ([True], [True, False], "missed"),
    ([False], [True], "false_detection"),
    ([False], [False], "false_detection"),  # a false box and a miss: the false box wins
])
def test_categories(pm, um, expected):
    assert categorize(torch.tensor(pm, dtype=torch.bool), torch.tensor(um, dtype=torch.bool)) == expected


def test_correct_image_annotation_by_hand():
    # person's box u1 = [10,10,30,30] class 1, u2 = [50,50,60,60] class 2; confidence 0.5, IoU > 0.5.
    # c1 [10,10,30,28] s.45 cls1: IoU 360/400 = .9, below threshold   -> candidate
    # c2 [10,10,30,30] s.70 cls1: above the confidence threshold      -> excluded
    # c3 [11,11,31,31] s.48 cls2: other class                          -> excluded
    # c4 [20,20,40,40] s.49 cls1: IoU 100/700 = .14                    -> excluded
    # c5 [12,10,30,30] s.30 cls1: IoU 360/400 = .9 but lower score than c1
    # u1 -> c1 (the model's box); u2 has no candidate -> the person's box.
    boxes, labels, from_model = correct_image_annotation(
        B([[10, 10, 30, 30], [50, 50, 60, 60]]), L([1, 2]),
        B([[10, 10, 30, 28], [10, 10, 30, 30], [11, 11, 31, 31], [20, 20, 40, 40], [12, 10, 30, 30]]),
        torch.tensor([0.45, 0.70, 0.48, 0.49, 0.30]), L([1, 1, 2, 1, 1]), confidence=0.5, candidate_iou=0.5)
    assert boxes.tolist() == [[10, 10, 30, 28], [50, 50, 60, 60]]
    assert labels.tolist() == [1, 2] and from_model.tolist() == [True, False]


def verified_file():
    cats = [{"id": 10, "name": "circle"}, {"id": 20, "name": "square"}]
    images = [{"id": i, "file_name": f"{i}.png", "width": 64, "height": 64} for i in (1, 2, 3, 4)]
    anns = [
        {"id": 1, "image_id": 1, "category_id": 10, "bbox": [10, 10, 20, 20]},   # image 1: predicted well
        {"id": 2, "image_id": 2, "category_id": 20, "bbox": [30, 30, 10, 10]},   # image 2: not predicted
        {"id": 3, "image_id": 3, "category_id": 10, "bbox": [5, 5, 10, 10]},     # image 3: + a false box
        {"id": 4, "image_id": 4, "category_id": 10, "bbox": [62, 0, 4, 10]},     # image 4: 2 px past the border
    ]
    return {"images": images, "annotations": anns, "categories": cats}


# the model's classes: circle (category id 1), square (2)
PREDICTIONS = [
    {"image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 19], "score": 0.9},
    {"image_id": 1, "category_id": 2, "bbox": [40, 40, 5, 5], "score": 0.2},    # below threshold: ignored
    {"image_id": 3, "category_id": 1, "bbox": [5, 5, 10, 10], "score": 0.8},
    {"image_id": 3, "category_id": 2, "bbox": [40, 40, 10, 10], "score": 0.7},  # nothing there: false
    {"image_id": 4, "category_id": 1, "bbox": [62, 0, 2, 10], "score": 0.6},
    {"image_id": 99, "category_id": 1, "bbox": [0, 0, 5, 5], "score": 0.9},     # not verified: skipped
]


def fake_candidates(image_id):
    # image 1: the model's below-threshold box [10,10,30,29.5] (IoU 390/400 with the person's) at .4
    # image 4: nothing below threshold -> the person's box is the fallback
    if image_id == 1:
        return B([[10, 10, 30, 29.5]]), torch.tensor([0.4]), L([1])
    return B([]), torch.zeros(0), L([])


def test_build_training_set_end_to_end_by_hand():
    out = build_training_set(verified_file(), PREDICTIONS, ["circle", "square"], fake_candidates)
    fb = out["feedback"]
    assert [p["category"] for p in fb["per_image"]] == ["correct", "missed", "false_detection", "correct"]
    c = fb["counts"]
    assert (c["correct"], c["missed"], c["false_detection"], c["images"]) == (2, 1, 1, 4)
    assert c["skipped_predictions_unverified_image"] == 1
    assert c["clipped_boxes"] == 1  # the person's box on image 4 ([62, 64] clipped at 64)
    assert c["annotations_model_box"] == 1 and c["annotations_user_box"] == 3 and c["user_box_fallback"] == 1
    anns = {a["image_id"]: a for a in out["annotations"]}
    assert anns[1]["bbox"] == [10.0, 10.0, 20.0, 19.5] and anns[1]["source"] == "model_below_threshold"
    assert anns[2]["bbox"] == [30.0, 30.0, 10.0, 10.0] and anns[2]["category_id"] == 2  # square, model id 2
    assert [a["image_id"] for a in out["annotations"]].count(3) == 1  # only the person's box: the false one is background
    assert anns[4]["bbox"] == [62.0, 0.0, 2.0, 10.0] and anns[4]["source"] == "user"
    assert out["categories"] == [{"id": 1, "name": "circle"}, {"id": 2, "name": "square"}]


def test_user_box_rule_ablation():
    out = build_training_set(verified_file(), PREDICTIONS, ["circle", "square"], None, correct_rule="user_box")
    assert {a["source"] for a in out["annotations"]} == {"user"}
    with pytest.raises(ValueError, match="correct: its annotation needs the model"):
        build_training_set(verified_file(), PREDICTIONS, ["circle", "square"], None)


def test_thresholds_are_configurable():
    # at confidence 0.95 no prediction is confident: images with a person's box are all "missed"
    out = build_training_set(verified_file(), PREDICTIONS, ["circle", "square"], fake_candidates,
                             FeedbackThresholds(confidence=0.95))
    assert out["feedback"]["counts"]["missed"] == 4
    with pytest.raises(ValueError, match="confidence must be in"):
        build_training_set(verified_file(), PREDICTIONS, ["circle"], None, FeedbackThresholds(confidence=0.0))


def test_unknown_categories_error_skip_keep():
    v = verified_file()
    v["categories"].append({"id": 30, "name": "star"})
    v["annotations"].append({"id": 5, "image_id": 2, "category_id": 30, "bbox": [1, 1, 5, 5]})
    with pytest.raises(CocoFormatError, match="category 'star' \\(id 30\\) is not one of the model's classes"):
        build_training_set(v, PREDICTIONS, ["circle", "square"], fake_candidates)
    skip = build_training_set(v, PREDICTIONS, ["circle", "square"], fake_candidates, unknown_categories="skip")
    assert skip["feedback"]["counts"]["skipped_user_boxes_unknown_category"] == 1
    keep = build_training_set(v, PREDICTIONS, ["circle", "square"], fake_candidates, unknown_categories="keep")
    assert keep["categories"][-1] == {"id": 3, "name": "star"} and keep["feedback"]["new_classes"] == ["star"]
    assert any(a["category_id"] == 3 for a in keep["annotations"])


@pytest.mark.parametrize("mutate, message", [
    (lambda v, p: v["annotations"].append({"id": 9, "image_id": 77, "category_id": 10, "bbox": [0, 0, 1, 1]}),
     "annotation id 9: image_id 77 is not in 'images'"),
    (lambda v, p: v["annotations"].append({"id": 9, "image_id": 1, "category_id": 10, "bbox": [70, 70, 5, 5]}),
     "annotation id 9: bbox .* lies outside the 64x64 image"),
    (lambda v, p: p.append({"image_id": 1, "category_id": 7, "bbox": [0, 0, 1, 1], "score": 0.9}),
     "category_id 7 is not one of the model's categories"),
    (lambda v, p: p.append({"image_id": 1, "bbox": [0, 0, 1, 1]}), "needs image_id, category_id, bbox and score"),
])
def test_bad_input_is_a_clear_error(mutate, message):
    v, p = verified_file(), list(PREDICTIONS)
    mutate(v, p)
    with pytest.raises(CocoFormatError, match=message):
        build_training_set(v, p, ["circle", "square"], fake_candidates)


# ----------------------------------------------------------------------------- the CLI
@pytest.fixture(scope="module")
def feedback_files(tmp_path_factory):
    """A tiny detector package, 3 generated transfer images, its predictions and a verification."""
    from incremental.detection.feedback import predictions_to_results
    from incremental.detection.model import build_detector, predict
    from incremental.detection.packaging import save_detector
    from incremental.detection.scenes import generate_scene

    root = tmp_path_factory.mktemp("fb")
    scene = generate_scene("transfer", 3, seed=0, image_size=64)
    scene.write(root / "scene")
    torch.manual_seed(0)
    model = build_detector(num_classes=3, image_size=64, box_score_thresh=0.0)
    save_detector(root / "model.pt", model, ["circle", "square", "triangle"], [1, 2, 3])
    images = [torch.from_numpy(im).permute(2, 0, 1).float() / 255 for im in scene.images]
    preds = predict(model, images)
    results = predictions_to_results(preds, [1, 2, 3], [1, 2, 3])
    (root / "pred.json").write_text(json.dumps(results))
    (root / "user.json").write_text(json.dumps(scene.coco))
    return root


def cli(root, *extra, out="train.json"):
    return main(["feedback", "--model", str(root / "model.pt"), "--images", str(root / "scene" / "images"),
                 "--predictions", str(root / "pred.json"), "--verified", str(root / "user.json"),
                 "--out", str(root / out), *extra])


def test_cli_writes_training_file_and_counts(feedback_files, capsys):
    root = feedback_files
    # scores of an untrained head are ~1/4; confidence 0.2 makes some of them predictions
    assert cli(root, "--confidence", "0.2", "--force") == 0
    printed = capsys.readouterr().out
    out = json.loads((root / "train.json").read_text())
    counts = json.loads((root / "train.counts.json").read_text())
    assert counts == out["feedback"]["counts"] and counts["images"] == 3
    assert sum(counts[c] for c in ("correct", "missed", "false_detection")) == 3
    assert "false_detection" in printed and "wrote" in printed
    assert out["feedback"]["thresholds"]["confidence"] == 0.2
    assert len(out["images"]) == 3


def test_cli_bad_input_exits_2(feedback_files, capsys, tmp_path):
    root = feedback_files
    user = json.loads((root / "user.json").read_text())
    user["annotations"].append({"id": 999, "image_id": 12345, "category_id": 1, "bbox": [1, 1, 2, 2]})
    bad = tmp_path / "user_bad.json"
    bad.write_text(json.dumps(user))
    code = main(["feedback", "--model", str(root / "model.pt"), "--images", str(root / "scene" / "images"),
                 "--predictions", str(root / "pred.json"), "--verified", str(bad), "--out", str(tmp_path / "t.json")])
    assert code == 2
    assert "annotation id 999: image_id 12345 is not in 'images'" in capsys.readouterr().err
    # existing output without --force, missing model package, images directory missing
    (tmp_path / "exists.json").write_text("{}")
    assert main(["feedback", "--model", str(root / "model.pt"), "--images", str(root / "scene" / "images"),
                 "--predictions", str(root / "pred.json"), "--verified", str(root / "user.json"),
                 "--out", str(tmp_path / "exists.json")]) == 2
    assert main(["feedback", "--model", str(tmp_path / "none.pt"), "--images", str(root / "scene" / "images"),
                 "--predictions", str(root / "pred.json"), "--verified", str(root / "user.json"),
                 "--out", str(tmp_path / "x.json")]) == 2
    assert main(["feedback", "--model", str(root / "model.pt"), "--images", str(tmp_path / "nodir"),
                 "--predictions", str(root / "pred.json"), "--verified", str(root / "user.json"),
                 "--out", str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err
    assert "exists; use --force" in err and "none.pt" in err and "nodir" in err
