"""Per-task metrics (MAE, accuracy, landmark NME), the multi-task score delta_m%, and the accumulator
the loop's evaluation uses (``Trainer(eval_accumulator=...)``).

Every metric runs over the samples that have a label for the task (missing markers are skipped).
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch

from .tasks import TaskSpec, as_2d, label_present, per_sample_loss, safe_targets, task_specs_by_name


def mae(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(N,) mean absolute error of each sample over its values (label units)."""
    return (as_2d(pred).float() - as_2d(target).float()).abs().mean(dim=1)


def binary_correct(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(N,) 1.0 where the logit's sign matches the 0/1 label (probability > 0.5 means 1)."""
    return ((logits.reshape(-1) > 0).float() == target.reshape(-1).float()).float()


def multiclass_correct(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (logits.argmax(dim=1) == target.reshape(-1).long()).float()


def landmark_nme(pred: torch.Tensor, target: torch.Tensor, eyes: tuple[int, int] | None = (0, 1),
                 fallback: float = 1.0) -> torch.Tensor:
    """(N,) normalised mean error: mean point-to-point distance / inter-ocular distance.

    The standard face-alignment NME (300-W's inter-ocular normalisation): points are (x1, y1, x2, ...);
    ``eyes`` are the indices of the two points whose distance normalises, so the error does not depend
    on the face's size in the image. With ``eyes=None`` (or eyes on top of each other) it divides by
    ``fallback`` instead.
    """
    p = as_2d(pred).float().reshape(len(pred), -1, 2)
    t = as_2d(target).float().reshape(len(target), -1, 2)
    err = (p - t).norm(dim=2).mean(dim=1)
    if eyes is None:
        return err / fallback
    d = (t[:, eyes[0]] - t[:, eyes[1]]).norm(dim=1)
    return err / torch.where(d > 1e-6, d, torch.full_like(d, fallback))


def per_sample_metric(spec: TaskSpec, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(N,) the task's headline metric per sample (``spec.metric``); average it over labelled samples."""
    if spec.kind == "regression":
        return mae(output, target)
    if spec.kind == "binary":
        return binary_correct(output, target)
    if spec.kind == "multiclass":
        return multiclass_correct(output, target)
    return landmark_nme(output, target, spec.eyes)


def delta_m(mtl: Mapping[str, float], stl: Mapping[str, float], higher_is_better: Mapping[str, bool]) -> float:
    """Multi-task score delta_m% (Maninis et al. 2019; as reported by Nash-MTL and FAMO), LOWER is better.

    ``delta_m = 100 / K * sum_k (-1)^{d_k} (M_mtl,k - M_stl,k) / M_stl,k`` with ``d_k = 1`` when a
    higher value of metric k is better: the mean relative performance DROP of the multi-task model
    against single-task networks; negative means the multi-task model is better on average.
    """
    keys = list(stl)
    if not keys:
        raise ValueError("delta_m needs at least one task")
    missing = sorted(set(keys) - set(mtl))
    if missing:
        raise ValueError(f"delta_m: multi-task results lack tasks {missing}")
    return 100.0 * sum(relative_drop(mtl[k], stl[k], higher_is_better[k]) for k in keys) / len(keys)


def relative_drop(value: float, reference: float, higher_is_better: bool) -> float:
    """Signed relative performance drop of ``value`` against ``reference`` (positive = worse)."""
    if reference == 0:
        raise ValueError("relative difference against a reference of 0 is undefined")
    diff = (value - reference) / abs(reference)
    return -diff if higher_is_better else diff


class MultiTaskAccumulator:
    """Per-task headline metric and mean loss over an evaluation stream, labelled samples only.

    ``result()``: ``{task: {<metric>: value, "loss": mean loss, "count": labelled samples}}``; a task
    without a labelled sample gets ``nan`` values and count 0.
    """

    def __init__(self, tasks: Sequence[TaskSpec] | Mapping[str, TaskSpec]) -> None:
        self.tasks = task_specs_by_name(tasks)
        self.sums = {name: 0.0 for name in self.tasks}
        self.loss_sums = {name: 0.0 for name in self.tasks}
        self.counts = {name: 0 for name in self.tasks}

    @torch.no_grad()
    def update(self, output: Mapping[str, torch.Tensor], y: Mapping[str, torch.Tensor]) -> None:
        for name, spec in self.tasks.items():
            if name not in y:
                continue
            target = y[name]
            present = label_present(target, spec.marker)
            n = int(present.sum())
            if n == 0:
                continue
            out = output[name][present]
            tgt = safe_targets(spec, target, present)[present]
            self.sums[name] += float(per_sample_metric(spec, out, tgt).sum())
            self.loss_sums[name] += float(per_sample_loss(spec, out, tgt).sum())
            self.counts[name] += n

    def result(self) -> dict[str, dict[str, float]]:
        out: dict[str, dict[str, float]] = {}
        for name, spec in self.tasks.items():
            c = self.counts[name]
            out[name] = {
                spec.metric: self.sums[name] / c if c else float("nan"),
                "loss": self.loss_sums[name] / c if c else float("nan"),
                "count": c,
            }
        return out


def headline(results: Mapping[str, Mapping[str, float]], tasks: Sequence[TaskSpec]) -> dict[str, float]:
    """``{task: headline metric value}`` from an accumulator result."""
    return {t.name: float(results[t.name][t.metric]) for t in tasks}
