"""All three strategies on one detector, against each alone and each pair (issue 15's showcase).

The deployed Faster R-CNN (trained once per seed on the general scene, cached) is adapted to the
transfer scene with new classes of ``configs/detection_all_three.yaml`` with every non-empty subset of
its three plugins (pseudo-label distillation ``PL``, dynamic loss weighting ``DLW``, gradient mixing
``GM``) plus plain fine-tuning, on identical data, model, optimiser and steps. Reported per method,
mean ± std over seeds, COCO AP in points: general-scene AP (old classes), transfer-scene AP of the old
and of the new classes.

    python benchmarks/detection_all_three.py [--seeds 0 1 2] [--quick] [--set KEY=VALUE ...]
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from incremental.config import apply_overrides, from_dict, load_yaml  # noqa: E402
from incremental.io import write_json  # noqa: E402
from incremental.plots import bar_chart  # noqa: E402
from incremental.runners import detection as R  # noqa: E402

SHORT = {"pseudo_label_distillation": "PL", "dynamic_loss_weighting": "DLW", "gradient_mixing": "GM"}
QUICK = ["scenario.image_size=64", "scenario.general_train=24", "scenario.general_test=8", "scenario.transfer_test=8",
         "feedback.n_images=8", "meta.epochs=2", "adapt.min_steps=4", "adapt.epochs=1", "model.width=8",
         "model.representation_size=64"]


def methods(cfg: R.Config) -> dict[str, R.Config]:
    """Fine-tuning, each plugin alone, each pair and all three, from the config's plugin entries."""
    entries = cfg.strategy.plugins
    out = {"fine-tuning": dataclasses.replace(cfg, strategy=dataclasses.replace(
        cfg.strategy, plugins=[], history=dataclasses.replace(cfg.strategy.history, mem_size=0)))}
    for k in range(1, len(entries) + 1):
        for subset in itertools.combinations(entries, k):
            uses_history = any(e["name"] == "gradient_mixing" for e in subset)
            history = dataclasses.replace(cfg.strategy.history,
                                          mem_size=cfg.strategy.history.mem_size if uses_history else 0)
            label = " + ".join(SHORT.get(e["name"], e["name"]) for e in subset)
            out[label] = dataclasses.replace(cfg, strategy=dataclasses.replace(cfg.strategy, plugins=list(subset),
                                                                              history=history))
    return out


def one_seed(seed: int, overrides: list[str], cache: Path) -> dict[str, Any]:
    torch.set_num_threads(1)
    cfg = from_dict(R.Config, apply_overrides(load_yaml(ROOT / "configs" / "detection_all_three.yaml"),
                                              [*overrides, f"seed={seed}"]))
    scenes = R.make_scenes(cfg.scenario, seed, cfg.feedback.n_images)
    t = time.perf_counter()
    meta, reused = R.load_or_train_meta(cfg, scenes, cache / f"meta_seed{seed}_{R.meta_fingerprint(cfg)}.pt")
    meta_time = 0.0 if reused else time.perf_counter() - t
    bs, old = cfg.train.eval_batch_size, scenes.old_classes
    data, counts = R.new_class_data(scenes, cfg.feedback.n_images, old)

    def measure(model: torch.nn.Module) -> dict[str, float]:
        general = R.evaluate(model, scenes.general_test, scenes.class_names, None, bs)
        transfer = R.evaluate(model, scenes.transfer_test, scenes.class_names, old, bs)
        return {"general_AP": general["AP"], "transfer_AP_old": transfer.get("AP_old"),
                "transfer_AP_new": transfer.get("AP_new"), "transfer_AP": transfer["AP"]}

    out: dict[str, Any] = {"before": measure(meta), "meta_time_s": meta_time, "counts": counts["counts"], "methods": {}}
    for label, c in methods(cfg).items():
        t = time.perf_counter()
        model, info = R.adapt(c, meta, data, scenes)
        wall = time.perf_counter() - t
        row = {**measure(model), "adapt_time_s": wall, "steps": info["steps"],
               "loss_weights": info.get("loss_weights")}
        out["methods"][label] = row
        print(f"[seed {seed}] {label:<14} general AP {row['general_AP']:5.1f}  transfer AP old "
              f"{row['transfer_AP_old']:5.1f} new {row['transfer_AP_new']:5.1f}  ({wall:.0f} s)", flush=True)
    return out


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a smoke run, not a measurement)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "detection_all_three.json")
    parser.add_argument("--cache", type=Path, default=ROOT / "runs" / "detection_cache")
    args = parser.parse_args()
    overrides = (QUICK if args.quick else []) + args.set
    per_seed = {s: one_seed(s, overrides, args.cache) for s in args.seeds}
    labels = list(per_seed[args.seeds[0]]["methods"])
    keys = ("general_AP", "transfer_AP_old", "transfer_AP_new")
    table = {}
    for label in labels:
        table[label] = {}
        for key in keys:
            m, sd = mean_std([per_seed[s]["methods"][label][key] for s in args.seeds])
            table[label][key], table[label][key + "_std"] = m, sd
    before = {key: mean_std([per_seed[s]["before"][key] for s in args.seeds if per_seed[s]["before"][key] is not None])[0]
              for key in ("general_AP", "transfer_AP_old")}
    print(f"\nbefore adaptation: general AP {before['general_AP']:.1f}, transfer AP old {before['transfer_AP_old']:.1f}")
    print(f"{'method':<16} | {'general AP':>13} | {'transfer AP old':>15} | {'transfer AP new':>15}")
    for label, row in table.items():
        print(f"{label:<16} | " + " | ".join(f"{row[k]:6.1f} ± {row[k + '_std']:4.1f}".rjust(w)
                                            for k, w in zip(keys, (13, 15, 15))))
    bar_chart({label: {"general": row["general_AP"], "transfer old": row["transfer_AP_old"],
                       "transfer new": row["transfer_AP_new"]} for label, row in table.items()},
              args.out.with_suffix(".png"), ylabel="COCO AP (points)",
              title=f"detector with new classes, {len(args.seeds)} seeds")
    write_json(args.out, {"command": " ".join(["python", "benchmarks/detection_all_three.py", *sys.argv[1:]]),
                          "seeds": args.seeds, "before": before, "table": table, "per_seed": per_seed})
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
