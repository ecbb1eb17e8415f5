"""Class-incremental panoptic segmentation runs (``panoptic_shapes``, ``coco_panoptic``).

The strategy is the shared ``strategy`` section (``runners/base.py``), on a small Mask2Former-style model:
- no plugins: train on each step's new-class annotations only (fine-tuning, the lower bound);
- ``pseudo_label_distillation`` (options ``pseudo_labels`` / ``distillation`` switch METHODS 3.3's old-model
  pseudo labels and 3.4's no-object-weighted distillation; ``pseudo`` holds the pseudo-label thresholds):
  the full method of METHODS section 3;
- ``regime: joint``: retrain from scratch on every image so far, annotated with every class so far (the
  upper bound; it needs the old data and labels the real use does not have);
- ``history.mem_size > 0`` adds replay of earlier steps' images (with their own annotations).
The old names (``strategy.name``: finetune, pseudo_labels, distillation, pseudo_distill, joint) still work.

After every step the whole test set is evaluated: PQ, SQ, RQ per class and for the old classes
(learned before the step), the new ones (this step's) and all seen so far.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from ..config import ConfigError, check
from ..data import ListSamples
from ..panoptic.pseudo_labels import PseudoLabelConfig
from ..panoptic.training import PanopticTrainer, ScheduleAndClip, make_optimizer
from .base import LegacyUpdate, Run, RunConfig, config_from_raw, execute, legacy_history, take, unknown_legacy

if TYPE_CHECKING:
    from ..panoptic.scenario import PanopticScenario

#: The old ``strategy.name`` values: which halves of the method they switch on (None: no plugin).
LEGACY_NAMES: dict[str, tuple[bool, bool] | None] = {
    "finetune": None,
    "pseudo_labels": (True, False),
    "distillation": (False, True),
    "pseudo_distill": (True, True),
    "joint": None,
}
DEFAULT_STEPS = [["circle", "square", "triangle", "sky", "ground"], ["cross", "ring"]]


@dataclass
class ScenarioConfig:
    name: Literal["panoptic_shapes", "coco_panoptic"] = "panoptic_shapes"
    steps: list[list[str]] = field(default_factory=lambda: [list(s) for s in DEFAULT_STEPS])
    image_size: int = 64
    # panoptic_shapes: images generated per training step, and test images
    train_images: list[int] = field(default_factory=lambda: [480, 240])
    test_images: int = 150
    data_dir: str | None = None  # where generated files go (default: OUT/data)
    # coco_panoptic: annotation files (masks dirs / image dirs default to COCO's layout)
    train_json: str | None = None
    train_masks: str | None = None
    train_images_dir: str | None = None
    test_json: str | None = None
    test_masks: str | None = None
    test_images_dir: str | None = None
    max_images: int | None = None

    def validate(self) -> None:
        check(len(self.steps) >= 2, "scenario.steps", f"needs the old classes and at least one new step, got {self.steps}")
        check(all(len(s) >= 1 for s in self.steps), "scenario.steps", "every step needs at least one class")
        names = [n for s in self.steps for n in s]
        check(len(set(names)) == len(names), "scenario.steps", f"a class appears twice: {names}")
        check(self.image_size >= 32 and self.image_size % 16 == 0, "scenario.image_size",
              f"must be a multiple of 16, >= 32, got {self.image_size}")
        if self.name == "panoptic_shapes":
            from ..panoptic.shapes import CATEGORIES

            known = [c["name"] for c in CATEGORIES]
            unknown = [n for n in names if n not in known]
            check(not unknown, "scenario.steps", f"unknown classes {unknown}; panoptic_shapes has {known}")
            check(len(self.train_images) == len(self.steps), "scenario.train_images",
                  f"needs one count per step ({len(self.steps)}), got {self.train_images}")
            check(all(n >= 1 for n in self.train_images), "scenario.train_images", "counts must be >= 1")
            check(self.test_images >= 1, "scenario.test_images", "must be >= 1")
        else:
            check(self.train_json is not None, "scenario.train_json", "coco_panoptic needs the training JSON")
            check(self.test_json is not None, "scenario.test_json", "coco_panoptic needs the test JSON")
        if self.max_images is not None:
            check(self.max_images >= 1, "scenario.max_images", "must be >= 1")


@dataclass
class ModelConfig:
    n_queries: int = 16
    hidden_dim: int = 64
    n_layers: int = 3
    n_heads: int = 4
    ffn_dim: int = 128
    mask_dim: int = 64
    backbone_channels: list[int] = field(default_factory=lambda: [32, 64, 96])
    mask_stride: int = 4
    no_object_weight: float = 0.1
    deep_supervision: bool = True
    # > 0: every update learns its classes with this many queries of its own, the deployed model frozen
    # (incremental.panoptic.prompts, ECLIPSE-style); 0: the shared queries and a growing head (METHODS)
    prompt_queries: int = 0
    prompt_own_layers: bool = False  # each query group with a trainable copy of the decoder layers
    prompt_own_pixel_decoder: bool = False  # ... and of the pixel decoder
    prompt_own_backbone: int = 0  # ... and of the backbone's last k stages (0-3)
    prompt_claim_cover: float = 0.7  # inference: how much of an old query's mask a confident newer one must cover
    # inference: a confident newer query overlapping an older thing query it does not claim by more than this
    # fraction of its own mask yields to it (None: never)
    prompt_claim_yield: float | None = None

    def validate(self) -> None:
        check(self.n_queries >= 1, "model.n_queries", "must be >= 1")
        check(self.n_layers >= 1, "model.n_layers", "must be >= 1")
        check(self.n_heads >= 1 and self.hidden_dim % self.n_heads == 0, "model.hidden_dim",
              f"must be a multiple of model.n_heads ({self.n_heads}), got {self.hidden_dim}")
        check(len(self.backbone_channels) == 3 and all(c >= 2 and c % 2 == 0 for c in self.backbone_channels),
              "model.backbone_channels", f"needs 3 even channel counts, got {self.backbone_channels}")
        check(self.mask_stride in (2, 4), "model.mask_stride", f"must be 2 or 4, got {self.mask_stride}")
        check(0.0 < self.no_object_weight <= 1.0, "model.no_object_weight", f"must be in (0, 1], got {self.no_object_weight}")
        check(self.prompt_queries >= 0, "model.prompt_queries", f"must be >= 0, got {self.prompt_queries}")
        check(0 <= self.prompt_own_backbone <= 3, "model.prompt_own_backbone",
              f"must be 0-3 (the backbone's last k stages), got {self.prompt_own_backbone}")
        check(0.0 <= self.prompt_claim_cover <= 1.0, "model.prompt_claim_cover",
              f"must be in [0, 1], got {self.prompt_claim_cover}")
        check(self.prompt_claim_yield is None or 0.0 <= self.prompt_claim_yield <= 1.0, "model.prompt_claim_yield",
              f"must be in [0, 1] or null, got {self.prompt_claim_yield}")

    def kwargs(self, n_classes: int) -> dict[str, Any]:
        return dict(n_classes=n_classes, n_queries=self.n_queries, hidden_dim=self.hidden_dim, n_layers=self.n_layers,
                    n_heads=self.n_heads, ffn_dim=self.ffn_dim, mask_dim=self.mask_dim,
                    backbone_channels=list(self.backbone_channels), mask_stride=self.mask_stride,
                    **({"prompt_queries": self.prompt_queries, "prompt_own_layers": self.prompt_own_layers,
                        "prompt_own_pixel_decoder": self.prompt_own_pixel_decoder,
                        "prompt_own_backbone": self.prompt_own_backbone,
                        "prompt_claim_cover": self.prompt_claim_cover,
                        "prompt_claim_yield": self.prompt_claim_yield} if self.prompt_queries else {}))


@dataclass
class TrainConfig:
    base_epochs: int = 40
    step_epochs: int = 20
    joint_epochs: int | None = None  # default: base_epochs
    batch_size: int = 16
    lr: float = 1e-3
    step_lr: float = 1e-4
    head_lr: float | None = 1e-3  # class-head rate in update steps (None: step_lr)
    weight_decay: float = 1e-4
    schedule: Literal["cosine", "constant"] = "cosine"
    grad_clip: float | None = 1.0
    eval_batch_size: int = 50
    device: str = "cpu"
    threads: int | None = 1

    def validate(self) -> None:
        for name in ("base_epochs", "step_epochs", "batch_size", "eval_batch_size"):
            check(getattr(self, name) >= 1, f"train.{name}", f"must be >= 1, got {getattr(self, name)}")
        check(self.joint_epochs is None or self.joint_epochs >= 1, "train.joint_epochs", "must be >= 1")
        check(self.lr > 0, "train.lr", f"must be > 0, got {self.lr}")
        check(self.step_lr > 0, "train.step_lr", f"must be > 0, got {self.step_lr}")
        check(self.head_lr is None or self.head_lr > 0, "train.head_lr", f"must be > 0 or null, got {self.head_lr}")
        check(self.weight_decay >= 0, "train.weight_decay", "must be >= 0")
        check(self.grad_clip is None or self.grad_clip > 0, "train.grad_clip", "must be > 0 or null")
        check(self.threads is None or self.threads >= 1, "train.threads", "must be >= 1 or null")


@dataclass
class InferenceConfig:
    object_threshold: float = 0.5
    overlap_threshold: float = 0.8
    mask_threshold: float = 0.5

    def validate(self) -> None:
        for name in ("object_threshold", "overlap_threshold", "mask_threshold"):
            value = getattr(self, name)
            check(0.0 <= value <= 1.0, f"inference.{name}", f"must be in [0, 1], got {value}")


@dataclass
class Config(RunConfig):
    scenario: ScenarioConfig = field(default_factory=ScenarioConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    sample_images: int = 6  # test images drawn in samples.png (0: none)

    def validate(self) -> None:
        check(self.scenario.name in ("panoptic_shapes", "coco_panoptic"), "scenario.name",
              "this runner handles panoptic_shapes and coco_panoptic")
        check(self.sample_images >= 0, "sample_images", "must be >= 0")
        check(self.strategy.regime != "cumulative", "strategy.regime",
              "panoptic runs take incremental (the default) or joint")
        if self.model.prompt_queries:  # the deployed model is frozen: nothing for these to act on
            names = [p.get("name") for p in self.strategy.plugins if isinstance(p, dict)]
            check("pseudo_label_distillation" not in names, "model.prompt_queries",
                  "query groups leave the deployed model frozen; drop the pseudo_label_distillation plugin "
                  "(it trains the shared queries) or set model.prompt_queries: 0")
            check(not self.strategy.history.mem_size, "model.prompt_queries",
                  "a query group learns only its step's classes; replayed old-class images would train it on "
                  "classes it does not answer (set strategy.history.mem_size: 0)")


PLUGIN_OPTIONS = ("lambda_distill", "gamma", "divergence", "temperature", "lambda_mask", "distill_aux",
                  "claimed_queries", "unlabelled_queries", "pseudo")


def legacy(old: dict[str, Any]) -> LegacyUpdate:
    """The old ``strategy.name`` (finetune, pseudo_labels, distillation, pseudo_distill, joint) and its
    flat options, in the new form."""
    update = LegacyUpdate(history=legacy_history(old))
    options = take(old, *PLUGIN_OPTIONS)
    name = old.pop("name", None)
    unknown_legacy(old)
    if name is None:
        update.options = {"pseudo_label_distillation": options} if options else {}
        return update
    if name not in LEGACY_NAMES:
        raise ConfigError("strategy.name", f"must be one of {', '.join(LEGACY_NAMES)} (or use strategy.plugins), "
                                           f"got {name!r}")
    flags = LEGACY_NAMES[name]
    update.plugins = [] if flags is None else [
        {"name": "pseudo_label_distillation", "pseudo_labels": flags[0], "distillation": flags[1], **options}]
    if update.history.get("mem_size"):  # the old mem_size > 0 meant replay of earlier steps' images
        update.plugins.insert(0, {"name": "replay"})
    update.regime = "joint" if name == "joint" else "incremental"
    return update


def config_from(raw: dict[str, Any]) -> Config:
    """A typed config from a raw dict, old strategy names translated (the benchmarks build theirs so)."""
    return config_from_raw(Config, raw, legacy, quiet=True)


def plugin_hooks(stuff_classes: list[int]) -> dict[str, Any]:
    """What panoptic runs add to ``pseudo_label_distillation``: the pseudo-label thresholds
    (``pseudo``, METHODS 3.3) and the scenario's stuff classes. The old model is the deployed one,
    copied by the plugin when an update starts."""
    from strategies.registry import FamilyHook

    def build(options: dict[str, Any]) -> dict[str, Any]:
        return {"pseudo_config": options["pseudo"] or PseudoLabelConfig(), "stuff_classes": list(stuff_classes)}

    return {"pseudo_label_distillation": FamilyHook(build, options={"pseudo": PseudoLabelConfig},
                                                    defaults={"pseudo": None})}


# ----------------------------------------------------------------------------- scenario and run
def build_scenario(cfg: Config, out_dir: Path) -> "PanopticScenario":
    """Generated shapes (written under ``scenario.data_dir`` or ``OUT/data``) or COCO files."""
    from ..panoptic.scenario import coco_scenario, shapes_scenario

    s = cfg.scenario
    if s.name == "panoptic_shapes":
        root = Path(s.data_dir) if s.data_dir else Path(out_dir) / "data"
        return shapes_scenario(root, s.steps, s.train_images, s.test_images, s.image_size, cfg.seed)
    return coco_scenario(s.train_json, s.test_json, s.steps, train_masks=s.train_masks,
                         train_images_dir=s.train_images_dir, test_masks=s.test_masks,
                         test_images_dir=s.test_images_dir, image_size=s.image_size, max_images=s.max_images)


class PanopticRun(Run):
    """One run: scenario, model, loop, and the PQ results after every step (checkpointable)."""

    title = "panoptic"
    eval_metric = "PQ"

    def __init__(self, cfg: Config, out_dir: Path | str = ".", progress: bool = False,
                 scenario: "PanopticScenario | None" = None) -> None:
        from ..panoptic.coco import collate_panoptic
        from ..panoptic.criterion import SetCriterion

        super().__init__(cfg, out_dir, progress)
        self.scenario = scenario if scenario is not None else build_scenario(cfg, self.out_dir)
        self.criterion = SetCriterion(no_object_weight=cfg.model.no_object_weight,
                                      deep_supervision=cfg.model.deep_supervision)
        model = self.new_model(len(self.scenario.step_classes[0]))
        plugins = self.make_plugins(plugin_hooks(self.scenario.stuff_classes))
        self.plugin = self.plugin_with("old_model")  # pseudo-label distillation, when listed
        self._groups: dict[str, list[int]] = {}
        self.trainer = PanopticTrainer(
            model, make_optimizer(model, cfg.train.lr, cfg.train.weight_decay), self.criterion,
            train_mb_size=cfg.train.batch_size, train_epochs=cfg.train.base_epochs,
            eval_mb_size=cfg.train.eval_batch_size, device=cfg.train.device,
            plugins=[ScheduleAndClip(cfg.train.schedule, cfg.train.grad_clip), *plugins],
            history=self.make_history(collate_fn=collate_panoptic),
            history_mb_size=cfg.strategy.history.batch_size, seed=cfg.seed, progress=progress,
            eval_accumulator=self.make_accumulator,
        )
        # the number of classes after each step: a model with query groups grows one group per step
        self.trainer.class_steps = tuple(max(c for s in self.scenario.step_classes[: i + 1] for c in s) + 1
                                         for i in range(self.n_steps))
        self.records: list[dict[str, Any]] = []
        # self.accuracy_matrix (Run): PQ of step j's classes after step i (the checkpointer's name)

    def plugin_with(self, attribute: str) -> Any:
        return next((p for p in self.plugins if hasattr(p, attribute)), None)

    # -- pieces ------------------------------------------------------------------------------
    def new_model(self, n_classes: int) -> torch.nn.Module:
        from ..panoptic.model import build_panoptic_model

        kwargs = self.cfg.model.kwargs(n_classes)
        if self.cfg.model.prompt_queries:  # the claim rule's yield counts thing queries only
            kwargs["prompt_thing_classes"] = list(self.scenario.thing_classes)
        return build_panoptic_model(**kwargs)

    def make_accumulator(self, trainer: Any) -> Any:
        from ..panoptic.pq import PanopticQualityAccumulator

        n = int(trainer.model.n_classes)
        sc = self.scenario
        inf = self.cfg.inference
        return PanopticQualityAccumulator(
            sc.class_names[:n], [c for c in sc.thing_classes if c < n], self._groups,
            object_threshold=inf.object_threshold, overlap_threshold=inf.overlap_threshold,
            mask_threshold=inf.mask_threshold)

    @property
    def n_steps(self) -> int:
        return len(self.scenario.step_classes)

    def groups(self, step: int) -> dict[str, list[int]]:
        sc = self.scenario
        out = {"old": [c for s in sc.step_classes[:step] for c in s], "new": list(sc.step_classes[step]),
               "base": list(sc.step_classes[0])}
        out.update({f"step{j}": list(cls) for j, cls in enumerate(sc.step_classes[: step + 1])})
        return out

    # -- one step ----------------------------------------------------------------------------
    def train_step(self, i: int) -> None:
        cfg, tr = self.cfg, self.trainer
        if cfg.strategy.regime == "joint":
            torch.manual_seed(cfg.seed)
            tr.model = self.new_model(len(self.scenario.seen_after(i)))
            tr.optimizer = make_optimizer(tr.model, cfg.train.lr, cfg.train.weight_decay)
            tr.classes_seen = set()
            tr.train_epochs = cfg.train.joint_epochs or cfg.train.base_epochs
            tr.train(self.scenario.joint_stream[i])
            return
        if i == 0:
            tr.train_epochs = cfg.train.base_epochs
        else:
            # an update starts from the deployed weights with a fresh optimizer at the step's rate;
            # the head grows first so that the optimizer holds the new rows from the start
            tr.train_epochs = cfg.train.step_epochs
            tr.classes_seen.update(self.scenario.step_classes[i])
            tr.model = tr.model_adaptation()
            tr.optimizer = make_optimizer(tr.model, cfg.train.step_lr, cfg.train.weight_decay, cfg.train.head_lr)
        tr.train(self.scenario.train_stream[i])
        if i > 0:  # the next update builds its own optimizer; keep one that checkpoints restore as is
            tr.optimizer = make_optimizer(tr.model, cfg.train.step_lr, cfg.train.weight_decay)

    def evaluate(self, i: int) -> dict[str, Any]:
        self._groups = self.groups(i)
        return self.trainer.eval(self.scenario.test_experience(i))[i]

    def step(self, i: int) -> dict[str, Any]:
        start = time.perf_counter()
        self.train_step(i)
        result = self.evaluate(i)
        self.record(i, result)
        self.train_time_s += time.perf_counter() - start
        self.save_package(self.out_dir / f"model_step{i}.pt")  # the deployed model after each step
        return result

    def eval_results(self) -> dict[int, dict[str, float]]:
        """For the logs: PQ of each step's classes so far (steps not reached yet are left out)."""
        return {j: {"accuracy": v} for j, v in enumerate(self.accuracy_matrix[-1]) if not math.isnan(v)}

    def record(self, i: int, result: dict[str, Any]) -> None:
        row = [result.get(f"pq_step{j}") for j in range(self.n_steps)]
        self.accuracy_matrix.append([float("nan") if v is None else float(v) for v in row])
        rec = {"step": i, "classes": [self.scenario.class_names[c] for c in self.scenario.step_classes[i]], **result}
        if self.plugin is not None and i > 0:
            rec["plugin"] = self.plugin.summary()
        self.records.append(rec)

    def adopt_base(self, other: "PanopticRun") -> None:
        """Start from another run's trained step 0 (same config up to the strategy): the benchmark
        trains the base model once per seed and branches every method from it."""
        self.trainer.model.load_state_dict(other.trainer.model.state_dict())
        self.trainer.classes_seen = set(other.trainer.classes_seen)
        self.records = copy.deepcopy(other.records[:1])
        self.accuracy_matrix = copy.deepcopy(other.accuracy_matrix[:1])
        self.train_time_s = other.train_time_s
        if self.plugin is not None:
            from strategies.pseudo_label_distillation import frozen_copy

            self.plugin.old_model = frozen_copy(self.trainer.model)

    # -- checkpoints -------------------------------------------------------------------------
    def extra_state(self) -> dict[str, Any]:
        return {"records": self.records}

    def load_extra_state(self, extra: dict[str, Any]) -> None:
        # The plugin's state is its frozen old model: the deployed model, rebuilt from the restored weights.
        self.records = list(extra.get("records", []))
        if self.plugin is not None and self.records:
            from strategies.pseudo_label_distillation import frozen_copy

            self.plugin.old_model = frozen_copy(self.trainer.model)
        history = self.trainer.history
        if history is not None and isinstance(history.samples, ListSamples):
            from ..panoptic.coco import collate_panoptic

            history.samples.collate_fn = collate_panoptic  # the library's restore cannot know it

    # -- outputs -----------------------------------------------------------------------------
    def results(self) -> dict[str, Any]:
        recs = self.records
        sc = self.scenario
        from ..panoptic.scenario import sample_counts

        return {
            "class_names": sc.class_names,
            "steps": [[sc.class_names[c] for c in cls] for cls in sc.step_classes],
            "thing_classes": [sc.class_names[c] for c in sc.thing_classes],
            "pq_old": [r.get("pq_old") for r in recs],
            "pq_new": [r.get("pq_new") for r in recs],
            "pq_all": [r.get("pq_all") for r in recs],
            "pq_base": [r.get("pq_base") for r in recs],
            "sq_all": [r.get("sq_all") for r in recs],
            "rq_all": [r.get("rq_all") for r in recs],
            "pq_per_class": [r.get("pq_per_class") for r in recs],
            "pq_matrix": [[None if math.isnan(v) else v for v in row] for row in self.accuracy_matrix],
            "step_results": recs,
            "train_samples": sample_counts(sc),
            "train_eval_time_s": self.train_time_s,
        }

    def save_package(self, path: Path) -> Path:
        """The final model as a package for ``incremental update`` (kind ``panoptic``)."""
        from ..package import save_model
        from ..panoptic.update import package_extra

        model = self.trainer.model
        n = int(model.n_classes)
        sc = self.scenario
        return save_model(path, model, kind="panoptic", architecture="panoptic_tiny",
                          arch_kwargs=model.arch_kwargs(), class_names=sc.class_names[:n],
                          extra=package_extra(sc.class_names[:n], [c for c in sc.thing_classes if c < n],
                                              self.cfg.scenario.image_size))

    def report(self, results: dict[str, Any]) -> str:
        return format_report(results)

    def plots(self, out_dir: Path) -> None:
        cfg = self.cfg
        method = "joint" if cfg.strategy.regime == "joint" else "+".join(cfg.strategy.names()) or "finetune"
        self.draw(out_dir, f"{method} on {cfg.scenario.name} (seed {cfg.seed})")

    def draw(self, out_dir: Path, title: str) -> list[Path]:
        """``pq_per_class.png`` (PQ per class after every step) and ``samples.png`` (test images,
        ground truth of the seen classes, predictions of the final model)."""
        from ..panoptic.visualize import pq_per_class_chart

        paths = []
        if self.records:
            per = {f"after step {r['step']}": r["pq_per_class"] for r in self.records}
            names = self.scenario.class_names
            per = {k: {n: v.get(n) for n in names} for k, v in per.items()}
            paths.append(pq_per_class_chart(per, out_dir / "pq_per_class.png", title))
        if self.cfg.sample_images:
            paths.append(self.draw_samples(out_dir / "samples.png", title))
        return paths

    @torch.no_grad()
    def draw_samples(self, path: Path, title: str) -> Path:
        from ..panoptic.coco import collate_panoptic
        from ..panoptic.inference import panoptic_inference
        from ..panoptic.pq import target_category_instance_map
        from ..panoptic.visualize import sample_grid

        sc = self.scenario
        model = self.trainer.model
        n = int(model.n_classes)
        k = min(self.cfg.sample_images, len(sc.test))
        images, targets, _ = collate_panoptic([sc.test.samples[i] for i in range(k)])
        was = model.training
        model.eval()
        out = model(images.to(self.trainer.device))
        model.train(was)
        inf = self.cfg.inference
        preds = panoptic_inference(out, tuple(images.shape[-2:]), [c for c in sc.thing_classes if c < n],
                                   inf.object_threshold, inf.overlap_threshold, inf.mask_threshold)
        gts = []
        for t in targets:
            g = target_category_instance_map(t)
            g[g[..., 0] >= n, 0] = -1
            gts.append(g)
        return sample_grid(images, [("ground truth", gts), ("prediction", [p.category_instance_map() for p in preds])],
                           sc.class_names[:n], path, title)


def format_report(results: dict[str, Any]) -> str:
    def f(v: Any) -> str:
        return "   -  " if v is None else f"{v:6.3f}"

    lines = ["step  classes                              PQ old  PQ new  PQ all"]
    for i, names in enumerate(results["steps"]):
        lines.append(f"{i:>4}  {', '.join(names):<36} {f(results['pq_old'][i])}  {f(results['pq_new'][i])}  "
                     f"{f(results['pq_all'][i])}")
    return "\n".join(lines)


def run(cfg: Config, out_dir: Path, *, progress: bool = False, resume: bool = False) -> dict[str, Any]:
    return execute(PanopticRun(cfg, out_dir, progress=progress), out_dir, resume=resume)
