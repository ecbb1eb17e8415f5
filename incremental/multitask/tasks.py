"""Task declarations for multi-task models: what a head predicts, how it is scored, how "missing" looks.

A :class:`TaskSpec` is the one place that says, for a task, its type (regression, binary, multi-class,
points), its output size, its per-sample loss, its missing-label marker and its headline metric. The
model builds its heads from specs, the loss weighting reads the markers, the metrics read the types.

Labels travel as a dict ``{task name: tensor}`` (the loop slices every tensor of the dict). Avalanche's
template calls ``.to(device)`` on every element of a minibatch, which a plain dict does not have, so
data sets handed to Avalanche return a :class:`LabelDict` (a dict with ``.to``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Mapping, Sequence

import torch
from torch.nn import functional as F

from .weighting import masked_task_mean

TaskKind = Literal["regression", "binary", "multiclass", "points"]
KINDS: tuple[str, ...] = ("regression", "binary", "multiclass", "points")
REGRESSION_LOSSES: tuple[str, ...] = ("mse", "l1", "smooth_l1")


@dataclass(frozen=True)
class TaskSpec:
    """One task of a multi-task model.

    ``dim``: outputs of the head (regression: number of values; binary: 1; multi-class: number of
    classes; points: 2 x number of points, as x1, y1, x2, y2, ...). ``marker``: the label value that
    means "no ground truth" (NaN is allowed and matched with ``isnan``). ``offset`` / ``scale``: the
    head predicts ``offset + scale * z`` so that a head initialised near 0 starts near the label mean
    (regression and points only; the loss stays in label units, so loss scales still differ between
    tasks). ``eyes``: for points, the two point indices whose distance normalises the NME.
    """

    name: str
    kind: TaskKind
    dim: int = 1
    loss: str = "mse"
    marker: float = -1.0
    offset: tuple[float, ...] = ()
    scale: tuple[float, ...] = ()
    eyes: tuple[int, int] | None = (0, 1)
    class_names: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"task {self.name!r}: kind must be one of {list(KINDS)}, got {self.kind!r}")
        if self.dim < 1:
            raise ValueError(f"task {self.name!r}: dim must be >= 1, got {self.dim}")
        if self.kind == "binary" and self.dim != 1:
            raise ValueError(f"task {self.name!r}: a binary task has dim 1, got {self.dim}")
        if self.kind == "multiclass" and self.dim < 2:
            raise ValueError(f"task {self.name!r}: a multi-class task needs dim >= 2 classes, got {self.dim}")
        if self.kind == "points" and self.dim % 2:
            raise ValueError(f"task {self.name!r}: points need an even dim (x, y per point), got {self.dim}")
        if self.kind in ("regression", "points") and self.loss not in REGRESSION_LOSSES:
            raise ValueError(f"task {self.name!r}: loss must be one of {list(REGRESSION_LOSSES)}, got {self.loss!r}")
        for attr in ("offset", "scale"):
            value = getattr(self, attr)
            if value and len(value) != self.dim:
                raise ValueError(f"task {self.name!r}: {attr} has {len(value)} values, the head has dim {self.dim}")

    @property
    def is_classification(self) -> bool:
        return self.kind in ("binary", "multiclass")

    @property
    def metric(self) -> str:
        """Headline metric: MAE (regression), accuracy (binary / multi-class), NME (points)."""
        return {"regression": "mae", "binary": "accuracy", "multiclass": "accuracy", "points": "nme"}[self.kind]

    @property
    def higher_is_better(self) -> bool:
        return self.metric == "accuracy"

    def with_scaling(self, offset: Sequence[float], scale: Sequence[float]) -> "TaskSpec":
        return replace(self, offset=tuple(float(v) for v in offset), scale=tuple(float(v) for v in scale))


class LabelDict(dict):
    """A ``{task: tensor}`` dict with ``.to(device)``, so Avalanche's minibatch unpacking can move it."""

    def to(self, device: Any, non_blocking: bool = False) -> "LabelDict":
        return LabelDict({k: v.to(device, non_blocking=non_blocking) for k, v in self.items()})


def as_2d(values: torch.Tensor) -> torch.Tensor:
    """Labels or outputs as (N, dim): a (N,) tensor becomes (N, 1)."""
    if values.dim() == 1:
        return values.unsqueeze(1)
    return values.reshape(len(values), -1) if len(values) else values.reshape(0, *values.shape[1:]).flatten(1)


def label_present(labels: torch.Tensor, marker: float) -> torch.Tensor:
    """(N,) bool: True where sample i has a label for this task (formula 10's lm for one task).

    A multi-value label (landmarks, pose) counts as missing when ANY of its values is the marker: a
    half-annotated label must never pull a prediction towards the marker value. ``marker = nan``
    matches NaN labels.
    """
    values = as_2d(labels).float()
    hit = torch.isnan(values) if math.isnan(marker) else values == marker
    return ~hit.any(dim=1)


def per_sample_loss(spec: TaskSpec, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(N,) loss of each sample for one task; targets must already be valid (no markers).

    Regression and points: ``spec.loss`` averaged over the values of a sample (label units, so a task
    in degrees has a larger loss than one in [0, 1]: the scale imbalance weighting has to handle).
    Binary: BCE on the logit. Multi-class: cross-entropy.
    """
    if spec.kind == "binary":
        return F.binary_cross_entropy_with_logits(output.reshape(-1), target.reshape(-1).float(), reduction="none")
    if spec.kind == "multiclass":
        return F.cross_entropy(output, target.reshape(-1).long(), reduction="none")
    out, tgt = as_2d(output), as_2d(target).float()
    if spec.loss == "l1":
        per = (out - tgt).abs()
    elif spec.loss == "smooth_l1":
        per = F.smooth_l1_loss(out, tgt, reduction="none")
    else:
        per = (out - tgt) ** 2
    return per.mean(dim=1)


def safe_targets(spec: TaskSpec, target: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """Targets with missing entries replaced by a harmless valid value (0 / class 0).

    Masking by multiplication is not enough: a marker (-1) fed to cross-entropy is an index error, and
    0 * inf or 0 * nan in a loss or its gradient is nan. The masked-out entries get a valid target
    first, then their loss is dropped with ``torch.where``.
    """
    if bool(present.all()):
        return target
    fill = torch.zeros((), dtype=target.dtype, device=target.device)
    shape = (-1,) + (1,) * (target.dim() - 1)
    return torch.where(present.reshape(shape), target, fill)


def masked_task_losses(specs: Mapping[str, TaskSpec], output: Mapping[str, torch.Tensor],
                       y: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-task losses (K,) in ``specs`` order, each the mean over the samples labelled for the task
    (formula 10; a task without a label in the batch gives exactly 0), and the label counts (K,).

    Entries of unlabelled samples get a valid dummy target before the loss and are dropped with
    ``torch.where``, so a marker can be neither an index error nor a ``0 * nan``.
    """
    if not isinstance(output, Mapping):
        raise TypeError(f"the model must return a dict {{task: output}}, got {type(output).__name__}")
    if not isinstance(y, Mapping):
        raise TypeError(f"labels must be a dict {{task: tensor}}, got {type(y).__name__}")
    losses, counts = [], []
    for name, spec in specs.items():
        if name not in output:
            raise KeyError(f"the model's output has no task {name!r} (it has {sorted(output)})")
        if name not in y:
            raise KeyError(f"the labels have no task {name!r} (they have {sorted(y)})")
        present = label_present(y[name], spec.marker)
        per = per_sample_loss(spec, output[name], safe_targets(spec, y[name], present))
        losses.append(masked_task_mean(per, present))
        counts.append(present.sum())
    return torch.stack(losses), torch.stack(counts)


def task_loss_terms(specs: Sequence[TaskSpec] | Mapping[str, TaskSpec], output: Mapping[str, torch.Tensor],
                    y: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A multi-task criterion that returns named loss terms: ``{task: masked mean loss}`` for every task
    with at least one label in the batch (a task without labels is left out, not a 0 that would pull
    its period mean down). Their sum is the plain, unweighted multi-task loss; a loop that exposes the
    terms as ``strategy.loss_terms`` lets ``DynamicLossWeightingPlugin`` weight them."""
    by_name = task_specs_by_name(specs)
    losses, counts = masked_task_losses(by_name, output, y)
    return {name: losses[i] for i, name in enumerate(by_name) if int(counts[i]) > 0}


def task_specs_by_name(tasks: Sequence[TaskSpec] | Mapping[str, TaskSpec]) -> dict[str, TaskSpec]:
    """Specs as an ordered ``{name: spec}`` dict (accepts a list or a dict); names must be unique."""
    if isinstance(tasks, Mapping):
        return dict(tasks)
    out: dict[str, TaskSpec] = {}
    for spec in tasks:
        if spec.name in out:
            raise ValueError(f"task name {spec.name!r} is declared twice")
        out[spec.name] = spec
    return out


def fit_output_scaling(tasks: Sequence[TaskSpec], labels: Mapping[str, torch.Tensor]) -> list[TaskSpec]:
    """Specs with ``offset`` / ``scale`` set to the mean / std of the labelled training values.

    Regression and points only (classification heads output logits). Without it a head starting at 0
    needs thousands of steps just to reach an age of 40 years; with it every head starts at the label
    mean and the trunk sees comparable early gradients per unit of label spread.
    """
    out = []
    for spec in tasks:
        if spec.kind not in ("regression", "points") or spec.name not in labels:
            out.append(spec)
            continue
        values = as_2d(labels[spec.name]).float()
        values = values[label_present(values, spec.marker)]
        if len(values) < 2:
            out.append(spec)
            continue
        mean = values.mean(dim=0)
        std = values.std(dim=0).clamp_min(1e-6)
        out.append(spec.with_scaling(mean.tolist(), std.tolist()))
    return out


def fully_labelled(labels: Mapping[str, torch.Tensor], tasks: Sequence[TaskSpec]) -> torch.Tensor:
    """(N,) bool: samples with a label for every task (the "drop partially labelled images" policy)."""
    keep = None
    for spec in tasks:
        present = label_present(labels[spec.name], spec.marker)
        keep = present if keep is None else keep & present
    if keep is None:
        raise ValueError("no tasks given")
    return keep


def constant_predictor_loss(spec: TaskSpec, labels: torch.Tensor) -> float:
    """The task's loss when predicting the best constant: its natural scale before any learning.

    Regression / points: the loss of predicting the label mean (MSE: the variance). Binary: the BCE
    of predicting the positive rate p, ``-(p ln p + (1-p) ln(1-p))``. Multi-class: the entropy of
    the class frequencies. Labelled samples only.
    """
    values = labels[label_present(labels, spec.marker)]
    if len(values) == 0:
        raise ValueError(f"task {spec.name!r} has no labelled sample")
    if spec.kind == "binary":
        p = float(values.float().mean())
        return -sum(q * math.log(q) for q in (p, 1 - p) if q > 0)
    if spec.kind == "multiclass":
        freq = torch.bincount(values.reshape(-1).long(), minlength=spec.dim).double() / len(values)
        return float(-(freq[freq > 0] * freq[freq > 0].log()).sum())
    v = as_2d(values).float()
    return float(per_sample_loss(spec, v.mean(dim=0, keepdim=True).expand_as(v), v).mean())
