"""Metric names and eval-phase values exactly as Avalanche 0.6's evaluation plugin names them.

Why Avalanche's names: a dashboard (TensorBoard, W&B) that shows Avalanche runs then shows ours beside
them, curve for curve. The names were read from a run of Avalanche 0.6's ``EvaluationPlugin`` with
``accuracy_metrics``, ``loss_metrics``, ``forgetting_metrics``, ``bwt_metrics`` and ``timing_metrics``
on a class-incremental benchmark (no task labels, so no ``Task000`` part):

- training: ``Loss_MB/train_phase/train_stream``, ``Loss_Epoch/train_phase/train_stream``,
  ``Time_Epoch/train_phase/train_stream``;
- evaluation after each training experience: ``Top1_Acc_Exp/eval_phase/test_stream/Exp002``,
  ``Loss_Exp/...``, ``ExperienceForgetting/...``, ``ExperienceBWT/...`` per test experience, and
  ``Top1_Acc_Stream/eval_phase/test_stream``, ``Loss_Stream``, ``StreamForgetting``, ``StreamBWT``.

Definitions follow Avalanche: stream accuracy and loss are over all test samples (experiences weighted
by their size), forgetting of experience ``j`` after step ``i`` is ``R[j][j] - R[i][j]`` (accuracy just
after learning ``j`` minus now), BWT its negative. One deliberate difference: Avalanche also reports,
for the experience just trained, the gain since the evaluation before it was trained (a side effect of
evaluating the whole stream); here forgetting covers only experiences trained before the current one.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

TRAIN = "train_phase/train_stream"
EVAL = "eval_phase/test_stream"

LOSS_MB = f"Loss_MB/{TRAIN}"
LOSS_EPOCH = f"Loss_Epoch/{TRAIN}"
TIME_EPOCH = f"Time_Epoch/{TRAIN}"
ACC_STREAM = f"Top1_Acc_Stream/{EVAL}"
LOSS_STREAM = f"Loss_Stream/{EVAL}"
FORGETTING_STREAM = f"StreamForgetting/{EVAL}"
BWT_STREAM = f"StreamBWT/{EVAL}"


def exp_metric(metric: str, exp_id: int) -> str:
    """Per-experience eval name, e.g. ``exp_metric("Top1_Acc_Exp", 2)`` -> ``Top1_Acc_Exp/eval_phase/test_stream/Exp002``."""
    return f"{metric}/{EVAL}/Exp{int(exp_id):03d}"


def _weighted_mean(values: Sequence[float], weights: Sequence[float]) -> float:
    pairs = [(v, w) for v, w in zip(values, weights) if w > 0 and math.isfinite(v)]
    total = sum(w for _, w in pairs)
    return sum(v * w for v, w in pairs) / total if total else float("nan")


def eval_metrics(results: Mapping[int, Mapping[str, float]], accuracy_matrix: Sequence[Sequence[float]],
                 metric: str = "Top1_Acc") -> dict[str, float]:
    """Avalanche's eval-phase values after training step ``i = len(accuracy_matrix) - 1``.

    ``results[j]`` holds ``accuracy`` (and optionally ``loss`` and ``count``, the number of test samples)
    of test experience ``j`` now; ``accuracy_matrix`` holds the rows of every step so far, this one last
    (``R[i][j]``), which forgetting needs. Without counts, experiences weigh the same. ``metric`` names
    what ``accuracy`` is (``Top1_Acc``; a detector's ``AP``): ``<metric>_Exp`` and ``<metric>_Stream``.
    NaN entries (nothing to measure yet) are left out.
    """
    i = len(accuracy_matrix) - 1
    if i < 0:
        raise ValueError("accuracy_matrix must hold at least the current step's row")
    exps = sorted(int(j) for j in results)
    counts = [float(results[j].get("count", 1.0)) for j in exps]
    accs = [float(results[j]["accuracy"]) for j in exps]
    out: dict[str, float] = {}
    for j, acc in zip(exps, accs):
        if math.isfinite(acc):
            out[exp_metric(f"{metric}_Exp", j)] = acc
        if "loss" in results[j] and math.isfinite(float(results[j]["loss"])):
            out[exp_metric("Loss_Exp", j)] = float(results[j]["loss"])
    out[f"{metric}_Stream/{EVAL}"] = _weighted_mean(accs, counts)
    losses = [float(results[j].get("loss", float("nan"))) for j in exps]
    if any(math.isfinite(v) for v in losses):
        out[LOSS_STREAM] = _weighted_mean(losses, counts)
    R = accuracy_matrix
    forgetting = []
    for j in range(min(i, len(R[i]))):
        f = float(R[j][j]) - float(R[i][j])
        if not math.isfinite(f):
            continue
        forgetting.append(f)
        out[exp_metric("ExperienceForgetting", j)] = f
        out[exp_metric("ExperienceBWT", j)] = 0.0 - f
    out[FORGETTING_STREAM] = sum(forgetting) / len(forgetting) if forgetting else 0.0
    out[BWT_STREAM] = 0.0 - out[FORGETTING_STREAM]
    return out
