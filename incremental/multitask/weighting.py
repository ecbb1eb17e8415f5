"""Multi-task loss weighting formulas (METHODS.md section 1) and the loss mask, as pure tensor functions.

Numbers in, numbers out: no state, no model. :class:`strategies.dynamic_loss_weighting.
DynamicLossWeightingPlugin` keeps the per-period history and calls these at period boundaries (the
DWA family) or every step (GradNorm, uncertainty weighting). Formula numbers refer to METHODS.md.

Conventions: ``K`` tasks, tensors of shape (K,) are in task order; ``L(t)`` is the mean loss of each
task over period ``t``. A task with no measurement in a period (no labelled sample) has loss ``nan``.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch

DWA_METHODS: tuple[str, ...] = ("dwa_ema_exp", "dwa_ema", "dwa_ratio", "dwa")
#: Loss transforms applied to each task's loss before a period-based weight multiplies it.
LOSS_SCALES: tuple[str, ...] = ("none", "initial", "previous_period", "log")
#: Scale-invariant variants (not in METHODS.md): ``name -> (weight formula, loss transform)``. The
#: weights are those of the named formula, computed from the raw losses exactly as before; only the
#: quantity they multiply changes, so tasks measured in degrees^2 and in [0, 1] weigh alike.
SCALED_METHODS: dict[str, tuple[str, str]] = {
    "dwa_ema_exp_init": ("dwa_ema_exp", "initial"),
    "dwa_ema_exp_running": ("dwa_ema_exp", "previous_period"),
    "dwa_ema_exp_log": ("dwa_ema_exp", "log"),
    "equal_init": ("equal", "initial"),
    "equal_log": ("equal", "log"),
}
METHODS: tuple[str, ...] = DWA_METHODS + ("gradnorm", "uncertainty", "equal", "fixed") + tuple(SCALED_METHODS)


def split_method(method: str) -> tuple[str, str]:
    """``(weight formula, loss transform)`` of a method name: ``dwa_ema_exp_log -> (dwa_ema_exp, log)``,
    every METHODS.md name maps to itself with no transform."""
    if method in SCALED_METHODS:
        return SCALED_METHODS[method]
    if method in METHODS:
        return method, "none"
    raise ValueError(f"unknown weighting method {method!r}; known: {', '.join(METHODS)}")


# --------------------------------------------------------------------------- loss mask (formula 10)
def marker_mask(labels: torch.Tensor, markers: float | Sequence[float] | torch.Tensor = -1.0) -> torch.Tensor:
    """(N, K) float mask from (N, K) scalar labels: 0 where the label is the task's marker, else 1.

    Formula (10)'s ``lm``: a label equal to the "no ground truth" marker contributes nothing to that
    task's loss. ``markers`` is one value for all tasks or one per task (where -1 is a real value of a
    regression target, that task gets another marker); NaN markers match NaN labels.
    """
    labels = torch.as_tensor(labels, dtype=torch.float32)
    if labels.dim() == 1:
        labels = labels.unsqueeze(0)
    k = labels.shape[1]
    m = torch.as_tensor(markers, dtype=torch.float32).reshape(-1)
    if m.numel() == 1:
        m = m.expand(k)
    if m.numel() != k:
        raise ValueError(f"got {m.numel()} markers for {k} tasks")
    missing = torch.where(torch.isnan(m), torch.isnan(labels), labels == m)
    return (~missing).float()


def masked_task_mean(per_sample: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """Mean of one task's per-sample losses over the samples that have a label for it.

    A batch with no label for the task gives exactly 0 (not 0/0 = nan), and entries of unlabelled
    samples are dropped with ``torch.where`` so that a non-finite value there cannot leak in as
    ``0 * nan``.
    """
    present = present.bool()
    count = present.sum()
    total = torch.where(present, per_sample, torch.zeros_like(per_sample)).sum()
    return total / count.clamp_min(1)


def weighted_sum(task_losses: torch.Tensor, weights: torch.Tensor, present: torch.Tensor | None = None) -> torch.Tensor:
    """Formula (9)/(10) after the per-task means: ``sum_k [task k labelled] * w_k * L_k``."""
    terms = weights * task_losses
    if present is not None:
        terms = torch.where(present.bool(), terms, torch.zeros_like(terms))
    return terms.sum()


# --------------------------------------------------------------------------- DWA family
def training_speed(loss_prev: torch.Tensor, loss_prev2: torch.Tensor) -> torch.Tensor:
    """Formula (3): ``r = L(t-1) / L(t-2)``; smaller means the task is learning faster.

    Where a task has no usable measurement (nan, or a non-positive loss in the denominator: a task
    without labels in a period, or one already at exactly 0) its speed is 1, "neither faster nor
    slower", so it neither grabs nor loses weight because of a gap in its labels.
    """
    ok = torch.isfinite(loss_prev) & torch.isfinite(loss_prev2) & (loss_prev2 > 0)
    safe_den = torch.where(ok, loss_prev2, torch.ones_like(loss_prev2))
    return torch.where(ok, loss_prev / safe_den, torch.ones_like(loss_prev))


def ratio_weights(speed: torch.Tensor) -> torch.Tensor:
    """Formulas (4) and (6): ``w_m = K * s_m / sum_k s_k`` (s = speed r or smoothed speed v).

    Slow or stuck tasks (s near 1 or above) get more weight, converging ones less; the weights sum
    to K, so the overall loss scale (and the learning rate that suits it) is that of equal weights.
    """
    k = speed.numel()
    return k * speed / speed.sum()


def softmax_weights(speed: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Formulas (7) and (8): ``w_m = K * exp(s_m / T) / sum_k exp(s_k / T)``.

    The exponential keeps every weight strictly positive (a linear ratio can reach 0 for a task whose
    loss collapsed); T = 1 is the source's form, T = 2 is DWA's (Liu et al., 2019). Computed as a
    softmax, which subtracts the maximum first so large speeds cannot overflow.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    k = speed.numel()
    return k * torch.softmax(speed / temperature, dim=0)


def ema_speed(previous: torch.Tensor | None, speed: torch.Tensor, beta: float = 0.9) -> torch.Tensor:
    """Formula (5): ``v(t-1) = beta * v(t-2) + (1 - beta) * r(t-1)``.

    One noisy period should not swing the weights; the EMA averages the speed over about
    ``1 / (1 - beta)`` periods. METHODS leaves the start open: with no previous value (the first
    dynamic period) ``v`` starts at the first measured speed, so the first dynamic weights are
    those of the unsmoothed speed rather than being pulled towards an arbitrary 0 or 1.
    """
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"beta must be in [0, 1), got {beta}")
    if previous is None:
        return speed.clone()
    return beta * previous + (1.0 - beta) * speed


def dynamic_weights(
    method: str,
    loss_prev: torch.Tensor,
    loss_prev2: torch.Tensor,
    ema_prev: torch.Tensor | None = None,
    *,
    beta: float = 0.9,
    temperature: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Weights of period t from the mean losses of periods t-1 and t-2, for the DWA family.

    Returns ``(weights, ema)``; ``ema`` is the smoothed speed to pass back next period (None for the
    methods that do not smooth). ``temperature`` defaults to 1 for ``dwa_ema_exp`` (the source's
    formula 8) and 2 for ``dwa`` (Liu et al.).

    - ``dwa_ratio``: (3) then (4);  ``dwa_ema``: (3), (5), (6);  ``dwa_ema_exp``: (3), (5), (8);
    - ``dwa``: (3) then (7) with T = 2.
    """
    r = training_speed(loss_prev, loss_prev2)
    if method == "dwa_ratio":
        return ratio_weights(r), None
    if method == "dwa":
        return softmax_weights(r, 2.0 if temperature is None else temperature), None
    if method in ("dwa_ema", "dwa_ema_exp"):
        v = ema_speed(ema_prev, r, beta)
        if method == "dwa_ema":
            return ratio_weights(v), v
        return softmax_weights(v, 1.0 if temperature is None else temperature), v
    raise ValueError(f"{method!r} is not a period-based method; known: {list(DWA_METHODS)}")


# --------------------------------------------------------------------------- scale-invariant losses
def scale_normalised(losses: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``L_k / s_k``: each task's loss in units of its own scale ``s_k`` (a constant, not differentiated).

    With ``s_k`` the task's initial loss this is "scale-invariant linear scalarisation": every term
    starts at 1, so a weight of 1.2 means the same for a loss in degrees^2 as for one in [0, 1]. A
    scale that is not a finite positive number (a task not measured yet) counts as 1.
    """
    s = scales.detach().to(losses.dtype)
    ok = torch.isfinite(s) & (s > 0)
    return losses / torch.where(ok, s, torch.ones_like(s))


def log_losses(losses: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """``log(L_k + eps)``, the loss-scale balancing of dual-balancing MTL (Lin et al., DB-MTL).

    ``grad log L = grad L / L``: every task's gradient is divided by its current loss, so a task
    contributes its *relative* improvement whatever its unit, at every step (not only at the start).
    ``eps`` keeps a loss at exactly 0 finite.
    """
    if eps <= 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    return torch.log(losses + eps)


def period_scales(initial: torch.Tensor, previous_period: torch.Tensor | None) -> torch.Tensor:
    """Scale of each task for the ``previous_period`` transform: the task's mean loss over the
    previous period where measured, else its initial loss (period 1, or a period without labels)."""
    if previous_period is None:
        return initial.clone()
    prev = previous_period.to(initial.dtype)
    ok = torch.isfinite(prev) & (prev > 0)
    return torch.where(ok, prev, initial)


def transform_losses(losses: torch.Tensor, mode: str, scales: torch.Tensor | None = None,
                     eps: float = 1e-8) -> torch.Tensor:
    """The per-task quantity a period-based weight multiplies: ``L`` (none), ``L / s`` (initial,
    previous_period: ``s`` from the caller) or ``log(L + eps)`` (log)."""
    if mode == "none":
        return losses
    if mode == "log":
        return log_losses(losses, eps)
    if mode in ("initial", "previous_period"):
        if scales is None:
            raise ValueError(f"loss transform {mode!r} needs the task scales")
        return scale_normalised(losses, scales)
    raise ValueError(f"unknown loss transform {mode!r}; known: {list(LOSS_SCALES)}")


# --------------------------------------------------------------------------- uncertainty weighting
def uncertainty_factors(is_regression: torch.Tensor) -> torch.Tensor:
    """Kendall et al.'s factor on ``exp(-s)``: 1/2 for a Gaussian (regression) likelihood, 1 for a
    softmax / Bernoulli (classification) one. With these factors a task's effective weight at the
    optimum of ``s`` is ``1 / (2 L)`` for both kinds, so the two are treated alike."""
    return torch.where(is_regression.bool(), torch.full_like(is_regression, 0.5, dtype=torch.float32),
                       torch.ones_like(is_regression, dtype=torch.float32))


def uncertainty_loss(
    task_losses: torch.Tensor, log_vars: torch.Tensor, is_regression: torch.Tensor, present: torch.Tensor | None = None
) -> torch.Tensor:
    """Kendall et al. (CVPR 2018): ``sum_k c_k * exp(-s_k) * L_k + s_k / 2`` with ``s_k = log sigma_k^2``.

    The learnable log-variance turns each task's loss into a likelihood with its own noise level, so a
    task measured in degrees and one measured in [0, 1] end up on the same scale (effective weight
    ``c_k exp(-s_k)`` goes to ``1 / (2 L_k)``); the ``s_k / 2`` term (``log sigma``) stops the weights
    from collapsing to 0. ``c_k`` from :func:`uncertainty_factors`. A task without labels in the
    batch contributes nothing (its ``s`` is not pushed around by an absent loss).
    """
    c = uncertainty_factors(is_regression).to(task_losses.device)
    terms = c * torch.exp(-log_vars) * task_losses + 0.5 * log_vars
    if present is not None:
        terms = torch.where(present.bool(), terms, torch.zeros_like(terms))
    return terms.sum()


def uncertainty_weights(log_vars: torch.Tensor, is_regression: torch.Tensor) -> torch.Tensor:
    """The effective multiplier on each task loss under uncertainty weighting: ``c_k exp(-s_k)``."""
    return uncertainty_factors(is_regression).to(log_vars.device) * torch.exp(-log_vars)


# --------------------------------------------------------------------------- GradNorm
def gradnorm_targets(
    weighted_norms: torch.Tensor, task_losses: torch.Tensor, initial_losses: torch.Tensor, alpha: float = 1.5
) -> torch.Tensor:
    """GradNorm's target norms (Chen et al., ICML 2018, eq. 2), a constant for the weight update.

    ``weighted_norms`` G_i = ||grad_W (w_i L_i)|| w.r.t. the last shared layer W. The loss ratio
    ``L_i(t) / L_i(0)`` is an inverse training rate; divided by its mean over tasks it is ``r_i``
    (> 1: the task trains slower than average). Target: ``mean_i(G_i) * r_i ** alpha``, so slow tasks
    are asked for larger gradients; alpha sets the strength of that pull.
    """
    ratio = task_losses.detach() / initial_losses.clamp_min(1e-12)
    r = ratio / ratio.mean().clamp_min(1e-12)
    return (weighted_norms.detach().mean() * r.pow(alpha)).detach()


def gradnorm_loss(weighted_norms: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """GradNorm's L_grad = ``sum_i |G_i - target_i|`` (the paper's L1 form); its gradient moves the
    task weights only (targets are constants)."""
    return (weighted_norms - targets).abs().sum()


def renormalize(weights: torch.Tensor, total: float | None = None, floor: float = 1e-3) -> torch.Tensor:
    """Weights rescaled to sum to ``total`` (default K) after a GradNorm step; each is kept at least
    ``floor`` first so that no task is switched off for good (a weight at 0 gets no gradient back)."""
    w = weights.clamp_min(floor)
    total = float(w.numel()) if total is None else total
    return w * (total / w.sum())


# --------------------------------------------------------------------------- helpers
def inverse_loss_weights(scales: torch.Tensor) -> torch.Tensor:
    """Fixed weights ``K * (1/s_k) / sum_j (1/s_j)``: every task's weighted loss starts on the same scale.

    With ``s_k`` the loss of the best constant prediction (:func:`~incremental.multitask.tasks.
    constant_predictor_loss`), this is the hand tuning that fixed weights usually stand for, done
    once from the labels: a task measured in degrees^2 no longer outweighs one in [0, 1].
    """
    if bool((scales <= 0).any()):
        raise ValueError(f"loss scales must be > 0, got {scales.tolist()}")
    inv = 1.0 / scales
    return scales.numel() * inv / inv.sum()



def fixed_weight_vector(task_names: Sequence[str], fixed: Mapping[str, float] | Sequence[float] | None) -> torch.Tensor:
    """The fixed weights as a (K,) tensor in task order; missing names default to 1."""
    k = len(task_names)
    if fixed is None:
        return torch.ones(k)
    if isinstance(fixed, Mapping):
        unknown = sorted(set(fixed) - set(task_names))
        if unknown:
            raise ValueError(f"fixed weights name unknown tasks {unknown}; tasks are {list(task_names)}")
        return torch.tensor([float(fixed.get(n, 1.0)) for n in task_names])
    values = [float(v) for v in fixed]
    if len(values) != k:
        raise ValueError(f"got {len(values)} fixed weights for {k} tasks {list(task_names)}")
    return torch.tensor(values)


