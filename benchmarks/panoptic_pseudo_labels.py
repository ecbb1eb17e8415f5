"""How good are the old model's pseudo labels? Recall and precision on the 3-2 update images.

Trains the step-0 model of ``configs/panoptic_shapes_3-2.yaml`` (or loads a panoptic package with
``--model``), runs it on the step-1 training images (annotated with the new classes only) and
compares its pseudo labels with those images' full annotations, which the generator also wrote:

- recall: old-class objects with a pseudo label of their class at IoU > 0.5;
- precision: pseudo labels that are an object of their class at IoU > 0.5;
for both places of "ground truth wins" (before or after the shrink test f), and the recall of the
old model's own panoptic inference for reference.

    .venv/bin/python benchmarks/panoptic_pseudo_labels.py --seed 0
"""
from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from incremental.config import apply_overrides, from_dict, load_yaml  # noqa: E402
from incremental.io import write_json  # noqa: E402
from incremental.runners.panoptic import Config, PanopticRun, build_scenario  # noqa: E402


@torch.no_grad()
def measure(model: torch.nn.Module, scenario: Any, data_dir: Path, before_shrink: bool) -> dict[str, Any]:
    from incremental.panoptic.coco import class_mapping, collate_panoptic, load_coco_panoptic, to_samples
    from incremental.panoptic.criterion import upsample_masks
    from incremental.panoptic.inference import panoptic_inference
    from incremental.panoptic.pseudo_labels import PseudoLabelConfig, make_pseudo_labels, mask_iou

    names = scenario.class_names
    n_old = len(scenario.step_classes[0])
    data = load_coco_panoptic(data_dir / "train_step1" / "panoptic.json")
    full = to_samples(data, class_mapping(data, names))
    step = scenario.train_stream[1].dataset
    cfg = PseudoLabelConfig(ground_truth_before_shrink=before_shrink)
    things = [c for c in scenario.thing_classes if c < n_old]
    counts: Counter = Counter()
    model.eval()
    for start in range(0, len(step), 32):
        idx = range(start, min(start + 32, len(step)))
        images, targets, _ = collate_panoptic([step.samples[i] for i in idx])
        _, full_targets, _ = collate_panoptic([full.samples[i] for i in idx])
        out = model(images)
        probs = out["pred_logits"].softmax(-1)
        inferred = panoptic_inference(out, tuple(images.shape[-2:]), things)
        for b, (target, truth) in enumerate(zip(targets, full_targets)):
            mask_probs = upsample_masks(out["pred_masks"][b], target["masks"].shape[-2:]).sigmoid()
            labels, masks = make_pseudo_labels(probs[b], mask_probs, target["masks"], n_old, cfg, scenario.stuff_classes)
            iou = mask_iou(masks, truth["masks"]) if len(labels) else torch.zeros(0, len(truth["labels"]))
            same = labels[:, None] == truth["labels"][None, :]
            hit = (iou > 0.5) & same
            inf_masks = torch.stack([inferred[b].segment_map == s["id"] for s in inferred[b].segments]) \
                if inferred[b].segments else torch.zeros(0, *truth["masks"].shape[-2:], dtype=torch.bool)
            inf_labels = torch.tensor([s["label"] for s in inferred[b].segments], dtype=torch.long)
            inf_hit = (mask_iou(inf_masks, truth["masks"]) > 0.5) & (inf_labels[:, None] == truth["labels"][None, :]) \
                if len(inf_labels) else torch.zeros(0, len(truth["labels"]), dtype=torch.bool)
            for j, c in enumerate(truth["labels"].tolist()):
                if c in things:
                    counts[(names[c], "objects")] += 1
                    counts[(names[c], "recalled")] += int(hit[:, j].any())
                    counts[(names[c], "inference_recalled")] += int(inf_hit[:, j].any())
            for k, c in enumerate(labels.tolist()):
                if c in things:
                    counts[(names[c], "pseudo")] += 1
                    counts[(names[c], "correct")] += int(hit[k].any())
    out_rows = {}
    for c in things:
        n = names[c]
        out_rows[n] = {"objects": counts[(n, "objects")], "pseudo_labels": counts[(n, "pseudo")],
                       "recall": counts[(n, "recalled")] / max(counts[(n, "objects")], 1),
                       "precision": counts[(n, "correct")] / max(counts[(n, "pseudo")], 1),
                       "inference_recall": counts[(n, "inference_recalled")] / max(counts[(n, "objects")], 1)}
    return out_rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", help="a panoptic package of a step-0 model (default: train one)")
    parser.add_argument("--data-dir", default=str(ROOT / "runs" / "panoptic_benchmark_data" / "3-2"))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "panoptic_pseudo_labels.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    data_dir = Path(args.data_dir) / f"seed{args.seed}"
    raw = apply_overrides(load_yaml(ROOT / "configs" / "panoptic_shapes_3-2.yaml"),
                          [f"seed={args.seed}", f"scenario.data_dir={data_dir}", "strategy.name=finetune", "sample_images=0"])
    cfg = from_dict(Config, raw)
    scenario = build_scenario(cfg, data_dir)
    start = time.perf_counter()
    if args.model:
        from incremental.package import load_model

        model = load_model(args.model).build()
    else:
        run = PanopticRun(cfg, data_dir, scenario=scenario)
        run.step(0)
        model = run.trainer.model
    rows = {order: measure(model, scenario, data_dir, order == "before f")
            for order in ("before f", "after f")}
    print(f"pseudo labels of the step-0 model on the {len(scenario.train_stream[1].dataset)} step-1 images "
          f"(seed {args.seed}; ground truth removed before / after the shrink test f)")
    print(f"{'class':<10}{'objects':>8}{'inference recall':>18}" + "".join(
        f"{'recall ' + o:>16}{'precision ' + o:>19}" for o in rows))
    for name in rows["before f"]:
        r = rows["before f"][name]
        line = f"{name:<10}{r['objects']:>8}{r['inference_recall']:>18.2f}"
        for o in rows:
            line += f"{rows[o][name]['recall']:>16.2f}{rows[o][name]['precision']:>19.2f}"
        print(line)
    write_json(args.out, {"command": " ".join(sys.argv), "seed": args.seed, "results": rows,
                          "wall_time_s": time.perf_counter() - start})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
