"""Mixing rules of gradient-similarity mixing (METHODS.md section 2, step B), as pure functions.

A rule turns the geometry of two flat gradients of the same parameters, the history gradient ``g_h`` and
the transfer gradient ``g_t`` (and, for MEGA, their losses), into two weights; the optimizer then steps
with ``g = w_h g_h + w_t g_t``. Everything here is float arithmetic or a tensor function with no model and
no loop, unit-tested against hand computations (tests/test_gradient_mixing_rules.py).

A rule may also say which loss the transfer gradient comes from (:data:`TRANSFER_LOSSES`): the
``*_ace`` rules take ``g_t`` from ER-ACE's asymmetric cross-entropy (:func:`asymmetric_cross_entropy`),
the combination with the strongest rehearsal baseline that measured best on Split Fashion-MNIST
(docs/gradient_mixing.md).
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

@dataclass(frozen=True)
class Geometry:
    """Dot product and squared norms of two flat gradients, as Python floats.

    Floats because the weights are a few scalar operations: doing them in Python after one transfer of
    three numbers costs less than a dozen tiny tensor kernels (measured: the tensor version was a third
    of the plugin's overhead on the benchmark MLP).
    """

    dot: float
    sq_h: float
    sq_t: float

    @property
    def norm_h(self) -> float:
        return math.sqrt(self.sq_h)

    @property
    def norm_t(self) -> float:
        return math.sqrt(self.sq_t)

    @property
    def similarity(self) -> float:
        """``s = g_h.g_t / (|g_h||g_t|)``, and 0 when either gradient is zero.

        Why 0 for a zero gradient: it has no direction, it neither agrees nor conflicts, and every rule
        then falls into its "no conflict" branch instead of dividing 0 by 0.
        """
        denom = math.sqrt(self.sq_h * self.sq_t)
        if denom <= 0.0 or not math.isfinite(denom):
            return 0.0
        return max(-1.0, min(1.0, self.dot / denom))  # rounding can leave |s| a hair above 1


def gram_matrix(stacked: torch.Tensor) -> torch.Tensor:
    """``G G^T`` of the ``(2, P)`` stack ``[g_h; g_t]``: ``[[|g_h|^2, g_h.g_t], [g_h.g_t, |g_t|^2]]``.

    Why one GEMM: it reads each gradient once (three separate dot products read them twice) and is one
    kernel instead of three. Half-precision gradients are upcast (squared norms overflow float16).
    """
    if stacked.dim() != 2 or stacked.shape[0] != 2:
        raise ValueError(f"expected a (2, P) stack of two flat gradients, got {tuple(stacked.shape)}")
    if stacked.dtype in (torch.float16, torch.bfloat16):
        stacked = stacked.float()
    return stacked @ stacked.T


def gradient_geometry(g_h: torch.Tensor, g_t: torch.Tensor) -> Geometry:
    """``g_h.g_t``, ``|g_h|^2`` and ``|g_t|^2`` (one GEMM, one transfer of three numbers to the host)."""
    if g_h.shape != g_t.shape or g_h.dim() != 1:
        raise ValueError(f"gradients must be flat vectors of the same length, got {tuple(g_h.shape)} and {tuple(g_t.shape)}")
    (sq_h, dot), (_, sq_t) = gram_matrix(torch.stack([g_h, g_t])).tolist()
    return Geometry(dot, sq_h, sq_t)


def _ratio(num: float, den: float) -> float:
    """``num / den``, 0 when ``den`` is 0 (only used where ``num`` is then 0 too)."""
    return num / den if den > 0.0 else 0.0


# ---- the rules: (geometry, loss_h, loss_t) -> (w_h, w_t), pure float arithmetic -------------------


def weights_sum(geo: Geometry, loss_h: float = 0.0, loss_t: float = 0.0) -> tuple[float, float]:
    """``w_h = w_t = 1``: plain sum.

    Why it is here: it is what replay does (replay averages the loss over the concatenated batch, i.e.
    this sum at half the learning rate), so it is the baseline every other rule has to beat.
    """
    return 1.0, 1.0


def weights_similarity(geo: Geometry, loss_h: float = 0.0, loss_t: float = 0.0) -> tuple[float, float]:
    """The METHODS.md default: ``w_t = 1``, ``w_h = 1 + max(0, -s) |g_t| / |g_h|``.

    Why: when the gradients agree (``s >= 0``) it is the plain sum. When they conflict, the extra
    ``max(0, -s)|g_t|/|g_h| = -g_h.g_t / |g_h|^2`` copies of ``g_h`` cancel exactly the component of ``g_t``
    that points against ``g_h``, so ``g.g_h = |g_h|^2 > 0``: to first order the history loss never rises,
    while the transfer step keeps its full size. Written as ``-dot / |g_h|^2`` it needs no norm of ``g_t``
    and is 0 (not NaN) when ``g_h`` is zero.
    """
    return 1.0 + _ratio(max(0.0, -geo.dot), geo.sq_h), 1.0


def weights_agem(geo: Geometry, loss_h: float = 0.0, loss_t: float = 0.0) -> tuple[float, float]:
    """A-GEM (Chaudhry et al., ICLR 2019): step with ``g_t``, projected when it conflicts with ``g_h``.

    ``g = g_t - max(0, -g_t.g_h)/|g_h|^2 g_h``: ``w_t = 1``, ``w_h = max(0, -s)|g_t|/|g_h|``. Why: the history
    gradient is only a constraint (``g.g_h >= 0``), never a training signal of its own, which is A-GEM's
    choice; without a conflict the history batch does not move the model at all.
    """
    return _ratio(max(0.0, -geo.dot), geo.sq_h), 1.0


def weights_pcgrad(geo: Geometry, loss_h: float = 0.0, loss_t: float = 0.0) -> tuple[float, float]:
    """PCGrad (Yu et al., NeurIPS 2020) for two tasks: on a conflict each gradient drops its component
    along the other, then the two are summed.

    With ``d = g_h.g_t < 0``: ``g_t' = g_t - d/|g_h|^2 g_h`` and ``g_h' = g_h - d/|g_t|^2 g_t``, so
    ``w_h = 1 + max(0,-d)/|g_h|^2`` and ``w_t = 1 + max(0,-d)/|g_t|^2``. Why it differs from ``similarity``:
    the history also gives way to the transfer batch (symmetric), so neither loss rises to first order,
    at the price of a longer step on conflicts.
    """
    conflict = max(0.0, -geo.dot)
    return 1.0 + _ratio(conflict, geo.sq_h), 1.0 + _ratio(conflict, geo.sq_t)


MEGA_EPS = 1e-3


def weights_mega(geo: Geometry, loss_h: float = 0.0, loss_t: float = 0.0) -> tuple[float, float]:
    """MEGA-I (Guo et al., NeurIPS 2020): loss-ratio weights ``w_t = 1``, ``w_h = loss_h / loss_t``.

    Why: the worse the model does on the history relative to the transfer batch, the more the history
    gradient counts. When the transfer loss is below ``MEGA_EPS`` (learned) MEGA-I steps on the history
    alone (``w_t = 0``, ``w_h = 1``), which also keeps the ratio finite.
    """
    if loss_t > MEGA_EPS:
        return loss_h / loss_t, 1.0
    return 1.0, 0.0


WeightRule = Callable[[Geometry, float, float], tuple[float, float]]

#: The weight functions by name.
WEIGHTS: dict[str, WeightRule] = {
    "sum": weights_sum,
    "similarity": weights_similarity,
    "agem": weights_agem,
    "pcgrad": weights_pcgrad,
    "mega": weights_mega,
}

#: Suffixes of the combined rules: ``_ace`` takes the transfer gradient from ER-ACE's asymmetric
#: cross-entropy, ``_der`` adds DER's logit replay to the history loss.
ACE_SUFFIX, DER_SUFFIX = "_ace", "_der"

#: Rules by the name used in configs (``strategy.rule``): every weight function alone and combined with
#: the asymmetric transfer loss, the logit-replay history loss, or both (``<weights>[_ace][_der]``).
RULES: dict[str, WeightRule] = {name + ace + der: fn for name, fn in WEIGHTS.items()
                                for ace in ("", ACE_SUFFIX) for der in ("", DER_SUFFIX)}

#: Which loss each rule takes the transfer gradient from: the loop's own (``"criterion"``, regularisers of
#: other plugins included) or the asymmetric cross-entropy (``"ace"``).
TRANSFER_LOSSES: dict[str, str] = {name: "ace" if ACE_SUFFIX in name else "criterion" for name in RULES}

#: Which loss each rule takes the history gradient from: the loop's criterion, or the criterion plus
#: ``logit_weight`` times the logit replay loss (``"der"``).
HISTORY_LOSSES: dict[str, str] = {name: "der" if name.endswith(DER_SUFFIX) else "criterion" for name in RULES}

#: The rule used when none is named; chosen by measurement (docs/gradient_mixing.md): the similarity weights
#: with DER's logit replay in the history loss.
DEFAULT_RULE = "similarity_der"


def is_history_weight(value: Any) -> bool:
    """A valid ``history_weight``: a finite real number > 0 (the plugin's config check uses it too)."""
    return isinstance(value, numbers.Real) and math.isfinite(value) and value > 0


def with_history_weight(rule: WeightRule, history_weight: float) -> WeightRule:
    """``rule`` applied to the history loss scaled by ``lam = history_weight``: to ``(lam g_h, g_t)``.

    The rule sees the geometry of ``lam g_h`` (``dot`` times ``lam``, ``|g_h|^2`` times ``lam^2``) and
    ``lam loss_h``; the returned ``w_h`` multiplies the unscaled ``g_h`` (``lam`` times the rule's weight).
    For ``similarity`` this gives ``w_h = lam + max(0, -g_h.g_t) / |g_h|^2``: the history's own pull is
    ``lam`` times stronger and the conflict term still removes the part of ``g_t`` that points against
    ``g_h``, so ``g.g_h >= lam |g_h|^2`` as before. Why it exists: the relative weight of the two scenes is a
    property of the scenario, not of the geometry; where both scenes share one head (digits_transfer)
    a heavier history step measured better on both (docs/gradient_mixing.md, "Transfer").
    ``history_weight`` 1 returns ``rule`` itself (bit for bit the unscaled rule).
    """
    if not is_history_weight(history_weight):
        raise ValueError(f"history_weight must be a finite number > 0, got {history_weight!r}")
    if history_weight == 1:
        return rule
    lam = float(history_weight)

    def scaled(geo: Geometry, loss_h: float = 0.0, loss_t: float = 0.0) -> tuple[float, float]:
        w_h, w_t = rule(Geometry(lam * geo.dot, lam * lam * geo.sq_h, geo.sq_t), lam * loss_h, loss_t)
        return lam * w_h, w_t

    scaled.__name__ = f"{getattr(rule, '__name__', 'rule')}_history_weight_{lam:g}"
    return scaled


def get_rule(name: str) -> WeightRule:
    if name not in RULES:
        raise ValueError(f"unknown gradient mixing rule {name!r}; known: {', '.join(RULES)}")
    return RULES[name]


def asymmetric_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """ER-ACE's loss on new data (Caccia et al., ICLR 2022): cross-entropy over the classes present in
    the minibatch only.

    ``-log softmax(z[C])[y]`` with ``C`` the classes among ``targets``. Why: plain cross-entropy on a
    minibatch of new classes pushes every old class's logit down (the softmax normaliser runs over all
    classes), which is most of what class-incremental training forgets; restricted to the classes at
    hand, the new-data gradient no longer touches the old classes' logits, and the history gradient
    alone decides how old and new classes are told apart.
    """
    if logits.dim() != 2 or targets.dim() != 1 or len(logits) != len(targets):
        raise ValueError(f"expected (N, C) logits and (N,) targets, got {tuple(logits.shape)} and {tuple(targets.shape)}")
    present = torch.unique(targets)  # sorted
    return F.cross_entropy(logits[:, present], torch.searchsorted(present, targets))



def class_log_prior(counts: torch.Tensor, n_classes: int) -> torch.Tensor:
    """``log pi_c`` for the first ``n_classes`` classes from label counts, one pseudo-count each.

    Why the pseudo-count: a class with no sample yet (a head row grown for a class not in this
    experience's minibatches) gets a small finite prior instead of ``log 0``.
    """
    if counts.dim() != 1:
        raise ValueError(f"expected a 1-d tensor of label counts, got shape {tuple(counts.shape)}")
    smoothed = torch.ones(n_classes, dtype=torch.float32, device=counts.device)
    k = min(n_classes, len(counts))
    smoothed[:k] += counts[:k].float()
    return smoothed.log() - smoothed.sum().log()


def logit_adjusted_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, log_prior: torch.Tensor,
                                 tau: float) -> torch.Tensor:
    """Cross-entropy of ``z + tau log pi`` (logit adjustment, Menon et al., ICLR 2021; for rehearsal,
    LAS, Huang et al., 2024), ``pi`` the label frequencies of the minibatches the model trains on.

    Why: in class-incremental training the joint minibatch holds 16 samples of each new class and a few
    of each old one, so plain cross-entropy learns that prior into the logits and, at test time, calls
    old samples new. Training on prior-shifted logits lets the raw logits fit the class-balanced
    posterior instead; inference uses the raw logits. ``tau = 0`` is plain cross-entropy.
    """
    if logits.dim() != 2 or log_prior.shape != (logits.shape[1],):
        raise ValueError(f"expected (N, C) logits and a (C,) log prior, got {tuple(logits.shape)} and {tuple(log_prior.shape)}")
    return F.cross_entropy(logits + tau * log_prior.to(logits.dtype), targets)


class LogitAdjustedCrossEntropy(torch.nn.Module):
    """:func:`logit_adjusted_cross_entropy` with a fixed prior, as a criterion module."""

    def __init__(self, log_prior: torch.Tensor, tau: float) -> None:
        super().__init__()
        self.log_prior, self.tau = log_prior, float(tau)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        prior = self.log_prior
        if len(prior) != logits.shape[1]:
            raise ValueError(f"the prior covers {len(prior)} classes, the logits {logits.shape[1]}")
        return logit_adjusted_cross_entropy(logits, targets, prior, self.tau)

def logit_replay_loss(logits: torch.Tensor, stored: torch.Tensor) -> torch.Tensor:
    """DER's term: mean squared difference between the logits and the logits stored with the samples.

    Over the stored columns only (a head that grew since has more; its new rows have nothing to match).
    Why: matching the old logits replays the old function (how sure it was, and of what), which keeps
    more of it than the label alone does, at the cost of one stored vector per sample.
    """
    if logits.dim() != 2 or stored.dim() != 2 or len(logits) != len(stored):
        raise ValueError(f"expected (N, C) logits and (N, K) stored logits, got {tuple(logits.shape)} and {tuple(stored.shape)}")
    return F.mse_loss(logits[:, : stored.shape[1]], stored)


class AsymmetricCrossEntropy(torch.nn.Module):
    """:func:`asymmetric_cross_entropy` as a criterion module (what a loop's ``_criterion`` holds)."""

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return asymmetric_cross_entropy(logits, targets)


@dataclass(frozen=True)
class Mix:
    """A mixed gradient ``g = w_h g_h + w_t g_t`` and the numbers it came from."""

    grad: torch.Tensor
    w_h: float
    w_t: float
    geometry: Geometry

    @property
    def similarity(self) -> float:
        return self.geometry.similarity


def combine(g_h: torch.Tensor, g_t: torch.Tensor, w_h: float, w_t: float,
            out: torch.Tensor | None = None) -> torch.Tensor:
    """``w_h g_h + w_t g_t`` in one kernel when ``w_t = 1`` (every rule but PCGrad and learned MEGA);
    ``out`` (not overlapping the inputs) avoids allocating the result."""
    if w_t == 1.0:
        return torch.add(g_t, g_h, alpha=w_h, out=out) if out is not None else torch.add(g_t, g_h, alpha=w_h)
    result = torch.mul(g_t, w_t, out=out) if out is not None else g_t.mul(w_t)
    return result.add_(g_h, alpha=w_h)


def _as_float(value: torch.Tensor | float | None) -> float:
    if value is None:
        return 0.0
    return float(value.detach().sum()) if isinstance(value, torch.Tensor) else float(value)


def mix(rule: str | WeightRule, g_h: torch.Tensor, g_t: torch.Tensor, loss_h: torch.Tensor | float | None = None,
        loss_t: torch.Tensor | float | None = None) -> Mix:
    """Mix two flat gradients with a rule given by name or as a weight function."""
    weights = get_rule(rule) if isinstance(rule, str) else rule
    if weights is weights_mega and (loss_h is None or loss_t is None):
        raise ValueError("the 'mega' rule needs loss_h and loss_t")
    geo = gradient_geometry(g_h, g_t)
    w_h, w_t = weights(geo, _as_float(loss_h), _as_float(loss_t))
    return Mix(combine(g_h, g_t, w_h, w_t), w_h, w_t, geo)


def mix_sum(g_h: torch.Tensor, g_t: torch.Tensor, loss_h: Any = None, loss_t: Any = None) -> Mix:
    """:func:`weights_sum` applied to two flat gradients."""
    return mix("sum", g_h, g_t, loss_h, loss_t)


def mix_similarity(g_h: torch.Tensor, g_t: torch.Tensor, loss_h: Any = None, loss_t: Any = None) -> Mix:
    """:func:`weights_similarity` applied to two flat gradients."""
    return mix("similarity", g_h, g_t, loss_h, loss_t)


def mix_agem(g_h: torch.Tensor, g_t: torch.Tensor, loss_h: Any = None, loss_t: Any = None) -> Mix:
    """:func:`weights_agem` applied to two flat gradients."""
    return mix("agem", g_h, g_t, loss_h, loss_t)


def mix_pcgrad(g_h: torch.Tensor, g_t: torch.Tensor, loss_h: Any = None, loss_t: Any = None) -> Mix:
    """:func:`weights_pcgrad` applied to two flat gradients."""
    return mix("pcgrad", g_h, g_t, loss_h, loss_t)


def mix_mega(g_h: torch.Tensor, g_t: torch.Tensor, loss_h: Any = None, loss_t: Any = None) -> Mix:
    """:func:`weights_mega` applied to two flat gradients and their losses."""
    return mix("mega", g_h, g_t, loss_h, loss_t)


