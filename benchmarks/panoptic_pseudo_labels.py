"""How good are the old model's pseudo labels, step by step, and which thresholds make them best?

The step-0 model of ``configs/panoptic_shapes_3-2.yaml`` (trained, or restored from the benchmark
cache, see ``panoptic_cache.py``) labels old-class objects in images annotated for the new classes
only. The generator also writes those images' full annotations, so every candidate can be checked:

- recall: old-class objects (things) with a candidate of their class at IoU > 0.5;
- precision: candidates that are an object of their class at IoU > 0.5;
- on new: candidates lying mostly (> 50% of their pixels) on a new-class object, the confusion that
  teaches the new model an old class for a new object;

after each step of METHODS 3.3 (``pseudo_label_stages``: a+c, b, d, f) and, for reference, for the
old model's own panoptic inference. One threshold setting is chosen on the *validation* splits of
all seeds together (images drawn like the update's, ``val_step1``, never trained on) by F1 of the
final pseudo labels (coordinate ascent from the defaults); it is then measured per seed, also on the
update's training images.

    .venv/bin/python benchmarks/panoptic_pseudo_labels.py --seeds 0 1 2
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from incremental.config import apply_overrides, load_yaml  # noqa: E402
from incremental.io import write_json  # noqa: E402
from incremental.panoptic.pseudo_labels import PseudoLabelConfig  # noqa: E402
from incremental.runners.panoptic import Config, PanopticRun, build_scenario, config_from  # noqa: E402
from panoptic_cache import DEFAULT_CACHE, base_key, cached_steps  # noqa: E402

STAGES = ["a", "b", "d", "f"]
# coordinates of the search; the claim test and its threshold move together
GRID: dict[tuple[str, ...], list[tuple[Any, ...]]] = {
    ("score_threshold",): [(0.0,), (0.3,), (0.5,), (0.7,)],
    ("mask_threshold",): [(0.3,), (0.4,), (0.5,), (0.6,), (0.7,)],
    ("claim", "iou_threshold"): [(c, t) for c in ("iou", "ioa") for t in (0.3, 0.5, 0.7)],
    ("min_keep_fraction",): [(0.3,), (0.5,), (0.65,), (0.8,)],
    ("ground_truth_before_shrink",): [(True,), (False,)],
}
PASSES = 2
VAL_IMAGES = 160


@dataclasses.dataclass
class Prediction:
    """The old model's output on one image, and that image's step and full annotations."""

    class_probs: torch.Tensor
    mask_probs: torch.Tensor
    step_masks: torch.Tensor
    truth_labels: torch.Tensor
    truth_masks: torch.Tensor
    inferred: tuple[torch.Tensor, torch.Tensor]  # panoptic inference: (labels, masks)


@torch.no_grad()
def predict(model: torch.nn.Module, step_samples: Any, full_samples: Any, things: list[int]) -> list[Prediction]:
    from incremental.panoptic.coco import collate_panoptic
    from incremental.panoptic.criterion import upsample_masks
    from incremental.panoptic.inference import panoptic_inference

    model.eval()
    out: list[Prediction] = []
    for start in range(0, len(step_samples), 32):
        idx = range(start, min(start + 32, len(step_samples)))
        images, targets, _ = collate_panoptic([step_samples.samples[i] for i in idx])
        _, truths, _ = collate_panoptic([full_samples.samples[i] for i in idx])
        raw = model(images)
        probs = raw["pred_logits"].softmax(-1)
        inferred = panoptic_inference(raw, tuple(images.shape[-2:]), things)
        for b, (target, truth) in enumerate(zip(targets, truths)):
            masks = upsample_masks(raw["pred_masks"][b], target["masks"].shape[-2:]).sigmoid()
            segs = inferred[b].segments
            inf_masks = torch.stack([inferred[b].segment_map == s["id"] for s in segs]) if segs \
                else torch.zeros(0, *target["masks"].shape[-2:], dtype=torch.bool)
            inf_labels = torch.tensor([s["label"] for s in segs], dtype=torch.long)
            out.append(Prediction(probs[b], masks, target["masks"].bool(), truth["labels"], truth["masks"].bool(),
                                  (inf_labels, inf_masks)))
    return out


def score(labels: torch.Tensor, masks: torch.Tensor, p: Prediction, things: set[int], new: set[int],
          counts: Counter, prefix: str) -> None:
    """Add one image's object counts for candidates (labels, masks) under ``prefix``."""
    from incremental.panoptic.pseudo_labels import mask_ioa, mask_iou

    truth_thing = torch.tensor([int(c) in things for c in p.truth_labels.tolist()], dtype=torch.bool)
    cand_thing = torch.tensor([int(c) in things for c in labels.tolist()], dtype=torch.bool)
    if len(labels):
        hit = (mask_iou(masks, p.truth_masks) > 0.5) & (labels[:, None] == p.truth_labels[None, :])
    else:
        hit = torch.zeros(0, len(p.truth_labels), dtype=torch.bool)
    counts[prefix + "objects"] += int(truth_thing.sum())
    counts[prefix + "recalled"] += int((hit.any(0) & truth_thing).sum())
    counts[prefix + "candidates"] += int(cand_thing.sum())
    counts[prefix + "correct"] += int((hit.any(1) & cand_thing).sum())
    new_obj = torch.tensor([int(c) in new for c in p.truth_labels.tolist()], dtype=torch.bool)
    if len(labels) and bool(new_obj.any()):
        on_new = (mask_ioa(masks, p.truth_masks[new_obj]) > 0.5).any(-1)
        counts[prefix + "on_new"] += int((on_new & cand_thing).sum())


def rates(counts: Counter, prefix: str = "") -> dict[str, float]:
    recall = counts[prefix + "recalled"] / max(counts[prefix + "objects"], 1)
    precision = counts[prefix + "correct"] / max(counts[prefix + "candidates"], 1)
    return {"objects": counts[prefix + "objects"], "candidates": counts[prefix + "candidates"],
            "recall": recall, "precision": precision,
            "f1": 2 * recall * precision / max(recall + precision, 1e-9),
            "on_new": counts[prefix + "on_new"]}


def measure(preds: list[Prediction], cfg: PseudoLabelConfig, n_old: int, things: set[int], new: set[int],
            stuff: list[int], stages: bool = False) -> dict[str, Any]:
    """Final pseudo labels' rates (and, with ``stages``, those after every step and of inference)."""
    from incremental.panoptic.pseudo_labels import pseudo_label_stages

    counts: Counter = Counter()
    for p in preds:
        out = pseudo_label_stages(p.class_probs, p.mask_probs, p.step_masks, n_old, cfg, stuff)
        for stage in STAGES if stages else ["f"]:
            score(*out[stage], p, things, new, counts, stage + ":")
        if stages:
            score(*p.inferred, p, things, new, counts, "inference:")
    result = {"f": rates(counts, "f:")}
    if stages:
        result = {stage: rates(counts, stage + ":") for stage in [*STAGES, "inference"]}
    return result


def search(preds: list[Prediction], n_old: int, things: set[int], new: set[int], stuff: list[int]
           ) -> tuple[PseudoLabelConfig, list[dict[str, Any]]]:
    """Coordinate ascent on F1 of the final pseudo labels from the defaults: each coordinate of
    :data:`GRID` in turn set to its best value given the others, :data:`PASSES` times."""
    tried: dict[str, dict[str, Any]] = {}

    def f1(cfg: PseudoLabelConfig) -> float:
        key = repr(dataclasses.asdict(cfg))
        if key not in tried:
            tried[key] = {"config": dataclasses.asdict(cfg), **measure(preds, cfg, n_old, things, new, stuff)["f"]}
        return tried[key]["f1"]

    best = PseudoLabelConfig()
    best_f1 = f1(best)
    for _ in range(PASSES):
        for names, values in GRID.items():
            for value in values:
                cfg = dataclasses.replace(best, **dict(zip(names, value)))
                if f1(cfg) > best_f1 + 1e-9:
                    best, best_f1 = cfg, f1(cfg)
    return best, list(tried.values())


def validation_split(cfg: Config, data_dir: Path, names: list[str], n_images: int = VAL_IMAGES) -> tuple[Any, Any]:
    """``val_step1``: drawn like the update's images (new things + 0-2 old things), fully annotated;
    returns (new-class-only samples, fully annotated samples)."""
    from incremental.panoptic.coco import class_mapping, load_coco_panoptic, to_samples
    from incremental.panoptic.shapes import THING_NAMES, SplitSpec, generate_split

    steps = cfg.scenario.steps
    old_things = [n for n in steps[0] if n in THING_NAMES]
    new_things = [n for n in steps[1] if n in THING_NAMES]
    spec = SplitSpec(n_images, required=new_things, n_required=(1, 2), others=old_things, n_other=(0, 2),
                     image_size=cfg.scenario.image_size)
    data = load_coco_panoptic(generate_split(data_dir, "val_step1", spec, cfg.seed))
    cmap = class_mapping(data, names)
    step_map = {cid: c for cid, c in cmap.items() if names[c] in set(steps[1])}
    return to_samples(data, step_map), to_samples(data, cmap)


@dataclasses.dataclass
class SeedData:
    seed: int
    n_old: int
    things: set[int]
    new: set[int]
    stuff: list[int]
    val: list[Prediction]
    train: list[Prediction]


def seed_data(seed: int, args: argparse.Namespace) -> SeedData:
    """The seed's step-0 model (cached) run on its validation split and its update's training images."""
    from incremental.panoptic.coco import class_mapping, load_coco_panoptic, to_samples

    data_dir = Path(args.data_dir) / f"seed{seed}"
    raw = apply_overrides(load_yaml(ROOT / "configs" / "panoptic_shapes_3-2.yaml"),
                          [*args.set, f"seed={seed}", f"scenario.data_dir={data_dir}", "strategy.name=finetune",
                           "sample_images=0"])
    cfg = config_from(raw)
    scenario = build_scenario(cfg, data_dir)
    run = PanopticRun(cfg, data_dir, scenario=scenario)
    cached_steps(run, base_key(cfg), range(1), None if args.no_cache else Path(args.cache_dir))
    model = run.trainer.model
    names = scenario.class_names
    n_old = len(scenario.step_classes[0])
    things = {c for c in scenario.thing_classes if c < n_old}
    val_step, val_full = validation_split(cfg, data_dir, names, args.val_images)
    data = load_coco_panoptic(data_dir / "train_step1" / "panoptic.json")
    return SeedData(seed, n_old, things, set(scenario.step_classes[1]), scenario.stuff_classes,
                    predict(model, val_step, val_full, sorted(things)),
                    predict(model, scenario.train_stream[1].dataset, to_samples(data, class_mapping(data, names)),
                            sorted(things)))


def seed_results(d: SeedData, chosen: PseudoLabelConfig) -> dict[str, Any]:
    default = PseudoLabelConfig()

    def stages(preds: list[Prediction], cfg: PseudoLabelConfig) -> dict[str, Any]:
        return measure(preds, cfg, d.n_old, d.things, d.new, d.stuff, stages=True)

    return {"seed": d.seed,
            "validation": {"default": stages(d.val, default), "chosen": stages(d.val, chosen)},
            "train_step1": {"default": stages(d.train, default), "chosen": stages(d.train, chosen)}}


def print_seed(r: dict[str, Any]) -> None:
    print(f"\nseed {r['seed']} (R recall, P precision, new: candidates lying on a new-class object)")
    for split in ("validation", "train_step1"):
        for which in ("default", "chosen"):
            rows = r[split][which]
            print(f"  {split:<11} {which:<8} " + "  ".join(
                f"{s}: R {rows[s]['recall']:.2f} P {rows[s]['precision']:.2f} new {rows[s]['on_new']:>2}"
                for s in [*STAGES, "inference"]))


def mean_std(values: list[float]) -> str:
    return f"{statistics.fmean(values):.2f} ± {statistics.pstdev(values) if len(values) > 1 else 0.0:.2f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--data-dir", default=str(ROOT / "runs" / "panoptic_benchmark_data" / "3-2"))
    parser.add_argument("--cache-dir", default=str(DEFAULT_CACHE))
    parser.add_argument("--no-cache", action="store_true")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    parser.add_argument("--val-images", type=int, default=VAL_IMAGES)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "panoptic_pseudo_labels.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    start = time.perf_counter()
    data = [seed_data(seed, args) for seed in args.seeds]
    d0 = data[0]
    pooled = [p for d in data for p in d.val]  # one setting for every seed, chosen on all validation images
    chosen, tried = search(pooled, d0.n_old, d0.things, d0.new, d0.stuff)
    changed = {k: v for k, v in dataclasses.asdict(chosen).items() if v != getattr(PseudoLabelConfig(), k)}
    print(f"chosen on the validation splits of seeds {args.seeds} ({len(pooled)} images): {changed or 'the defaults'}")
    results = []
    for d in data:
        results.append(seed_results(d, chosen))
        print_seed(results[-1])
    print(f"\nfinal pseudo labels, {len(results)} seed(s), mean ± std (things; recall / precision / on new objects)")
    for split in ("validation", "train_step1"):
        for which in ("default", "chosen"):
            f = [r[split][which]["f"] for r in results]
            print(f"  {split:<11} {which:<8} recall {mean_std([x['recall'] for x in f])}  "
                  f"precision {mean_std([x['precision'] for x in f])}  on new {mean_std([x['on_new'] for x in f])}")
    write_json(args.out, {"command": " ".join(sys.argv), "chosen": dataclasses.asdict(chosen), "search": tried,
                          "seeds": results, "wall_time_s": time.perf_counter() - start})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
