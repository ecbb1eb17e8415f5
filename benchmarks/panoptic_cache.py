"""Reuse of the expensive, method-independent parts of the panoptic benchmarks.

The step-0 (deployed) model and joint training do not depend on the update method being measured,
yet they are most of a seed's CPU time. Their trained weights are stored under
``runs/panoptic_cache`` keyed by everything that determines them: the config fields they read, the
seed, the torch version and the source of every module on their training path. A change to any of
these is a new key, so a cached model is always the model the command would train now; evaluation
is always recomputed; ``--no-cache`` retrains anyway.

The step-0 model of 3-2 and of 3-1-1 is the same model (same step-0 classes, images, seed and
training), so both scenarios share one entry.
"""
from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CACHE = ROOT / "runs" / "panoptic_cache"
# modules whose code decides what step-0 and joint training compute (evaluation is not cached)
SOURCES = ["incremental/panoptic/model.py", "incremental/panoptic/criterion.py", "incremental/panoptic/matcher.py",
           "incremental/panoptic/shapes.py", "incremental/panoptic/scenario.py", "incremental/panoptic/coco.py",
           "incremental/panoptic/training.py", "incremental/trainer.py", "incremental/data.py",
           "incremental/plugins.py", "incremental/runners/panoptic.py"]


def source_digest() -> str:
    digest = hashlib.sha256()
    for name in SOURCES:
        path = ROOT / name
        digest.update(name.encode())
        digest.update(path.read_bytes() if path.is_file() else b"missing")
    return digest.hexdigest()[:16]


def base_key(cfg: Any) -> str:
    """Key of the step-0 model: step-0 data, model, step-0 training, evaluation, seed."""
    s, t = cfg.scenario, cfg.train
    fields = {"seed": cfg.seed, "step0": s.steps[0], "n0": s.train_images[0], "test": s.test_images,
              "all_things": sorted(n for step in s.steps for n in step), "size": s.image_size, "name": s.name,
              "model": asdict(cfg.model),
              "train": [t.base_epochs, t.batch_size, t.lr, t.weight_decay, t.schedule, t.grad_clip, t.threads],
              "torch": str(torch.__version__), "src": source_digest()}
    return "base_" + _hash(fields)


def joint_key(cfg: Any) -> str:
    """Key of joint training: the whole scenario, model, joint training, evaluation, seed."""
    t = cfg.train
    fields = {"seed": cfg.seed, "scenario": asdict(cfg.scenario) | {"data_dir": None}, "model": asdict(cfg.model),
              "train": [t.base_epochs, t.joint_epochs, t.batch_size, t.lr, t.weight_decay, t.schedule, t.grad_clip,
                        t.threads],
              "torch": str(torch.__version__), "src": source_digest()}
    return "joint_" + _hash(fields)


def _hash(fields: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:20]


def cached_steps(run: Any, key: str, steps: range, cache_dir: Path | None) -> bool:
    """Train ``steps`` of ``run`` (a ``PanopticRun``) or restore the weights after each of them from the
    cache; either way evaluate and record every step. Returns True when the weights came from the cache."""
    import time

    from incremental.io import save_torch

    path = None if cache_dir is None else Path(cache_dir) / f"{key}.pt"
    state = torch.load(path, weights_only=False) if path is not None and path.is_file() else None
    saved: dict[str, Any] = {"steps": []}
    for k, i in enumerate(steps):
        start = time.perf_counter()
        if state is not None:
            weights = state["steps"][k]
            if int(run.trainer.model.n_classes) != int(weights["n_classes"]):
                run.trainer.model = run.new_model(int(weights["n_classes"]))
            run.trainer.model.load_state_dict(weights["model"])
            run.trainer.classes_seen = set(weights["classes_seen"])
            run.train_time_s += weights["train_time_s"]
        else:
            run.train_step(i)
            saved["steps"].append({"model": copy.deepcopy(run.trainer.model.state_dict()),
                                   "n_classes": int(run.trainer.model.n_classes),
                                   "classes_seen": sorted(run.trainer.classes_seen),
                                   "train_time_s": time.perf_counter() - start})
            run.train_time_s += time.perf_counter() - start
            start = time.perf_counter()
        run.record(i, run.evaluate(i))
        run.train_time_s += time.perf_counter() - start
    if state is None and path is not None:
        save_torch(path, saved)
    return state is not None
