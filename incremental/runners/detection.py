"""Detection with user feedback (METHODS section 2): meta model, feedback, adaptation, COCO mAP.

One run of ``scenario.name: detection_scenes``:

1. generate the general scene (train / test) and the transfer scene (feedback images / test) from
   the seed (:mod:`incremental.detection.scenes`);
2. train the meta model (:func:`~incremental.detection.model.build_detector`) on the general scene,
   or load it from ``OUT/meta_model.pt`` when that package was written by the same settings;
3. measure COCO AP on both test sets (before);
4. the meta model predicts on ``feedback.n_images`` transfer images; a simulated person verifies the
   predictions from the ground truth (``feedback.error_rate``); step A turns the verification into
   training annotations (:mod:`incremental.detection.feedback`), counted per category;
5. adapt on those samples with ``strategy.plugins`` (none: fine-tuning on the samples alone;
   ``replay``: the history library of general-scene samples trained together with them;
   ``gradient_mixing``: history and transfer gradients mixed by similarity;
   ``pseudo_label_distillation``: the frozen meta model's boxes as pseudo labels for the old classes
   and box-head distillation weighted by 1 - p_old(background), with the detector options
   ``pseudo_score`` and ``distill_skip_annotated_new``; ``dynamic_loss_weighting``: weights over the
   detector's four loss terms), in any combination;
6. measure again (after). results.json carries ``ap_general`` and ``ap_transfer`` (``before`` /
   ``after``, each with AP and AP50 in points, 0-100), per-class AP and the feedback counts.

With ``scenario.new_classes: true`` the transfer scene also holds ``star`` and ``cross`` and step 4 is
replaced by new-class annotations: the first ``feedback.n_images`` transfer images with boxes for the
new classes only (old-class objects unlabelled, METHODS 3); the transfer AP is split old / new.

The functions are reusable by benchmarks (which train the meta model once per seed and adapt it many
times): :func:`make_scenes`, :func:`train_meta_model`, :func:`evaluate`, :func:`collect_feedback`,
:func:`adapt`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from ..config import ConfigError, check
from ..data import Experience
from ..trainer import seed_everything
from .base import LegacyUpdate, Run, RunConfig, execute, legacy_history, take, unknown_legacy


@dataclass
class ScenarioConfig:
    name: str = "detection_scenes"
    image_size: int = 128
    general_train: int = 400
    general_test: int = 100
    transfer_test: int = 100
    new_classes: bool = False  # the transfer scene brings star and cross (new classes)

    def validate(self) -> None:
        check(self.name == "detection_scenes", "scenario.name", "this runner handles detection_scenes")
        check(32 <= self.image_size <= 512, "scenario.image_size", f"must be in [32, 512], got {self.image_size}")
        for key in ("general_train", "general_test", "transfer_test"):
            check(getattr(self, key) >= 1, f"scenario.{key}", f"must be >= 1, got {getattr(self, key)}")


@dataclass
class ModelConfig:
    width: int = 16
    representation_size: int = 256
    box_batch_size_per_image: int = 64
    rpn_post_nms_top_n_train: int = 100

    def validate(self) -> None:
        check(self.width >= 4, "model.width", f"must be >= 4, got {self.width}")
        check(self.representation_size >= 8, "model.representation_size", "must be >= 8")
        check(self.box_batch_size_per_image >= 8, "model.box_batch_size_per_image", "must be >= 8")
        check(self.rpn_post_nms_top_n_train >= 8, "model.rpn_post_nms_top_n_train", "must be >= 8")


@dataclass
class OptimConfig:
    epochs: int = 12
    batch_size: int = 8
    lr: float = 0.02
    momentum: float = 0.9
    weight_decay: float = 0.0001
    min_steps: int = 0  # repeat the data (more epochs) until at least this many optimizer steps

    def validate_as(self, section: str) -> None:
        check(self.epochs >= 1, f"{section}.epochs", f"must be >= 1, got {self.epochs}")
        check(self.batch_size >= 1, f"{section}.batch_size", f"must be >= 1, got {self.batch_size}")
        check(self.lr > 0, f"{section}.lr", f"must be > 0, got {self.lr}")
        check(0 <= self.momentum < 1, f"{section}.momentum", f"must be in [0, 1), got {self.momentum}")
        check(self.weight_decay >= 0, f"{section}.weight_decay", "must be >= 0")
        check(self.min_steps >= 0, f"{section}.min_steps", "must be >= 0")

    def effective_epochs(self, n_samples: int) -> int:
        """Epochs to run on ``n_samples``: ``epochs``, or more to reach ``min_steps`` optimizer steps."""
        per_epoch = max(1, math.ceil(n_samples / self.batch_size))
        return max(self.epochs, math.ceil(self.min_steps / per_epoch))


@dataclass
class MetaConfig(OptimConfig):
    def validate(self) -> None:
        self.validate_as("meta")


@dataclass
class AdaptConfig(OptimConfig):
    epochs: int = 10
    lr: float = 0.01
    min_steps: int = 40

    def validate(self) -> None:
        self.validate_as("adapt")


@dataclass
class FeedbackConfig:
    n_images: int = 50
    confidence: float = 0.5
    iou: float = 0.5
    candidate_iou: float = 0.5
    correct_annotation: Literal["model_box", "user_box"] = "model_box"
    error_rate: float = 0.0

    def validate(self) -> None:
        check(self.n_images >= 1, "feedback.n_images", f"must be >= 1, got {self.n_images}")
        for key in ("confidence", "iou", "candidate_iou"):
            value = getattr(self, key)
            check(0 < value <= 1, f"feedback.{key}", f"must be in (0, 1], got {value}")
        check(0 <= self.error_rate <= 1, "feedback.error_rate", f"must be in [0, 1], got {self.error_rate}")


@dataclass
class TrainConfig:
    device: str = "cpu"
    threads: int | None = 1
    eval_batch_size: int = 16

    def validate(self) -> None:
        check(self.threads is None or self.threads >= 1, "train.threads", "must be >= 1 or null")
        check(self.eval_batch_size >= 1, "train.eval_batch_size", "must be >= 1")


@dataclass
class Config(RunConfig):
    scenario: ScenarioConfig = field(default_factory=ScenarioConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    meta: MetaConfig = field(default_factory=MetaConfig)
    feedback: FeedbackConfig = field(default_factory=FeedbackConfig)
    adapt: AdaptConfig = field(default_factory=AdaptConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> None:
        check(self.strategy.regime == "incremental", "strategy.regime",
              "detection adapts the deployed model; cumulative and joint do not apply")


#: The distillation weight measured for Faster R-CNN's box head (docs/detection.md: 1.0 over-constrains it).
DETECTOR_LAMBDA_DISTILL = 0.1


def legacy(old: dict[str, Any]) -> LegacyUpdate:
    """The detectors' old ``strategy.name`` (finetune, replay, gradient_mixing) and the
    ``pseudo_labels`` / ``distillation`` flags with their options, in the new form."""
    update = LegacyUpdate(history=legacy_history(old))
    rule = take(old, "rule")
    pl = take(old, "pseudo_labels", "distillation", "lambda_distill", "pseudo_score", "distill_skip_annotated_new")
    name = old.pop("name", None)
    unknown_legacy(old)
    update.options = {k: v for k, v in (("gradient_mixing", rule), ("pseudo_label_distillation", pl)) if v}
    if name is None and not ({"pseudo_labels", "distillation"} & set(pl)):
        return update
    plugins: list[dict[str, Any]] = []
    if pl.get("pseudo_labels") or pl.get("distillation"):
        plugins.append({"name": "pseudo_label_distillation", **pl})
    if name in ("replay", "gradient_mixing"):
        plugins.append({"name": name, **(rule if name == "gradient_mixing" else {})})
    elif name not in (None, "finetune", "naive"):
        raise ConfigError("strategy.name", f"must be one of finetune, replay, gradient_mixing (or use "
                                           f"strategy.plugins), got {name!r}")
    update.plugins = plugins
    update.options = {}
    return update


def plugin_hooks(meta_model: nn.Module) -> dict[str, Any]:
    """What detection adds to the registry's plugins: the frozen meta model and the Faster R-CNN
    adapter (its ``pseudo_score`` and ``distill_skip_annotated_new`` options) for pseudo labels and
    distillation, with the distillation weight measured for the box head; gradient mixing's rules
    limited to those a loss-dict output allows."""
    from strategies.registry import FamilyHook

    def pseudo_label_distillation(options: dict[str, Any]) -> dict[str, Any]:
        from ..detection.distillation import FasterRCNNAdapter, PseudoBoxConfig

        check(0 <= options["pseudo_score"] <= 1, "pseudo_score", f"must be in [0, 1], got {options['pseudo_score']}")
        adapter = FasterRCNNAdapter(PseudoBoxConfig(score=options["pseudo_score"],
                                                    skip_annotated_new=options["distill_skip_annotated_new"]))
        return {"old_model": meta_model, "adapter": adapter, "lambda_distill": DETECTOR_LAMBDA_DISTILL}

    def gradient_mixing(options: dict[str, Any]) -> dict[str, Any]:
        # The combined rules (*_ace, *_der) replay logits / per-class losses of a classifier's output;
        # a detector's output is a loss dict, so only the weighting rules apply (default: similarity).
        from strategies.mixing_rules import WEIGHTS

        check(options["rule"] in WEIGHTS, "rule", f"a detector takes the weighting rules {', '.join(sorted(WEIGHTS))}; "
                                                  f"got {options['rule']!r}")
        return {"rule": options["rule"]}

    return {"pseudo_label_distillation": FamilyHook(
        pseudo_label_distillation, options={"pseudo_score": float, "distill_skip_annotated_new": bool},
        defaults={"pseudo_score": 0.5, "distill_skip_annotated_new": False}),
        "gradient_mixing": FamilyHook(gradient_mixing, options={"rule": str}, defaults={"rule": "similarity"})}


# ----------------------------------------------------------------------------- building blocks
@dataclass
class Scenes:
    """The four sets of a run (each a :class:`~incremental.detection.coco.DetectionData`)."""

    general_train: Any
    general_test: Any
    transfer_feedback: Any
    transfer_test: Any
    transfer_feedback_coco: dict[str, Any]
    old_classes: list[str]
    class_names: list[str]


def make_scenes(scenario: ScenarioConfig, seed: int, n_feedback: int) -> Scenes:
    """Generate the sets in memory (no files): labels follow ``class_names`` (old classes first)."""
    from ..detection.coco import samples_from_coco
    from ..detection.scenes import ALL_CLASSES, OLD_CLASSES, generate_scene

    names = list(ALL_CLASSES if scenario.new_classes else OLD_CLASSES)
    transfer_classes = names

    def build(scene: str, n: int, split: str, classes: list[str]) -> tuple[Any, dict[str, Any]]:
        s = generate_scene(scene, n, seed, split=split, image_size=scenario.image_size, classes=classes)
        images = {im["id"]: arr for im, arr in zip(s.coco["images"], s.images)}
        return samples_from_coco(s.coco, images, names, source=f"{scene}/{split}"), s.coco

    general_train, _ = build("general", scenario.general_train, "train", list(OLD_CLASSES))
    general_test, _ = build("general", scenario.general_test, "test", list(OLD_CLASSES))
    feedback, feedback_coco = build("transfer", n_feedback, "pool", transfer_classes)
    transfer_test, _ = build("transfer", scenario.transfer_test, "test", transfer_classes)
    return Scenes(general_train, general_test, feedback, transfer_test, feedback_coco, list(OLD_CLASSES), names)


def detector_kwargs_for(cfg: Config, num_classes: int) -> dict[str, Any]:
    m = cfg.model
    return {"num_classes": num_classes, "image_size": cfg.scenario.image_size, "width": m.width,
            "representation_size": m.representation_size, "box_batch_size_per_image": m.box_batch_size_per_image,
            "rpn_post_nms_top_n_train": m.rpn_post_nms_top_n_train}


def make_optimizer(opt: OptimConfig, model: nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.SGD(params, lr=opt.lr, momentum=opt.momentum, weight_decay=opt.weight_decay)


def meta_fingerprint(cfg: Config) -> str:
    """What determines the meta model: seed, general-scene training data, model and meta training
    settings (not the transfer scene: the same-class and new-class variants share one meta model)."""
    key = {"seed": cfg.seed, "image_size": cfg.scenario.image_size, "general_train": cfg.scenario.general_train,
           "model": dataclasses.asdict(cfg.model), "meta": dataclasses.asdict(cfg.meta)}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def train_meta_model(cfg: Config, scenes: Scenes, *, progress: bool = False) -> nn.Module:
    """The deployed detector: trained on the general scene (old classes only)."""
    from ..detection.model import build_detector
    from ..detection.trainer import DetectionTrainer

    seed_everything(cfg.seed)
    model = build_detector(**detector_kwargs_for(cfg, len(scenes.old_classes)))
    data = scenes.general_train.samples
    trainer = DetectionTrainer(model, make_optimizer(cfg.meta, model), class_names=scenes.old_classes,
                               train_mb_size=cfg.meta.batch_size, train_epochs=cfg.meta.effective_epochs(len(data)),
                               device=cfg.train.device, seed=cfg.seed, progress=progress)
    trainer.train(Experience(data, 0, list(range(1, len(scenes.old_classes) + 1))))
    return trainer.model.eval()


def load_or_train_meta(cfg: Config, scenes: Scenes, path: Path | None, *, progress: bool = False) -> tuple[nn.Module, bool]:
    """Reuse ``path`` (a detector package) when it was trained with the same settings; returns
    ``(model, reused)``. A package from other settings is retrained over, never silently used."""
    from ..detection.packaging import load_detector, save_detector
    from ..detection.scenes import category_id

    fingerprint = meta_fingerprint(cfg)
    if path is not None and path.is_file():
        model, info = load_detector(path)
        if info["package"].extra.get("meta_fingerprint") == fingerprint:
            return model, True
    model = train_meta_model(cfg, scenes, progress=progress)
    if path is not None:
        save_detector(path, model, scenes.old_classes, [category_id(n) for n in scenes.old_classes],
                      extra={"meta_fingerprint": fingerprint})
    return model, False


def evaluate(model: nn.Module, data: Any, class_names: list[str], old_classes: list[str] | None = None,
             batch_size: int = 16) -> dict[str, Any]:
    """COCO mAP of ``model`` on a :class:`~incremental.detection.coco.DetectionData` (eval mode)."""
    from ..detection.evaluation import coco_map
    from ..detection.model import predict

    preds = predict(model, data.images(), batch_size=batch_size)
    old = old_classes if old_classes is not None and list(old_classes) != list(class_names) else None
    return coco_map(data.targets, preds, class_names, old)


def collect_feedback(model: nn.Module, scenes: Scenes, n_images: int, fb: FeedbackConfig, seed: int) -> tuple[Any, dict[str, Any]]:
    """Predict on the first ``n_images`` feedback images, verify them with the simulated person, and
    build the training samples of step A. Returns ``(DetectionData, report)``."""
    from ..detection.coco import samples_from_coco
    from ..detection.feedback import FeedbackThresholds, build_training_set, predictions_to_results
    from ..detection.model import all_candidate_boxes, predict
    from ..detection.scenes import category_id
    from ..detection.simulated_user import SimulatedUser

    pool = scenes.transfer_feedback
    if n_images > len(pool):
        raise ValueError(f"{n_images} feedback images requested but the pool has {len(pool)}")
    ids = pool.image_ids[:n_images]
    keep = set(ids)
    coco = scenes.transfer_feedback_coco
    gt = dict(coco, images=[im for im in coco["images"] if im["id"] in keep],
              annotations=[a for a in coco["annotations"] if a["image_id"] in keep])
    images = {i: x for i, (x, _, _) in zip(pool.image_ids, pool.samples.samples) if i in keep}
    float_images = {i: x.float() / 255.0 for i, x in images.items()}
    old_ids = [category_id(n) for n in scenes.old_classes]
    preds = predict(model, [float_images[i] for i in ids])
    results = predictions_to_results(preds, ids, old_ids, min_score=0.05)
    user = SimulatedUser(error_rate=fb.error_rate, confidence=fb.confidence, iou=fb.iou, seed=seed)
    verified = user.verify(gt, results)
    with all_candidate_boxes(model, min_score=0.001):
        candidates_all = dict(zip(ids, predict(model, [float_images[i] for i in ids])))

    def candidates(image_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        p = candidates_all[image_id]
        return p["boxes"], p["scores"], p["labels"]

    th = FeedbackThresholds(confidence=fb.confidence, iou=fb.iou, candidate_iou=fb.candidate_iou)
    train = build_training_set(verified, results, scenes.old_classes, candidates, th, model_category_ids=old_ids,
                               unknown_categories="keep", correct_rule=fb.correct_annotation)
    data = samples_from_coco(train, images, scenes.class_names, source="feedback")
    report = {"counts": train["feedback"]["counts"], "new_classes": train["feedback"]["new_classes"],
              "simulated_user_errors": verified["info"]["simulated_user"]["errors"]}
    return data, report


def new_class_data(scenes: Scenes, n_images: int, old_classes: list[str]) -> tuple[Any, dict[str, Any]]:
    """The new-class variant's training data: the first ``n_images`` transfer images annotated for the
    new classes only (old-class objects are in the images but unlabelled, as in METHODS 3)."""
    from ..detection.coco import DetectionData

    pool = scenes.transfer_feedback
    n_old = len(old_classes)
    samples, labels = [], []
    for x, t, task in pool.samples.samples[:n_images]:
        keep = t["labels"] > n_old
        samples.append((x, {**t, "boxes": t["boxes"][keep], "labels": t["labels"][keep]}, task))
        labels.append(int(t["labels"][keep][0]) if bool(keep.any()) else 0)
    from ..data import ListSamples

    data = ListSamples(samples, torch.tensor(labels, dtype=torch.long), pool.samples.collate_fn)
    n_boxes = sum(len(t["labels"]) for _, t, _ in samples)
    dropped = sum(len(t["labels"]) for _, t, _ in pool.samples.samples[:n_images]) - n_boxes
    report = {"counts": {"images": len(samples), "new_class_boxes": n_boxes, "unlabelled_old_class_boxes": dropped},
              "new_classes": scenes.class_names[n_old:], "simulated_user_errors": None}
    return DetectionData(data, pool.class_names, pool.category_ids, pool.image_ids[:n_images], {}, "new-class data"), report


def _history(cfg: Config) -> Any:
    from ..buffer import HistoryLibrary

    h = cfg.strategy.history
    return HistoryLibrary(h.mem_size, h.policy, seed=cfg.seed) if h.mem_size else None


#: The run's step the adaptation is (step 0 trains or loads the meta model): the experience id the
#: adaptation trains under, so logs, plugin statistics and resume agree with the evaluation rows.
ADAPT_EXPERIENCE = 1


def adapt(cfg: Config, meta_model: nn.Module, feedback: Any, scenes: Scenes, *, progress: bool = False,
          run: "DetectionRun | None" = None) -> tuple[nn.Module, dict[str, Any]]:
    """Adapt a copy of the meta model on the feedback samples with ``cfg.strategy``'s plugins."""
    import copy

    from strategies.registry import build_plugins

    from ..detection.trainer import DetectionTrainer

    seed_everything(cfg.seed)
    model = copy.deepcopy(meta_model).train()
    history = run.make_history() if run is not None else _history(cfg)
    if history is not None:
        history.update(scenes.general_train.samples)
    plugins = (run.make_plugins(plugin_hooks(meta_model)) if run is not None else
               build_plugins(cfg.strategy.plugins, plugin_hooks(meta_model), defaults={"seed": cfg.seed}))
    data = feedback.samples
    trainer = DetectionTrainer(model, make_optimizer(cfg.adapt, model), class_names=scenes.class_names,
                               old_classes=scenes.old_classes, train_mb_size=cfg.adapt.batch_size,
                               train_epochs=cfg.adapt.effective_epochs(len(data)), device=cfg.train.device,
                               plugins=plugins, history=history, history_mb_size=cfg.strategy.history.batch_size,
                               seed=cfg.seed, progress=progress)
    trainer.classes_seen = set(range(1, len(scenes.old_classes) + 1))
    labels = sorted({int(l) for _, t, _ in data.samples for l in t["labels"].tolist()} | trainer.classes_seen)
    trainer.train(Experience(data, ADAPT_EXPERIENCE, labels))
    info: dict[str, Any] = {"epochs": trainer.train_epochs, "steps": trainer.clock.train_iterations}
    for plugin in plugins:
        name = type(plugin).__name__
        if name == "GradientMixingPlugin":
            info["gradient_mixing"] = plugin.summary().get(ADAPT_EXPERIENCE, {})
            info["plugin"] = plugin
        elif name == "PseudoLabelDistillationPlugin":
            info["pseudo_label_distillation"] = plugin.summary()
            plugin.adapter.close()
        elif name == "DynamicLossWeightingPlugin":
            info["loss_weights"] = dict(plugin.weights)
    if run is not None:
        run.trainer = ModelState(trainer.model)
    return trainer.model.eval(), info


def _ap(result: dict[str, Any]) -> dict[str, Any]:
    keys = ("AP", "AP50", "AP_old", "AP50_old", "AP_new", "AP50_new")
    return {k: result[k] for k in keys if k in result}


def format_report(results: dict[str, Any]) -> str:
    from ..detection.evaluation import fmt_ap
    from ..detection.feedback import format_counts

    lines = [f"{'':<22}{'AP before':>10}{'AP after':>10}{'AP50 before':>13}{'AP50 after':>12}"]
    for key in ("ap_general", "ap_transfer"):
        b, a = results[key]["before"], results[key]["after"]
        lines.append(f"{key:<22}{fmt_ap(b['AP']):>10}{fmt_ap(a['AP']):>10}{fmt_ap(b['AP50']):>13}{fmt_ap(a['AP50']):>12}")
    if "AP_new" in results["ap_transfer"]["after"]:
        b, a = results["ap_transfer"]["before"], results["ap_transfer"]["after"]
        for group in ("old", "new"):
            lines.append(f"{'transfer, ' + group + ' classes':<22}{fmt_ap(b.get('AP_' + group)):>10}{fmt_ap(a.get('AP_' + group)):>10}"
                         f"{fmt_ap(b.get('AP50_' + group)):>13}{fmt_ap(a.get('AP50_' + group)):>12}")
    lines.append("")
    if results["new_classes"] and "new_class_boxes" in results["feedback_counts"]:
        c = results["feedback_counts"]
        lines.append(f"new classes {', '.join(results['new_classes'])}: {c['new_class_boxes']} boxes on {c['images']} "
                     f"transfer images ({c['unlabelled_old_class_boxes']} old-class objects left unlabelled)")
    else:
        lines.append(f"feedback on {results['n_feedback']} transfer images:")
        lines.append(format_counts(results["feedback_counts"]))
    return "\n".join(lines)


class ModelState:
    """Checkpoint view of a model outside a training loop: the meta model after step 0, the adapted
    one after step 1. Restoring keeps the weights aside (``restored``): the run decides what they are."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.restored: dict[str, torch.Tensor] | None = None

    def state_dict(self) -> dict[str, Any]:
        from ..trainer import capture_rng_state

        return {"model": self.model.state_dict(), "rng": capture_rng_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from ..trainer import restore_rng_state

        self.restored = state["model"]
        restore_rng_state(state["rng"])


class DetectionRun(Run):
    """Step 0: the meta model on the general scene (trained, or reused from ``OUT/meta_model.pt`` when
    that package has the same settings). Step 1: feedback (or new-class annotations) on the transfer
    scene and adaptation with the plugins. After each step: COCO AP on both test sets."""

    n_steps = 2
    eval_metric = "AP"  # accuracy_matrix holds COCO AP (general scene, transfer scene)

    def __init__(self, cfg: Config, out_dir: Path | str = ".", progress: bool = False, resume: bool = False) -> None:
        from ..detection.model import build_detector

        super().__init__(cfg, out_dir, progress)
        self.scenes = make_scenes(cfg.scenario, cfg.seed, cfg.feedback.n_images)
        self.meta_path = self.out_dir / "meta_model.pt"
        if not resume and self.meta_path.exists():
            self.meta_path.unlink()
        self.meta = build_detector(**detector_kwargs_for(cfg, len(self.scenes.old_classes)))
        self.check_plugins(plugin_hooks(self.meta))  # before the meta model is trained
        self.trainer: Any = ModelState(self.meta)
        self.evaluations: list[dict[str, Any]] = []
        self.feedback_report: dict[str, Any] = {}
        self.info: dict[str, Any] = {}
        self.meta_reused = False
        self.meta_time_s = self.adapt_time_s = 0.0

    def _evaluate(self, model: nn.Module) -> list[float]:
        bs, sc = self.cfg.train.eval_batch_size, self.scenes
        general = evaluate(model, sc.general_test, sc.class_names, sc.old_classes, bs)
        transfer = evaluate(model, sc.transfer_test, sc.class_names, sc.old_classes, bs)
        self.evaluations.append({"general": general, "transfer": transfer})
        row = [general["AP"] or 0.0, transfer["AP"] or 0.0]
        self.accuracy_matrix.append(row)
        return row

    def step(self, i: int) -> list[float]:
        start = time.perf_counter()
        cfg = self.cfg
        if i == 0:
            meta, self.meta_reused = load_or_train_meta(cfg, self.scenes, self.meta_path, progress=self.progress)
            self.meta.load_state_dict(meta.state_dict())
            self.meta.eval()
            self.meta_time_s = time.perf_counter() - start
            row = self._evaluate(self.meta)
        else:
            if cfg.scenario.new_classes:  # the transfer scene brings new classes, annotated for them only
                feedback, self.feedback_report = new_class_data(self.scenes, cfg.feedback.n_images, self.scenes.old_classes)
            else:
                feedback, self.feedback_report = collect_feedback(self.meta, self.scenes, cfg.feedback.n_images,
                                                                  cfg.feedback, cfg.seed)
            t = time.perf_counter()
            model, self.info = adapt(cfg, self.meta, feedback, self.scenes, progress=self.progress, run=self)
            self.adapt_time_s = time.perf_counter() - t
            row = self._evaluate(model)
        self.train_time_s += time.perf_counter() - start
        return row

    def extra_state(self) -> dict[str, Any]:
        info = {k: v for k, v in self.info.items() if k != "plugin"}
        return {"evaluations": self.evaluations, "feedback_report": self.feedback_report, "info": info,
                "meta_reused": self.meta_reused, "meta_time_s": self.meta_time_s, "adapt_time_s": self.adapt_time_s}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.evaluations = list(state["evaluations"])
        self.feedback_report = dict(state["feedback_report"])
        self.info = dict(state["info"])
        self.meta_reused = bool(state["meta_reused"])
        self.meta_time_s = float(state["meta_time_s"])
        self.adapt_time_s = float(state["adapt_time_s"])
        if len(self.evaluations) == 1 and self.trainer.restored is not None:  # the meta model: adapt it next
            self.meta.load_state_dict(self.trainer.restored)
            self.meta.eval()

    def results(self) -> dict[str, Any]:
        before, after = self.evaluations[0], self.evaluations[-1]
        info = {k: v for k, v in self.info.items() if k != "plugin"}
        results: dict[str, Any] = {
            "ap_general": {"before": _ap(before["general"]), "after": _ap(after["general"])},
            "ap_transfer": {"before": _ap(before["transfer"]), "after": _ap(after["transfer"])},
            "per_class": {
                "general": {"before": before["general"]["per_class"], "after": after["general"]["per_class"]},
                "transfer": {"before": before["transfer"]["per_class"], "after": after["transfer"]["per_class"]},
            },
            "feedback_counts": self.feedback_report.get("counts"),
            "simulated_user_errors": self.feedback_report.get("simulated_user_errors"),
            "new_classes": self.feedback_report.get("new_classes"),
            "n_feedback": self.cfg.feedback.n_images,
            "strategy": "+".join(self.cfg.strategy.names()) or "finetune",
            "adaptation": info,
            "meta_model_reused": self.meta_reused,
            "meta_time_s": self.meta_time_s,
            "adapt_time_s": self.adapt_time_s,
        }
        return results

    def report(self, results: dict[str, Any]) -> str:
        return format_report(results)

    def plots(self, out_dir: Path) -> None:
        from ..plots import bar_chart

        before, after = self.evaluations[0], self.evaluations[-1]
        bar_chart({"general": {"before": before["general"]["AP"] or 0.0, "after": after["general"]["AP"] or 0.0},
                   "transfer": {"before": before["transfer"]["AP"] or 0.0, "after": after["transfer"]["AP"] or 0.0}},
                  out_dir / "ap_before_after.png", ylabel="COCO AP (points)",
                  title=f"{'+'.join(self.cfg.strategy.names()) or 'fine-tuning'}, {self.cfg.feedback.n_images} "
                        f"feedback images (seed {self.cfg.seed})")
        plugin = self.info.get("plugin")
        if plugin is not None and hasattr(plugin, "plot_stats"):
            plugin.plot_stats(out_dir, prefix="gradient_mixing")


def run(cfg: Config, out_dir: Path, *, progress: bool = False, resume: bool = False) -> dict[str, Any]:
    return execute(DetectionRun(cfg, out_dir, progress, resume), out_dir, resume=resume)
