"""A small torchvision Faster R-CNN that trains on the CPU in minutes, built without downloaded weights.

torchvision's detection models do the hard parts (anchors, RPN, RoIAlign, box coding, per-class NMS,
the background class in the box head); what is ours is only the size: a six-layer convolutional
backbone of stride 8, 16 channels wide at the first stage, with GroupNorm (BatchNorm statistics are
unreliable with a handful of small images per step), one feature map, small anchors, and the RPN /
RoI sampling cut to what 64-160 pixel images need. A training step on 8 images of 128x128 on the
2-core development machine, one thread: 1.9 s with torchvision's default sampling (2000 proposals,
512 RoIs per image; measured by the lead), 0.50 s with the sampling below and width 32, 0.22 s with
width 16 (the default).

The box predictor can grow (``grow_to``): the loop's ``model_adaptation`` calls it when labels of new
classes arrive, keeping the old rows, like :class:`incremental.models.GrowingClassifier`.

:func:`build_torchvision_detector` builds torchvision's own Faster R-CNN architectures
(``fasterrcnn_resnet50_fpn`` and the two MobileNetV3 variants) with the same growing box predictor, so a
detector a user fine-tuned with torchvision loads its state dict unchanged and is updated like ours.
"""
from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch
from torch import nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import TwoMLPHead
from torchvision.ops import MultiScaleRoIAlign

#: Architecture name stored in model packages.
ARCHITECTURE = "fasterrcnn_tiny"

#: Defaults of :func:`build_detector` (also the keys a package may store).
DEFAULTS: dict[str, Any] = {
    "num_classes": 3,  # foreground classes; the box head has num_classes + 1 outputs (0 = background)
    "image_size": 128,
    "width": 16,
    "representation_size": 256,
    "anchor_sizes": [8, 16, 32, 64],
    "aspect_ratios": [0.5, 1.0, 2.0],
    "rpn_pre_nms_top_n_train": 300,
    "rpn_post_nms_top_n_train": 100,
    "rpn_pre_nms_top_n_test": 300,
    "rpn_post_nms_top_n_test": 100,
    "rpn_batch_size_per_image": 128,
    "box_batch_size_per_image": 64,
    "box_score_thresh": 0.05,
    "box_nms_thresh": 0.5,
    "box_detections_per_img": 50,
}


def _conv(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
        nn.GroupNorm(min(8, cout), cout),
        nn.ReLU(inplace=True),
    )


class TinyBackbone(nn.Module):
    """Stride-8 convolutional feature extractor: 3 downsampling stages plus a refining stage.

    A 128x128 image gives a 16x16 map of ``4 * width`` channels: one cell per 8 pixels, fine enough
    for objects of 8-48 pixels with anchors of 8-64.
    """

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        w = int(width)
        self.body = nn.Sequential(
            _conv(3, w, 2), _conv(w, w, 1),
            _conv(w, 2 * w, 2), _conv(2 * w, 2 * w, 1),
            _conv(2 * w, 4 * w, 2), _conv(4 * w, 4 * w, 1),
        )
        self.out_channels = 4 * w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class GrowingBoxPredictor(nn.Module):
    """Faster R-CNN's box predictor (class scores with background at index 0, per-class box deltas)
    that can grow to more classes keeping the trained rows of the old ones."""

    def __init__(self, in_features: int, num_outputs: int) -> None:
        super().__init__()
        self.cls_score = nn.Linear(in_features, num_outputs)
        self.bbox_pred = nn.Linear(in_features, num_outputs * 4)

    @property
    def num_outputs(self) -> int:
        """Number of class outputs, background included."""
        return self.cls_score.out_features

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.flatten(start_dim=1)
        return self.cls_score(x), self.bbox_pred(x)

    @torch.no_grad()
    def grow_to(self, num_outputs: int) -> None:
        """Grow to ``num_outputs`` class outputs (background included); never shrinks."""
        old = self.num_outputs
        if num_outputs <= old:
            return
        cls = nn.Linear(self.cls_score.in_features, num_outputs).to(self.cls_score.weight)
        box = nn.Linear(self.bbox_pred.in_features, num_outputs * 4).to(self.bbox_pred.weight)
        cls.weight[:old] = self.cls_score.weight
        cls.bias[:old] = self.cls_score.bias
        box.weight[: old * 4] = self.bbox_pred.weight
        box.bias[: old * 4] = self.bbox_pred.bias
        self.cls_score, self.bbox_pred = cls, box


def build_detector(**kwargs: Any) -> FasterRCNN:
    """Faster R-CNN with :class:`TinyBackbone`; keys and defaults in :data:`DEFAULTS`.

    ``num_classes`` counts foreground classes (labels 1..num_classes; 0 is background). Nothing is
    downloaded: the backbone is ours and randomly initialised. The kwargs the model was built with
    are kept on ``model.detector_kwargs`` for model packages.
    """
    unknown = set(kwargs) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"build_detector: unknown argument(s) {sorted(unknown)}; known: {sorted(DEFAULTS)}")
    cfg = {**DEFAULTS, **kwargs}
    if int(cfg["num_classes"]) < 1:
        raise ValueError(f"build_detector: num_classes must be >= 1, got {cfg['num_classes']}")
    backbone = TinyBackbone(cfg["width"])
    anchors = AnchorGenerator(sizes=(tuple(int(s) for s in cfg["anchor_sizes"]),),
                              aspect_ratios=(tuple(float(a) for a in cfg["aspect_ratios"]),))
    roi_pool = MultiScaleRoIAlign(featmap_names=["0"], output_size=7, sampling_ratio=2)
    rep = int(cfg["representation_size"])
    size = int(cfg["image_size"])
    model = FasterRCNN(
        backbone,
        num_classes=None,
        min_size=size,
        max_size=size,
        rpn_anchor_generator=anchors,
        box_roi_pool=roi_pool,
        box_head=TwoMLPHead(backbone.out_channels * 7 * 7, rep),
        box_predictor=GrowingBoxPredictor(rep, int(cfg["num_classes"]) + 1),
        rpn_pre_nms_top_n_train=cfg["rpn_pre_nms_top_n_train"],
        rpn_post_nms_top_n_train=cfg["rpn_post_nms_top_n_train"],
        rpn_pre_nms_top_n_test=cfg["rpn_pre_nms_top_n_test"],
        rpn_post_nms_top_n_test=cfg["rpn_post_nms_top_n_test"],
        rpn_batch_size_per_image=cfg["rpn_batch_size_per_image"],
        box_batch_size_per_image=cfg["box_batch_size_per_image"],
        box_score_thresh=cfg["box_score_thresh"],
        box_nms_thresh=cfg["box_nms_thresh"],
        box_detections_per_img=cfg["box_detections_per_img"],
    )
    model.detector_kwargs = dict(cfg)  # type: ignore[attr-defined]
    return model


def num_foreground_classes(model: nn.Module) -> int:
    """Foreground classes the box head predicts now (it may have grown since it was built)."""
    return int(model.roi_heads.box_predictor.cls_score.out_features) - 1


def detector_kwargs(model: nn.Module) -> dict[str, Any]:
    """The kwargs that rebuild ``model``'s architecture, with ``num_classes`` as the head is now."""
    kwargs = dict(getattr(model, "detector_kwargs", DEFAULTS))
    kwargs["num_classes"] = num_foreground_classes(model)
    return kwargs


def frozen_copy(model: nn.Module) -> nn.Module:
    """A deep copy in eval mode with gradients off (the 'historical model' of METHODS 3)."""
    old = copy.deepcopy(model).eval()
    for p in old.parameters():
        p.requires_grad_(False)
    return old


@contextmanager
def all_candidate_boxes(model: nn.Module, min_score: float = 0.001, max_per_image: int = 1000) -> Iterator[nn.Module]:
    """Temporarily make the detector return every per-class box above ``min_score`` with no NMS.

    Feedback step A needs the model's boxes *below* the confidence threshold that overlap a person's
    box; with the usual NMS those would be suppressed by the confident box they overlap, so NMS is
    switched off (an IoU threshold of 1.0 suppresses nothing) while this context is open.
    """
    heads = model.roi_heads
    saved = (heads.score_thresh, heads.nms_thresh, heads.detections_per_img)
    heads.score_thresh, heads.nms_thresh, heads.detections_per_img = float(min_score), 1.0, int(max_per_image)
    try:
        yield model
    finally:
        heads.score_thresh, heads.nms_thresh, heads.detections_per_img = saved


@torch.no_grad()
def predict(model: nn.Module, images: Sequence[torch.Tensor], batch_size: int = 16) -> list[dict[str, torch.Tensor]]:
    """Predictions (``boxes`` xyxy, ``scores``, ``labels``) for float images in [0, 1], in eval mode."""
    was_training = model.training
    model.eval()
    out: list[dict[str, torch.Tensor]] = []
    try:
        device = next(model.parameters()).device
        for start in range(0, len(images), batch_size):
            chunk = [img.to(device) for img in images[start : start + batch_size]]
            out.extend({k: v.cpu() for k, v in p.items()} for p in model(chunk))
    finally:
        model.train(was_training)
    return out


@dataclass(frozen=True)
class TorchvisionDetectorSpec:
    """How torchvision's builder of that name assembles the model (its backbone and its defaults)."""

    backbone: str  # "resnet50" (FPN on layers 1-4) or "mobilenet_v3_large" (FPN on the last two stages)
    max_trainable: int  # backbone stages torchvision counts for ``trainable_backbone_layers``
    defaults: dict[str, Any] = field(default_factory=dict)


#: torchvision's Faster R-CNN builders this project rebuilds (weights are never downloaded).
TORCHVISION_DETECTORS: dict[str, TorchvisionDetectorSpec] = {
    "fasterrcnn_resnet50_fpn": TorchvisionDetectorSpec("resnet50", 5),
    "fasterrcnn_mobilenet_v3_large_fpn": TorchvisionDetectorSpec("mobilenet_v3_large", 6, {"rpn_score_thresh": 0.05}),
    "fasterrcnn_mobilenet_v3_large_320_fpn": TorchvisionDetectorSpec("mobilenet_v3_large", 6, {
        "min_size": 320, "max_size": 640, "rpn_pre_nms_top_n_test": 150, "rpn_post_nms_top_n_test": 150,
        "rpn_score_thresh": 0.05}),
}

#: FasterRCNN constructor settings a package stores (read back from a live model by :func:`detector_settings`).
SETTINGS = ("min_size", "max_size", "image_mean", "image_std", "rpn_pre_nms_top_n_train", "rpn_pre_nms_top_n_test",
            "rpn_post_nms_top_n_train", "rpn_post_nms_top_n_test", "rpn_nms_thresh", "rpn_fg_iou_thresh",
            "rpn_bg_iou_thresh", "rpn_batch_size_per_image", "rpn_positive_fraction", "rpn_score_thresh",
            "box_score_thresh", "box_nms_thresh", "box_detections_per_img", "box_fg_iou_thresh", "box_bg_iou_thresh",
            "box_batch_size_per_image", "box_positive_fraction")


def build_torchvision_detector(name: str, num_classes: int = 1, norm: str = "frozen",
                               trainable_backbone_layers: int = 3, **settings: Any) -> FasterRCNN:
    """torchvision's ``name`` Faster R-CNN, untrained, with a :class:`GrowingBoxPredictor`.

    The modules and state-dict keys are exactly those of ``torchvision.models.detection.<name>``;
    ``num_classes`` counts foreground classes. ``norm`` is the backbone's normalisation: ``"frozen"``
    (``FrozenBatchNorm2d``: what torchvision uses whenever it starts from pretrained weights, the usual
    way a detector is fine-tuned) or ``"batch"`` (``BatchNorm2d``: a detector trained from scratch).
    ``trainable_backbone_layers`` counts the backbone stages that train, from the last (torchvision's
    meaning; default 3 as torchvision's fine-tuning default). ``settings`` are FasterRCNN's keyword
    arguments (:data:`SETTINGS`), over torchvision's defaults for ``name``.
    """
    from torchvision.models.detection.backbone_utils import mobilenet_backbone, resnet_fpn_backbone
    from torchvision.ops.misc import FrozenBatchNorm2d

    spec = TORCHVISION_DETECTORS.get(name)
    if spec is None:
        raise ValueError(f"unknown torchvision detector {name!r}; known: {', '.join(TORCHVISION_DETECTORS)}")
    unknown = sorted(set(settings) - set(SETTINGS))
    if unknown:
        raise ValueError(f"torchvision:{name}: unknown setting(s) {unknown}; known: {', '.join(SETTINGS)}")
    if norm not in ("frozen", "batch"):
        raise ValueError(f"torchvision:{name}: norm must be 'frozen' or 'batch', got {norm!r}")
    if int(num_classes) < 1:
        raise ValueError(f"torchvision:{name}: num_classes must be >= 1, got {num_classes}")
    layers = int(trainable_backbone_layers)
    if not 0 <= layers <= spec.max_trainable:
        raise ValueError(f"torchvision:{name}: trainable_backbone_layers must be in [0, {spec.max_trainable}], got {layers}")
    norm_layer = FrozenBatchNorm2d if norm == "frozen" else nn.BatchNorm2d
    extra: dict[str, Any] = {}
    if spec.backbone == "resnet50":
        backbone = resnet_fpn_backbone(backbone_name="resnet50", weights=None, norm_layer=norm_layer,
                                       trainable_layers=layers)
    else:
        backbone = mobilenet_backbone(backbone_name=spec.backbone, weights=None, fpn=True, norm_layer=norm_layer,
                                      trainable_layers=layers)
        sizes = ((32, 64, 128, 256, 512),) * 3
        extra["rpn_anchor_generator"] = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes))
    cfg = {**spec.defaults, **settings}
    model = FasterRCNN(backbone, num_classes=None, box_predictor=GrowingBoxPredictor(1024, int(num_classes) + 1),
                       **extra, **cfg)
    model.detector_kwargs = {"num_classes": int(num_classes), "norm": norm,  # type: ignore[attr-defined]
                             "trainable_backbone_layers": layers, **settings}
    model.architecture = f"torchvision:{name}"  # type: ignore[attr-defined]
    return model


def detector_settings(model: FasterRCNN) -> dict[str, Any]:
    """The FasterRCNN settings of a live model (:data:`SETTINGS`), read from its parts: what a package
    must store so the rebuilt detector resizes, normalises, proposes and filters as this one does."""
    t, rpn, roi = model.transform, model.rpn, model.roi_heads
    return {
        "min_size": int(t.min_size[-1]), "max_size": int(t.max_size),
        "image_mean": [float(v) for v in t.image_mean], "image_std": [float(v) for v in t.image_std],
        "rpn_pre_nms_top_n_train": int(rpn._pre_nms_top_n["training"]),
        "rpn_pre_nms_top_n_test": int(rpn._pre_nms_top_n["testing"]),
        "rpn_post_nms_top_n_train": int(rpn._post_nms_top_n["training"]),
        "rpn_post_nms_top_n_test": int(rpn._post_nms_top_n["testing"]),
        "rpn_nms_thresh": float(rpn.nms_thresh), "rpn_fg_iou_thresh": float(rpn.proposal_matcher.high_threshold),
        "rpn_bg_iou_thresh": float(rpn.proposal_matcher.low_threshold),
        "rpn_batch_size_per_image": int(rpn.fg_bg_sampler.batch_size_per_image),
        "rpn_positive_fraction": float(rpn.fg_bg_sampler.positive_fraction), "rpn_score_thresh": float(rpn.score_thresh),
        "box_score_thresh": float(roi.score_thresh), "box_nms_thresh": float(roi.nms_thresh),
        "box_detections_per_img": int(roi.detections_per_img),
        "box_fg_iou_thresh": float(roi.proposal_matcher.high_threshold),
        "box_bg_iou_thresh": float(roi.proposal_matcher.low_threshold),
        "box_batch_size_per_image": int(roi.fg_bg_sampler.batch_size_per_image),
        "box_positive_fraction": float(roi.fg_bg_sampler.positive_fraction),
    }
