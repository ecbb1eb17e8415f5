"""Gradient mixing and pseudo labels + distillation inside Avalanche's ``ObjectDetectionTemplate``.

Part 1: a small Faster R-CNN (``incremental.detection.model.build_detector``) learns the general scene
(experience 0), then adapts to the transfer scene (experience 1) with ``GradientMixingPlugin``: the
plugin keeps its own history library of general-scene images and mixes their gradient into the
transfer gradient at every step.
Part 2: the transfer scene brings two new classes, annotated for the new classes only;
``PseudoLabelDistillationPlugin`` with the Faster R-CNN adapter labels the old classes with the frozen
model's boxes and distils its box-head probabilities.

Evaluation uses this project's COCO mAP (pycocotools): Avalanche's ``DetectionMetrics`` needs the
``lvis`` package even for COCO data, so the Avalanche evaluator here has no metrics.

    .venv/bin/python examples/avalanche_detection.py            # about 5 minutes on one core
    .venv/bin/python examples/avalanche_detection.py --quick    # seconds: tiny images, 1 epoch

Two small adaptations, both marked below, exist only until the shared code handles Avalanche's
detection batches: ``incremental.data.as_samples`` cannot read an Avalanche detection dataset (its
targets are dicts of variable-length tensors), so the gradient-mixing plugin's library is filled with
:func:`incremental.detection.avalanche.samples_from_avalanche`; and the pseudo-label plugin replaces
``mbatch[1]``, which Avalanche's detection template keeps as a tuple, so the template used here keeps
it as a list.
"""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(REPO))

from incremental.detection.avalanche import samples_from_avalanche, to_avalanche_dataset  # noqa: E402
from incremental.detection.coco import samples_from_coco  # noqa: E402
from incremental.detection.evaluation import coco_map  # noqa: E402
from incremental.detection.model import build_detector, frozen_copy, predict  # noqa: E402
from incremental.detection.scenes import ALL_CLASSES, NEW_CLASSES, OLD_CLASSES, generate_scene  # noqa: E402


def scene_data(scene: str, n: int, split: str, size: int, seed: int, classes: list[str], drop_old: bool = False) -> Any:
    s = generate_scene(scene, n, seed, split=split, image_size=size, classes=classes)
    data = samples_from_coco(s.coco, {im["id"]: a for im, a in zip(s.coco["images"], s.images)}, ALL_CLASSES)
    if drop_old:  # new-class annotations only: old-class objects stay in the images, unlabelled
        n_old = len(OLD_CLASSES)
        data.samples.samples = [(x, {**t, "boxes": t["boxes"][t["labels"] > n_old], "labels": t["labels"][t["labels"] > n_old]}, k)
                                for x, t, k in data.samples.samples]
    return data


def ap(model: torch.nn.Module, data: Any, names: list[str], old: list[str] | None = None) -> dict[str, Any]:
    r = coco_map(data.targets, predict(model, data.images()), names, old)
    return {k: r[k] for k in ("AP", "AP50", "AP_old", "AP_new") if k in r}


def make_gradient_mixing_plugin(mem_size: int) -> Any:
    from strategies.gradient_mixing import GradientMixingPlugin

    class AvalancheDetectionGradientMixing(GradientMixingPlugin):
        # adaptation 1 (see the module docstring): fill the library from the Avalanche detection
        # dataset with our reader instead of incremental.data.as_samples
        def after_training_exp(self, strategy: Any, **kwargs: Any) -> None:
            self._own_library().update(samples_from_avalanche(strategy.experience.dataset), strategy=strategy)

    # the classifier defaults (DER logits, herding on features) need a classifier's logits: detection mixes plainly
    return AvalancheDetectionGradientMixing(rule="similarity", mem_size=mem_size, storage_policy="reservoir")


def detection_template(model: torch.nn.Module, lr: float, batch: int, epochs: int, plugins: list[Any]) -> Any:
    from avalanche.training.plugins import EvaluationPlugin
    from avalanche.training.supervised.naive_object_detection import ObjectDetectionTemplate

    class ListBatchTemplate(ObjectDetectionTemplate):
        # adaptation 2 (see the module docstring): keep mbatch a list so plugins can replace targets
        def _unpack_minibatch(self) -> None:
            super()._unpack_minibatch()
            self.mbatch = list(self.mbatch)

    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    return ListBatchTemplate(model, optimizer, train_mb_size=batch, train_epochs=epochs, eval_mb_size=batch,
                             plugins=plugins, evaluator=EvaluationPlugin(loggers=[]))


def run(quick: bool = False, seed: int = 0, pseudo_score: float | None = None) -> dict[str, Any]:
    from avalanche.benchmarks.scenarios.dataset_scenario import benchmark_from_datasets
    from strategies.pseudo_label_distillation import PseudoLabelDistillationPlugin

    from incremental.detection.distillation import FasterRCNNAdapter, PseudoBoxConfig

    torch.set_num_threads(1)
    size, n_general, n_transfer, n_test, epochs = (64, 6, 4, 4, 1) if quick else (128, 160, 40, 40, 8)
    score = pseudo_score if pseudo_score is not None else (0.2 if quick else 0.5)
    general = scene_data("general", n_general, "train", size, seed, OLD_CLASSES)
    transfer = scene_data("transfer", n_transfer, "pool", size, seed, OLD_CLASSES)
    general_test = scene_data("general", n_test, "test", size, seed, OLD_CLASSES)
    transfer_test = scene_data("transfer", n_test, "test", size, seed, OLD_CLASSES)
    bench = benchmark_from_datasets(train=[to_avalanche_dataset(general), to_avalanche_dataset(transfer)])

    torch.manual_seed(seed)
    model = build_detector(num_classes=len(OLD_CLASSES), image_size=size, **({"width": 8, "representation_size": 32} if quick else {}))
    gm = make_gradient_mixing_plugin(mem_size=64)
    strategy = detection_template(model, 0.02, 4 if quick else 8, epochs, [gm])
    results: dict[str, Any] = {"part1": {}, "part2": {}}
    for exp in bench.train_stream:
        strategy.train(exp)
        results["part1"][f"after_exp{exp.current_experience}"] = {
            "general": ap(strategy.model, general_test, OLD_CLASSES), "transfer": ap(strategy.model, transfer_test, OLD_CLASSES)}
    results["part1"]["gradient_mixing"] = gm.summary().get(1, {})

    # Part 2: new classes, annotated for the new classes only
    new_train = scene_data("transfer", n_transfer, "pool", size, seed + 1, ALL_CLASSES, drop_old=True)
    new_test = scene_data("transfer", n_test, "test", size, seed + 1, ALL_CLASSES)
    before = ap(strategy.model, new_test, ALL_CLASSES, OLD_CLASSES)
    old_model = frozen_copy(strategy.model)
    plugin = PseudoLabelDistillationPlugin(old_model, adapter=FasterRCNNAdapter(PseudoBoxConfig(score=score)))
    model2 = strategy.model
    model2.roi_heads.box_predictor.grow_to(len(ALL_CLASSES) + 1)  # Avalanche's model adaptation does not know this head
    strategy2 = detection_template(model2, 0.01, 4 if quick else 8, epochs, [plugin])
    strategy2.train(benchmark_from_datasets(train=[to_avalanche_dataset(new_train)]).train_stream[0])
    plugin.adapter.close()
    results["part2"] = {"before": before, "after": ap(strategy2.model, new_test, ALL_CLASSES, OLD_CLASSES),
                        "plugin": plugin.summary(), "pseudo_labels": plugin.stats["pseudo_labels"],
                        "distillation_steps": plugin.stats["iterations"]}
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny images and data, 1 epoch")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pseudo-score", type=float, default=None, help="score of an old box to become a pseudo label")
    args = parser.parse_args(argv)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = run(args.quick, args.seed, args.pseudo_score)
    print("part 1: general scene, then transfer scene with GradientMixingPlugin (COCO AP, points)")
    for key, row in r["part1"].items():
        if key.startswith("after"):
            print(f"  {key}: general AP {row['general']['AP']:.1f}  transfer AP {row['transfer']['AP']:.1f}")
    gm = r["part1"]["gradient_mixing"]
    if gm:
        print(f"  gradient mixing on experience 1: {gm['iterations']} steps, {100 * gm['conflict_fraction']:.0f}% conflicting")
    p2 = r["part2"]
    print(f"part 2: new classes {', '.join(NEW_CLASSES)} with PseudoLabelDistillationPlugin "
          f"({p2['pseudo_labels']} pseudo boxes)")
    for when in ("before", "after"):
        row = p2[when]
        print(f"  {when}: transfer AP old {row['AP_old'] or 0:.1f}  new {row['AP_new'] or 0:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
