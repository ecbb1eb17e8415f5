"""A user's own torchvision Faster R-CNN (MobileNetV3 low-res, weights none), end to end: plain state
dict -> `incremental package` -> `incremental update` with a new class -> `incremental predict` ->
`incremental feedback` reads the predictions."""
from __future__ import annotations

import json

import pytest
import torch
from torchvision.models.detection import fasterrcnn_mobilenet_v3_large_320_fpn

from incremental.cli import main
from incremental.detection.coco import load_coco_detection
from incremental.detection.model import TORCHVISION_DETECTORS, build_torchvision_detector, num_foreground_classes
from incremental.detection.packaging import load_detector
from incremental.detection.scenes import generate_scene, write_scene
from incremental.update import run_update

OLD = ["circle", "square"]
SIZE = 64
#: what the user's training script passed to torchvision's builder (small images, few proposals)
SETTINGS = {"min_size": SIZE, "max_size": SIZE, "rpn_pre_nms_top_n_train": 200, "rpn_post_nms_top_n_train": 50,
            "rpn_pre_nms_top_n_test": 100, "rpn_post_nms_top_n_test": 50, "box_batch_size_per_image": 32,
            "box_detections_per_img": 20}


@pytest.fixture(scope="module")
def user_detector(tmp_path_factory):
    """torchvision's builder as a user calls it, trained a few steps on 2 classes, saved as a state dict."""
    torch.set_num_threads(1)  # module fixtures run before conftest's per-test setting
    root = tmp_path_factory.mktemp("det")
    scene = generate_scene("general", 8, seed=0, image_size=SIZE, classes=OLD)
    write_scene(scene, root / "old")
    data = load_coco_detection(root / "old" / "instances.json", root / "old" / "images", OLD)
    torch.manual_seed(0)
    model = fasterrcnn_mobilenet_v3_large_320_fpn(weights=None, weights_backbone=None, num_classes=len(OLD) + 1,
                                                  **SETTINGS)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    images, targets = data.images(), [{k: t[k] for k in ("boxes", "labels")} for t in data.targets]
    model.train()
    for step in range(3):
        idx = [(2 * step + i) % len(images) for i in range(4)]
        loss = sum(model([images[i] for i in idx], [targets[i] for i in idx]).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    torch.save(model.state_dict(), root / "detector.pth")
    (root / "objects.txt").write_text("\n".join(OLD) + "\n")
    return root, model


def package_args(root, out, classes="objects.txt"):
    return ["package", "--architecture", "torchvision:fasterrcnn_mobilenet_v3_large_320_fpn",
            "--weights", str(root / "detector.pth"), "--classes", str(root / classes), "--out", str(out),
            "--kwargs", json.dumps(SETTINGS), "--quiet"]


def test_torchvision_detector_rebuild_has_torchvision_keys():
    import torchvision.models.detection as tvd

    for name in TORCHVISION_DETECTORS:
        if "resnet" in name:
            continue  # same code path, 160 MB of parameters: covered by the key names of the mobilenet ones
        ref = getattr(tvd, name)(weights=None, weights_backbone=None, num_classes=4).state_dict()
        ours = build_torchvision_detector(name, 3, norm="batch", trainable_backbone_layers=6).state_dict()
        assert list(ref) == list(ours) and all(ref[k].shape == ours[k].shape for k in ref)


def test_package_update_predict_feedback(user_detector, tmp_path, capsys):
    root, user_model = user_detector
    pkg = tmp_path / "detector.pt"
    assert main(package_args(root, pkg)) == 0, capsys.readouterr().err
    model, info = load_detector(pkg)
    assert info["class_names"] == OLD and model.architecture == "torchvision:fasterrcnn_mobilenet_v3_large_320_fpn"
    # the packaged detector is the user's: same boxes on the same image
    image = torch.rand(3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model([image])[0], user_model([image])[0]
    assert torch.equal(ours["labels"], theirs["labels"]) and torch.allclose(ours["boxes"], theirs["boxes"])

    # a new class arrives: images annotated with the new class only
    new_scene = generate_scene("transfer", 6, seed=1, image_size=SIZE, classes=OLD + ["triangle"])
    new_scene.coco["annotations"] = [a for a in new_scene.coco["annotations"] if a["category_id"] == 3]
    new_scene.coco["categories"] = [c for c in new_scene.coco["categories"] if c["name"] == "triangle"]
    write_scene(new_scene, tmp_path / "new")
    report = run_update(str(pkg), str(tmp_path / "new"), tmp_path / "updated",
                        {"epochs": 1, "min_steps": 3, "batch_size": 2, "lr": 0.005, "old_data": str(root / "old")})
    assert report["new_classes"] == ["triangle"] and report["strategy"] == "pseudo_distill"
    assert set(report["plugin"]) == {"pseudo_labels_per_image", "mean_distillation_loss"} and report["steps"] == 3
    assert set(report["before"]) >= {"old_AP", "new_AP"} and report["before"]["on_old_data"] is not None
    assert (tmp_path / "updated" / "report.png").is_file()
    updated, info = load_detector(tmp_path / "updated" / "model.pt")
    assert info["class_names"] == OLD + ["triangle"] and num_foreground_classes(updated) == 3
    # the box predictor grew from (background, circle, square) to 4 outputs with the old 3 unchanged (to float rounding)
    assert report["head"] == {"old_outputs": 3, "outputs": 4, "old_outputs_unchanged_at_growth": True}
    # the package rebuilds the torchvision architecture with the user's settings
    assert updated.transform.min_size == (SIZE,) and updated.roi_heads.detections_per_img == 20

    # predict: COCO results in the model's category ids plus an images skeleton, which feedback reads
    pred = tmp_path / "pred.json"
    assert main(["predict", "--model", str(tmp_path / "updated" / "model.pt"), "--images",
                 str(tmp_path / "new" / "images"), "--out", str(pred), "--quiet"]) == 0
    results = json.loads(pred.read_text())
    skeleton = json.loads((tmp_path / "pred.images.json").read_text())
    assert [c["name"] for c in skeleton["categories"]] == OLD + ["triangle"] and len(skeleton["images"]) == 6
    assert all({"image_id", "category_id", "bbox", "score"} <= set(r) for r in results)
    assert {r["category_id"] for r in results} <= {c["id"] for c in skeleton["categories"]}
    # with --instances the image ids are the COCO file's
    pred_ids = tmp_path / "pred_ids.json"
    assert main(["predict", "--model", str(tmp_path / "updated" / "model.pt"), "--images",
                 str(tmp_path / "new" / "images"), "--instances", str(tmp_path / "new" / "instances.json"),
                 "--out", str(pred_ids), "--quiet"]) == 0
    assert {r["image_id"] for r in json.loads(pred_ids.read_text())} <= {im["id"] for im in new_scene.coco["images"]}
    assert not (tmp_path / "pred_ids.images.json").exists()
    verified = {**skeleton, "annotations": [{"id": 1, "image_id": 1, "category_id": 3, "bbox": [10, 10, 20, 20]}]}
    (tmp_path / "verified.json").write_text(json.dumps(verified))
    assert main(["feedback", "--model", str(tmp_path / "updated" / "model.pt"), "--images",
                 str(tmp_path / "new" / "images"), "--predictions", str(pred), "--verified",
                 str(tmp_path / "verified.json"), "--out", str(tmp_path / "train.json")]) == 0


def test_detector_errors_are_one_line_and_write_nothing(user_detector, tmp_path, capsys):
    root, _ = user_detector
    (root / "three.txt").write_text("circle\nsquare\nstar\n")
    (root / "with_bg.txt").write_text("__background__\ncircle\nsquare\n")
    out = tmp_path / "d.pt"
    for classes, fragment in (("three.txt", "lists 3 classes, the weights' box predictor has 3 outputs (2 classes"),
                              ("with_bg.txt", "list the classes without the background")):
        assert main(package_args(root, out, classes)) == 2
        err = capsys.readouterr().err
        assert fragment in err and err.count("\n") == 1 and not out.exists()
    args = package_args(root, out)
    args[args.index("torchvision:fasterrcnn_mobilenet_v3_large_320_fpn")] = "torchvision:fasterrcnn_resnet50_fpn"
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "does not fit torchvision:fasterrcnn_resnet50_fpn: missing key 'backbone.body.conv1.weight'" in err
    assert not out.exists()


def test_replay_takes_exemplars_from_old_data(user_detector, tmp_path, capsys):
    root, _ = user_detector
    pkg = tmp_path / "detector.pt"
    assert main(package_args(root, pkg)) == 0
    new_scene = generate_scene("transfer", 4, seed=2, image_size=SIZE, classes=["triangle"])
    write_scene(new_scene, tmp_path / "new")
    report = run_update(str(pkg), str(tmp_path / "new"), tmp_path / "u",
                        {"strategy": "replay", "epochs": 1, "min_steps": 2, "batch_size": 2, "old_data": str(root / "old"),
                         "holdout": 0.25})
    # 8 old images: 2 held out to measure the old classes, 6 rehearsed
    assert report["strategy"] == "replay" and report["strategy_note"] is None
    assert report["exemplars"]["source"] == "--old-data" and report["exemplars"]["rehearsed"] == 6
    assert report["n_old_data"] == 2
