"""Class-incremental panoptic scenarios: old classes first, then new classes in one or more steps.

Model class indices follow the step order (step 0's classes are 0..n0-1, step 1's come next, ...),
so a head that grows by appending classes never renumbers. In step t the training annotations hold
only step t's classes, although the images may show objects of earlier classes (unlabelled, i.e.
void): exactly the situation of updating a deployed model with new-class annotations only. The
joint stream (the upper bound) has, at step t, every image of steps 0..t annotated with every class
seen so far. The test set is fully annotated; evaluation after step t treats later classes as void.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ..data import Experience, ListSamples
from .coco import PanopticData, class_mapping, load_coco_panoptic, to_samples
from .shapes import THING_NAMES, SplitSpec, generate_split


@dataclass
class PanopticScenario:
    class_names: list[str]
    thing_classes: list[int]
    step_classes: list[list[int]]
    train_stream: list[Experience]
    joint_stream: list[Experience]
    test: ListSamples

    @property
    def stuff_classes(self) -> list[int]:
        return [c for c in range(len(self.class_names)) if c not in set(self.thing_classes)]

    def seen_after(self, step: int) -> list[int]:
        return [c for s in self.step_classes[: step + 1] for c in s]

    def test_experience(self, step: int) -> Experience:
        return Experience(self.test, step, self.seen_after(step))


def _index_steps(steps: Sequence[Sequence[str]]) -> tuple[list[str], list[list[int]]]:
    names = [n for step in steps for n in step]
    if len(set(names)) != len(names):
        raise ValueError(f"a class appears in more than one step: {names}")
    step_classes, k = [], 0
    for step in steps:
        step_classes.append(list(range(k, k + len(step))))
        k += len(step)
    return names, step_classes


def _streams(per_step_data: list[PanopticData], per_step_ids: list[list[int] | None], names: list[str],
             step_classes: list[list[int]], cmap: dict[int, int]) -> tuple[list[Experience], list[Experience]]:
    """Train stream (step annotations only) and joint stream (everything seen, all images so far)."""
    train, joint = [], []
    for t, classes in enumerate(step_classes):
        step_map = {cid: c for cid, c in cmap.items() if c in set(classes)}
        train.append(Experience(to_samples(per_step_data[t], step_map, per_step_ids[t]), t, list(classes)))
        seen = [c for s in step_classes[: t + 1] for c in s]
        seen_map = {cid: c for cid, c in cmap.items() if c in set(seen)}
        union = None
        for u in range(t + 1):
            part = to_samples(per_step_data[u], seen_map, per_step_ids[u])
            union = part if union is None else union.concat(part)
        joint.append(Experience(union, t, list(seen), classes_seen_so_far=list(seen)))
    return train, joint


def shapes_scenario(root: str | Path, steps: Sequence[Sequence[str]], train_images: Sequence[int], test_images: int,
                    image_size: int, seed: int) -> PanopticScenario:
    """Generated scenes: step 0 images show step 0's things only (1-3 each); step t > 0 images show
    1-2 objects of step t's classes and 0-2 objects of earlier classes; the test images show 2-4
    objects of any class. Every image has the stuff background."""
    names, step_classes = _index_steps(steps)
    if len(train_images) != len(steps):
        raise ValueError(f"train_images has {len(train_images)} entries for {len(steps)} steps")
    things_of = [[n for n in step if n in THING_NAMES] for step in steps]
    if not things_of[0]:
        raise ValueError("step 0 must contain at least one thing class")
    datas, ids = [], []
    for t in range(len(steps)):
        earlier = [n for s in things_of[:t] for n in s]
        if t == 0:
            spec = SplitSpec(train_images[t], required=things_of[0], n_required=(1, 3), image_size=image_size)
        else:
            spec = SplitSpec(train_images[t], required=things_of[t] or earlier, n_required=(1, 2) if things_of[t] else (0, 0),
                             others=earlier, n_other=(0, 2), image_size=image_size)
        datas.append(load_coco_panoptic(generate_split(root, f"train_step{t}", spec, seed)))
        ids.append(None)
    all_things = [n for s in things_of for n in s]
    test_spec = SplitSpec(test_images, required=all_things, n_required=(2, 4), image_size=image_size)
    test_data = load_coco_panoptic(generate_split(root, "test", test_spec, seed))
    cmap = class_mapping(test_data, names)
    train, joint = _streams(datas, ids, names, step_classes, cmap)
    things = [c for c, n in enumerate(names) if n in THING_NAMES]
    return PanopticScenario(names, things, step_classes, train, joint, to_samples(test_data, cmap))


def coco_scenario(train_json: str | Path, test_json: str | Path, steps: Sequence[Sequence[str]], *,
                  train_masks: str | Path | None = None, train_images_dir: str | Path | None = None,
                  test_masks: str | Path | None = None, test_images_dir: str | Path | None = None,
                  image_size: int = 64, max_images: int | None = None) -> PanopticScenario:
    """Real COCO panoptic files: a training image belongs to the last step whose classes it shows
    (so step 0 images show no later class), annotated with that step's classes only."""
    names, step_classes = _index_steps(steps)
    train = load_coco_panoptic(train_json, train_masks, train_images_dir, size=image_size, limit=max_images)
    test = load_coco_panoptic(test_json, test_masks, test_images_dir, size=image_size, limit=max_images)
    cmap = class_mapping(train, names)
    test_cmap = class_mapping(test, names)
    owner: list[list[int]] = [[] for _ in steps]
    for item in train.images:
        present = {cmap[int(s["category_id"])] for s in item.segments if int(s["category_id"]) in cmap}
        steps_present = [t for t, cls in enumerate(step_classes) if present & set(cls)]
        if steps_present:
            owner[max(steps_present)].append(item.image_id)
    for t, ids in enumerate(owner):
        if not ids:
            raise ValueError(f"{train_json}: no training image shows a class of step {t} ({steps[t]})")
    train_stream, joint = _streams([train] * len(steps), owner, names, step_classes, cmap)
    cats = train.category_by_id
    things = [cmap[cid] for cid in cmap if int(cats[cid]["isthing"])]
    return PanopticScenario(names, sorted(things), step_classes, train_stream, joint, to_samples(test, test_cmap))


def sample_counts(scenario: PanopticScenario) -> list[dict[str, int]]:
    """Images and annotated segments per training step (for reports)."""
    out = []
    for exp in scenario.train_stream:
        n_seg = sum(len(s[1]["labels"]) for s in exp.dataset.samples)
        out.append({"images": len(exp.dataset), "segments": n_seg})
    return out

