"""Gradient-similarity mixing of history and transfer gradients (METHODS.md section 2, steps B and C).

Step B. For every training (transfer) minibatch the loop also draws a history minibatch. Two gradients
of the same parameters are taken: ``g_t`` from the transfer loss (what the loop's backward produced,
regularisers included) and ``g_h`` from the history loss. A *mixing rule* turns their geometry (and,
for MEGA, their losses) into weights and the optimizer steps with ``g = w_h g_h + w_t g_t``.

Step C. When the history library is full, a new sample replaces a stored one by gradient diversity
(GSS-greedy, Aljundi et al. 2019): a sample whose gradient points where the stored samples already point
is redundant and is the one more likely to go.

Layout: the formulas are pure tensor functions at the top (unit-tested against hand computations);
:class:`GradientDiversityPolicy` is the storage policy (``incremental.buffer`` protocol), and
:class:`GradientMixingPlugin` is the thin adapter from loop callbacks to the formulas. The plugin runs in
this project's :class:`incremental.Trainer` (which hands it the history minibatch) and in a plain
Avalanche strategy such as ``avalanche.training.Naive`` (where it keeps its own history library).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from incremental.buffer import HistoryLibrary, Pool, StoragePolicy, make_policy, register_policy
from incremental.data import Batch, move_to
from incremental.plugins import Plugin

# --------------------------------------------------------------------------------------------------
# Step B: mixing rules (pure functions of two flat gradients and, for MEGA, two losses)
# --------------------------------------------------------------------------------------------------


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

#: Rules by the name used in configs (``strategy.rule``).
RULES: dict[str, WeightRule] = {
    "sum": weights_sum,
    "similarity": weights_similarity,
    "agem": weights_agem,
    "pcgrad": weights_pcgrad,
    "mega": weights_mega,
}

#: The rule used when none is named; chosen by measurement (docs/gradient_mixing.md).
DEFAULT_RULE = "similarity"


def get_rule(name: str) -> WeightRule:
    if name not in RULES:
        raise ValueError(f"unknown gradient mixing rule {name!r}; known: {', '.join(RULES)}")
    return RULES[name]


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


# --------------------------------------------------------------------------------------------------
# Flat gradients: gather once, write back once
# --------------------------------------------------------------------------------------------------


def flatten_grads(grads: Sequence[torch.Tensor | None], params: Sequence[torch.Tensor]) -> torch.Tensor:
    """One flat vector from per-parameter gradients (a ``None`` gradient counts as zeros).

    One ``torch.cat`` (a single copy); the list comprehension only collects views.
    """
    return torch.cat([g.reshape(-1) if g is not None else p.new_zeros(p.numel()) for g, p in zip(grads, params)])


def flatten_grads_into(out: torch.Tensor, grads: Sequence[torch.Tensor | None],
                       params: Sequence[torch.Tensor]) -> torch.Tensor:
    """:func:`flatten_grads` written into a preallocated ``out`` (no allocation on the hot path)."""
    return torch.cat([g.reshape(-1) if g is not None else p.new_zeros(p.numel()) for g, p in zip(grads, params)],
                     out=out)


def assign_flat_grad(params: Sequence[torch.Tensor], flat: torch.Tensor, present: Sequence[bool]) -> None:
    """Make every parameter's ``.grad`` a view into ``flat`` (no copy); ``present=False`` keeps ``None``.

    Why views: writing the mixed gradient back costs nothing (``vector_to_parameters`` would copy every
    slice, and it targets ``.data``, not ``.grad``). Why keep ``None``: optimizers skip parameters without
    a gradient; a zero gradient would still move them through momentum or weight decay.
    """
    sizes = [p.numel() for p in params]
    for p, chunk, keep in zip(params, flat.split(sizes), present):
        p.grad = chunk.view_as(p) if keep else None


# --------------------------------------------------------------------------------------------------
# Step C: gradient-diversity scores (pure functions) and the storage policy
# --------------------------------------------------------------------------------------------------


def max_cosine(candidates: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """Per candidate row, the largest cosine similarity to any reference row (GSS-greedy's score).

    Why the max: a candidate is redundant as soon as *one* stored sample already pulls the model the same
    way. A zero gradient has cosine 0 with everything; with no references every score is 0 (nothing to be
    redundant with).
    """
    if candidates.dim() != 2 or references.dim() != 2:
        raise ValueError("candidates and references must be (n, P) and (m, P) matrices")
    if references.shape[0] == 0:
        return candidates.new_zeros(candidates.shape[0])
    nc = candidates.norm(dim=1, keepdim=True)
    nr = references.norm(dim=1, keepdim=True)
    denom = nc * nr.T
    cos = torch.where(denom > 0, (candidates @ references.T) / denom.clamp_min(torch.finfo(denom.dtype).tiny),
                      torch.zeros_like(denom))
    return cos.max(dim=1).values.clamp(-1.0, 1.0)


def eviction_weights(scores: torch.Tensor, floor: float = 0.01) -> torch.Tensor:
    """Probability weights of being drawn for eviction: min-max scaled scores, plus a floor.

    GSS-greedy scales scores as ``(s - min) / (max - min + 0.01)``. Why the floor (ours): with that alone
    the least redundant sample can never be drawn, and when all scores are equal every weight is 0 and
    ``torch.multinomial`` fails; the floor keeps every sample evictable, the most redundant ~100x more
    likely than the least.
    """
    lo, hi = scores.min(), scores.max()
    return (scores - lo) / (hi - lo + 0.01) + floor


def replacement_probability(candidate_score: torch.Tensor, stored_score: torch.Tensor) -> torch.Tensor:
    """Probability that a candidate replaces the stored sample drawn for eviction (GSS-greedy's draw).

    Both scores are mapped from [-1, 1] to [0, 1] and the draw is proportional:
    ``p = (1 + s_stored) / ((1 + s_cand) + (1 + s_stored))``. Why: the more redundant the stored sample and
    the less redundant the candidate, the likelier the swap. Two scores of -1 give 1/2 (no preference).
    """
    a = 1.0 + candidate_score
    b = 1.0 + stored_score
    total = a + b
    return torch.where(total > 0, b / total.clamp_min(torch.finfo(total.dtype).tiny), torch.full_like(total, 0.5))


def per_sample_gradients(model: nn.Module, criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                         x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``(n, P)`` matrix of per-sample loss gradients w.r.t. the trainable parameters, in one batched pass.

    Uses ``torch.func`` (``functional_call`` + ``vmap`` + ``grad``): one vectorised backward for the whole
    chunk instead of ``n`` Python-level backward passes (what Avalanche's GSS plugin does). Nothing is
    written into ``.grad``. The model should be in eval mode (batch norm cannot normalise one sample).
    """
    from torch.func import functional_call, grad, vmap

    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}
    frozen.update(dict(model.named_buffers()))

    def loss_of_one(p: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, (p, frozen), (xi.unsqueeze(0),))
        return criterion(out, yi.unsqueeze(0))

    grads = vmap(grad(loss_of_one), in_dims=(None, 0, 0))(params, x, y)
    return torch.cat([grads[n].reshape(len(x), -1) for n in names], dim=1)


def _loop_sample_gradients(strategy: Any, samples: Pool, idx: torch.Tensor,
                           references: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample gradients one sample at a time through ``strategy.forward()``/``criterion()``.

    The general path for samples that are not plain tensors (detection images with target dicts) or
    models ``vmap`` cannot trace. With ``references`` it returns each sample's :func:`max_cosine` score
    instead of its gradient, keeping one gradient in memory at a time (a detector's gradient is
    hundreds of MB). Buffers (batch-norm statistics) are restored afterwards, so scoring leaves the
    model exactly as it was.
    """
    model = strategy.model
    params = [p for p in model.parameters() if p.requires_grad]
    saved_buffers = [b.detach().clone() for b in model.buffers()]
    saved = (strategy.mbatch, strategy.mb_output)
    rows = []
    try:
        for i in idx.tolist():
            strategy.mbatch = move_to(samples.batch(torch.tensor([i])), strategy.device)
            strategy.mb_output = strategy.forward()
            loss = strategy.criterion()
            row = flatten_grads(torch.autograd.grad(loss.sum(), params, allow_unused=True), params)
            rows.append(row if references is None else max_cosine(row[None], references))
    finally:
        strategy.mbatch, strategy.mb_output = saved
        with torch.no_grad():
            for b, v in zip(model.buffers(), saved_buffers):
                b.copy_(v)
    if not rows:
        width = sum(p.numel() for p in params) if references is None else None
        return torch.zeros(0, width, device=strategy.device) if width is not None else torch.zeros(0)
    return torch.stack(rows) if references is None else torch.cat(rows)


#: Most gradient rows (floats) the batched path holds at once: 64 M floats = 256 MB in float32.
ROW_BUDGET = 1 << 26


class GradientDiversityPolicy:
    """History library storage by gradient diversity (GSS-greedy style), bounded cost.

    New samples are scored in chunks: ``score = max cosine(candidate gradient, gradients of
    min(max_comparisons, stored) random stored samples)``. While the library has room a candidate is
    stored; when it is full, a stored sample is drawn for eviction with weight growing with its score
    (:func:`eviction_weights`) and the candidate replaces it with :func:`replacement_probability`.
    Scores live here, aligned with the library's samples, and go into checkpoints as plain tensors.

    Cost: one per-sample gradient per candidate plus at most ``max_comparisons`` per chunk of
    ``chunk_size`` candidates, batched with ``torch.func`` for tensor samples; memory: the
    ``max_comparisons`` reference gradients plus at most :data:`ROW_BUDGET` floats of candidate
    gradients (one at a time on the per-sample path). Stored samples keep the score they got when they
    came in (as in GSS-greedy); rescoring them would cost a gradient per stored sample.
    """

    name = "gradient_diversity"

    def __init__(self, max_comparisons: int = 10, chunk_size: int = 32) -> None:
        if max_comparisons < 1:
            raise ValueError(f"GradientDiversityPolicy: max_comparisons must be >= 1, got {max_comparisons}")
        if chunk_size < 1:
            raise ValueError(f"GradientDiversityPolicy: chunk_size must be >= 1, got {chunk_size}")
        self.max_comparisons = int(max_comparisons)
        self.chunk_size = int(chunk_size)
        self.scores = torch.zeros(0)
        self.seen = 0
        self._use_loop = False  # set once vmap has refused the model

    # ---------------------------------------------------------------- gradients
    def _gradients(self, strategy: Any, pool: Pool, idx: torch.Tensor,
                   references: torch.Tensor | None = None) -> torch.Tensor:
        """Per-sample gradient rows of ``pool[idx]`` or, given ``references``, their max-cosine scores.

        Batched with ``torch.func`` for tensor samples (in sub-chunks of at most :data:`ROW_BUDGET`
        floats), one sample at a time otherwise.
        """
        model = strategy.model
        tensor_inputs = pool.is_tensor if isinstance(pool, Pool) else isinstance(getattr(pool, "y", None), torch.Tensor)
        if tensor_inputs and not self._use_loop:
            n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
            step = max(1, ROW_BUDGET // max(n_params, 1))
            was_training = model.training
            model.eval()
            try:
                parts = []
                for start in range(0, len(idx), step):
                    x, y = move_to(pool.batch(idx[start : start + step])[:2], strategy.device)
                    rows = per_sample_gradients(model, strategy._criterion, x, y)
                    parts.append(rows if references is None else max_cosine(rows, references))
                return torch.cat(parts) if parts else torch.zeros(0)
            except Exception as exc:  # noqa: BLE001 - vmap refuses some models; the loop path handles all
                warnings.warn(f"gradient_diversity: batched per-sample gradients failed "
                              f"({type(exc).__name__}: {exc}); using one backward per sample", stacklevel=2)
                self._use_loop = True
            finally:
                model.train(was_training)
        return _loop_sample_gradients(strategy, pool, idx, references)

    # ---------------------------------------------------------------- StoragePolicy protocol
    def select(self, library: HistoryLibrary, pool: Pool, generator: torch.Generator,
               strategy: Any = None) -> torch.Tensor:
        if strategy is None or not hasattr(strategy, "model"):
            raise ValueError("storage policy 'gradient_diversity' needs the strategy (model and criterion) to "
                             "score samples: call HistoryLibrary.update(samples, strategy=...)")
        cap = library.capacity
        n_cur = pool.n_current
        if len(self.scores) != n_cur:
            raise ValueError(f"gradient_diversity holds {len(self.scores)} scores for {n_cur} stored samples; "
                             "the library and the policy state were loaded from different checkpoints")
        slots = list(range(n_cur))  # slot i holds pool index slots[i]
        slot_scores = self.scores.clone().float()
        chunk = max(1, min(self.chunk_size, cap))
        n_new = len(pool) - n_cur
        for start in range(0, n_new, chunk):
            cand = torch.arange(n_cur + start, n_cur + min(n_new, start + chunk))
            if slots:
                k = min(self.max_comparisons, len(slots))
                pick = torch.randperm(len(slots), generator=generator)[:k]
                references = self._gradients(strategy, pool, torch.tensor(slots, dtype=torch.long)[pick])
                s_c = self._gradients(strategy, pool, cand, references).float().cpu()
            else:
                s_c = torch.zeros(len(cand))
            self.seen += len(cand)
            free = cap - len(slots)
            n_fill = max(0, min(free, len(cand)))
            slots.extend(cand[:n_fill].tolist())
            slot_scores = torch.cat([slot_scores, s_c[:n_fill]])
            contest, contest_scores = cand[n_fill:], s_c[n_fill:]
            if len(contest):
                victims = torch.multinomial(eviction_weights(slot_scores), len(contest), replacement=False,
                                            generator=generator)
                p = replacement_probability(contest_scores, slot_scores[victims])
                swap = torch.rand(len(contest), generator=generator) < p
                for v, c, s in zip(victims[swap].tolist(), contest[swap].tolist(), contest_scores[swap].tolist()):
                    slots[v] = c
                    slot_scores[v] = s
        self.scores = slot_scores
        return torch.tensor(slots, dtype=torch.long)

    def state_dict(self) -> dict:
        return {"scores": self.scores.clone(), "seen": self.seen, "max_comparisons": self.max_comparisons}

    def load_state_dict(self, state: dict) -> None:
        self.scores = state["scores"].clone().float()
        self.seen = int(state["seen"])


register_policy("gradient_diversity", GradientDiversityPolicy)


# --------------------------------------------------------------------------------------------------
# The plugin
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Buffers:
    flat: torch.Tensor
    stacked: torch.Tensor
    out: torch.Tensor
    views_h: list[torch.Tensor]
    views_t: list[torch.Tensor]
    views_out: list[torch.Tensor]


def _gather(dest: torch.Tensor, dest_views: list[torch.Tensor], grads: Sequence[torch.Tensor | None],
            params: Sequence[torch.Tensor]) -> None:
    """Copy per-parameter gradients into the flat ``dest``: one ``_foreach_copy_`` into its cached
    views (what torch.optim uses for multi-tensor updates), or a ``cat`` when some gradient is None."""
    if all(g is not None for g in grads):
        torch._foreach_copy_(dest_views, list(grads))
    else:
        flatten_grads_into(dest, grads, params)


#: Per-iteration statistics, in the order of one recorded row.
STAT_NAMES: tuple[str, ...] = ("similarity", "w_h", "w_t", "norm_h", "norm_t", "loss_h", "loss_t")


class GradientMixingPlugin(Plugin):
    """Mixes the history gradient into the transfer gradient by similarity before every optimizer step.

    In this project's :class:`incremental.Trainer` with a history library, the loop draws the history
    minibatch (``strategy.mb_history``) and, because this plugin sets ``consumes_history``, leaves it out
    of ``strategy.mbatch``. Anywhere else (a plain Avalanche ``Naive``, or our loop without a library)
    the plugin keeps its own :class:`~incremental.buffer.HistoryLibrary` of ``mem_size`` samples, filled
    after each experience from ``strategy.experience.dataset``, and draws the history minibatches itself.

    Cost per iteration, on top of the loop's own forward/backward: one forward and one backward over
    the history minibatch (``torch.autograd.grad``, so nothing is accumulated into ``.grad`` and no
    stale gradient can be left behind), two multi-tensor copies into a persistent ``(2, P)`` buffer, one
    2x2 Gram matrix (GEMM) and two losses moved to the host, one ``add`` for the mix. The mixed
    gradient becomes every parameter's ``.grad`` as a view into a persistent buffer (no copy; a logger
    that keeps ``.grad`` tensors across steps must clone them, the next step rewrites the buffer).

    Data parallelism (this project's loop under torchrun): ``averages_gradients`` tells the loop not to
    use DDP; the plugin all-reduces ``[g_h, g_t, loss_h, loss_t]`` in one collective before mixing, so
    every rank applies the same rule to the global gradients (and averages the plain gradient on steps
    without history), which reproduces the single-process numbers.

    ``stats`` holds, per experience id, one dict of floats per iteration (``similarity``, ``w_h``, ``w_t``,
    ``norm_h``, ``norm_t``, ``loss_h``, ``loss_t``, ``conflict``), readable by loggers at any time (for
    example in ``after_training_iteration``); :meth:`summary` and :meth:`plot_stats` digest them. The
    numbers come from the single host transfer the rule needs anyway, so recording them is free.
    """

    consumes_history = True

    def __init__(self, rule: str = DEFAULT_RULE, *, mem_size: int = 200,
                 storage_policy: str | StoragePolicy = "reservoir", history_batch_size: int | None = None,
                 seed: int = 0, record_stats: bool = True) -> None:
        super().__init__()
        self.rule_name = rule
        self.rule = get_rule(rule)
        self.mem_size = int(mem_size)
        self.storage_policy = storage_policy
        self.history_batch_size = history_batch_size
        self.seed = int(seed)
        self.record_stats = record_stats
        self.library: HistoryLibrary | None = None  # our own, only when the loop has none
        self._own_iter: Iterator[Batch] | None = None
        self.stats: dict[int, list[dict[str, float]]] = {}
        #: The history minibatch of the last step (None when there was none), for loggers and tests.
        self.last_history_batch: Batch | None = None
        self._params_cache: list[torch.Tensor] | None = None
        self._params_model: Any = None
        self._flat: torch.Tensor | None = None
        self._out: torch.Tensor | None = None
        self._bufs: _Buffers | None = None

    # ---------------------------------------------------------------- where the history comes from
    @staticmethod
    def _loop_has_history(strategy: Any) -> bool:
        return getattr(strategy, "history", None) is not None

    def _own_library(self) -> HistoryLibrary:
        if self.library is None:
            policy = self.storage_policy
            if isinstance(policy, str):
                policy = GradientDiversityPolicy() if policy == "gradient_diversity" else make_policy(policy)
            self.library = HistoryLibrary(self.mem_size, policy, seed=self.seed)
        return self.library

    def before_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        self._params_cache = None
        if self._loop_has_history(strategy):
            self._own_iter = None
            return
        library = self._own_library()
        size = self.history_batch_size or int(strategy.train_mb_size)
        self._own_iter = library.batches(size) if len(library) else None

    def after_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        if self._loop_has_history(strategy):
            return
        self._own_library().update(strategy.experience.dataset, strategy=strategy)

    def _history_batch(self, strategy: Any) -> Batch | None:
        if self._loop_has_history(strategy):
            return strategy.mb_history
        if self._own_iter is None:
            return None
        return move_to(next(self._own_iter), strategy.device)

    # ---------------------------------------------------------------- the one extra backward
    def _params(self, strategy: Any) -> list[torch.Tensor]:
        """Trainable parameters, listed once per epoch (walking the modules every step costs more than
        the mixing itself on a small model); refreshed when the model object changes."""
        model = strategy.model
        if self._params_cache is None or self._params_model is not model:
            self._params_cache = [p for p in model.parameters() if p.requires_grad]
            self._params_model = model
            self._bufs = None
        return self._params_cache

    def _buffers(self, params: list[torch.Tensor]) -> _Buffers:
        """Persistent buffers and their per-parameter views (rebuilt when the parameters change).

        ``stacked = [g_h; g_t]`` is a ``(2, P)`` view of ``flat``, whose last two slots carry the losses
        for the data-parallel all-reduce; ``out`` receives the mixed gradient. Reused every step: on a
        large model, allocating (and page-faulting) three fresh P-sized buffers per step cost more than
        the arithmetic done in them; on a small one, every tiny op saved counts (the views are made once,
        not per step).
        """
        if self._bufs is not None:
            return self._bufs
        n = sum(p.numel() for p in params)
        ref = params[0]
        flat, out = self._flat, self._out
        if flat is None or flat.numel() != 2 * n + 2 or flat.dtype != ref.dtype or flat.device != ref.device:
            self._flat = flat = ref.new_empty(2 * n + 2)
            self._out = out = ref.new_empty(n)
        stacked = flat[: 2 * n].view(2, n)
        sizes = [p.numel() for p in params]

        def views(vector: torch.Tensor) -> list[torch.Tensor]:
            return [chunk.view_as(p) for chunk, p in zip(vector.split(sizes), params)]

        self._bufs = _Buffers(flat, stacked, out, views(stacked[0]), views(stacked[1]), views(out))
        return self._bufs

    def before_training_epoch(self, strategy: Any, **kwargs: Any) -> None:
        self._params_cache = None  # heads may have grown / parameters been frozen between epochs

    def after_backward(self, strategy: Any, **kwargs: Any) -> None:
        batch = self._history_batch(strategy)
        self.last_history_batch = batch
        if batch is None:
            if self._sharded(strategy):  # the loop left gradient averaging to this plugin: no DDP
                self._average_loop_gradient(strategy)
            return
        params = self._params(strategy)
        bufs = self._buffers(params)
        grads_t = [p.grad for p in params]
        _gather(bufs.stacked[1], bufs.views_t, grads_t, params)  # before ``out`` (maybe behind .grad) is rewritten
        loss_h = self._history_loss(strategy, batch)
        sharded = self._sharded(strategy)
        if sharded:  # same re-weighting the loop applies to its own loss for uneven shards
            loss_h = loss_h * self._history_shard_weight(strategy, batch)
        grads_h = torch.autograd.grad(loss_h, params, allow_unused=True)
        _gather(bufs.stacked[0], bufs.views_h, grads_h, params)
        loss_t = strategy.loss.detach()
        if loss_t.dim():
            loss_t = loss_t.sum()
        losses = torch.stack([loss_h.detach(), loss_t])
        if sharded:
            losses[1] *= float(getattr(strategy, "_loss_weight", 1.0))
            bufs.flat[-2:].copy_(losses)
            from incremental.distributed import all_reduce_mean_

            all_reduce_mean_(bufs.flat)  # one collective: both gradients and both losses
            losses = bufs.flat[-2:]
        (sq_h, dot), (_, sq_t) = gram_matrix(bufs.stacked).tolist()  # the host transfers of this step
        lh, lt = losses.tolist()
        geo = Geometry(dot, sq_h, sq_t)
        w_h, w_t = self.rule(geo, lh, lt)
        combine(bufs.stacked[0], bufs.stacked[1], w_h, w_t, out=bufs.out)
        for p, view, a, b in zip(params, bufs.views_out, grads_t, grads_h):
            p.grad = view if (a is not None or b is not None) else None  # views: no copy (see assign_flat_grad)
        if self.record_stats:
            s = geo.similarity
            self.stats.setdefault(self._experience_id(strategy), []).append({
                "similarity": s, "w_h": w_h, "w_t": w_t, "norm_h": geo.norm_h, "norm_t": geo.norm_t,
                "loss_h": lh, "loss_t": lt, "conflict": float(s < 0.0),
            })

    @staticmethod
    def _history_loss(strategy: Any, batch: Batch) -> torch.Tensor:
        """The history loss exactly as the loop computes a loss: swap the batch in, forward, criterion
        (under the loop's autocast when it trains in mixed precision)."""
        saved = (strategy.mbatch, strategy.mb_output)
        amp = bool(getattr(strategy, "amp", False))
        try:
            strategy.mbatch = batch
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
                strategy.mb_output = strategy.forward()
                loss = strategy.criterion()
            return loss if loss.dim() == 0 else loss.sum()
        finally:
            strategy.mbatch, strategy.mb_output = saved

    # ---------------------------------------------------------------- data parallelism (our loop only)
    #: Tells the loop not to wrap the model in DDP: under data parallelism this plugin averages the two
    #: flat gradients over ranks itself (one all-reduce of both), so that every rank mixes the global
    #: gradients with the same weights; DDP's hooks would only average g_t, and not with autograd.grad.
    averages_gradients = True

    @staticmethod
    def _sharded(strategy: Any) -> bool:
        sharder = getattr(strategy, "sharder", None)
        return bool(sharder is not None and sharder.active)

    def _average_loop_gradient(self, strategy: Any) -> None:
        """No history yet (first experience): average the loop's gradient over ranks, as DDP would."""
        from incremental.distributed import all_reduce_mean_

        params = self._params(strategy)
        bufs = self._buffers(params)
        grads = [p.grad for p in params]
        _gather(bufs.out, bufs.views_out, grads, params)
        all_reduce_mean_(bufs.out)
        for p, view, g in zip(params, bufs.views_out, grads):
            p.grad = view if g is not None else None

    @staticmethod
    def _history_shard_weight(strategy: Any, batch: Batch) -> float:
        """``n_rank * world / n_global`` for this rank's share of the global history minibatch."""
        from incremental.data import batch_size_of

        n_global = int(getattr(strategy.history, "last_global_batch_size", 0) or 0)
        if n_global <= 0:
            return 1.0
        return batch_size_of(batch) * strategy.sharder.world / n_global

    @staticmethod
    def _experience_id(strategy: Any) -> int:
        exp = getattr(strategy, "experience", None)
        return int(getattr(exp, "current_experience", 0) or 0)

    # ---------------------------------------------------------------- statistics
    def summary(self) -> dict[int, dict[str, float]]:
        """Per experience: iterations, mean of every statistic, fraction of conflicting steps (s < 0)."""
        out: dict[int, dict[str, float]] = {}
        for exp_id, rows in sorted(self.stats.items()):
            if not rows:
                continue
            n = len(rows)
            out[exp_id] = {"iterations": n, "conflict_fraction": sum(r["conflict"] for r in rows) / n}
            for name in STAT_NAMES:
                out[exp_id][f"mean_{name}"] = sum(r[name] for r in rows) / n
        return out

    def plot_stats(self, out_dir: str | Path, prefix: str = "gradient_mixing") -> list[Path]:
        """One PNG per experience: similarity, weights, gradient norms and the running conflict fraction."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        from incremental.io import save_figure

        paths = []
        for exp_id, rows in sorted(self.stats.items()):
            if not rows:
                continue
            it = list(range(len(rows)))
            col = {name: [r[name] for r in rows] for name in (*STAT_NAMES, "conflict")}
            running = [sum(col["conflict"][: i + 1]) / (i + 1) for i in it]
            fig, axes = plt.subplots(2, 2, figsize=(10, 6), sharex=True)
            ax = axes[0, 0]
            ax.plot(it, col["similarity"], lw=1)
            ax.axhline(0.0, color="grey", lw=0.8, ls="--")
            ax.set_ylabel("cosine s(g_h, g_t)")
            ax = axes[0, 1]
            ax.plot(it, col["w_h"], lw=1, label="w_h")
            ax.plot(it, col["w_t"], lw=1, label="w_t")
            ax.set_ylabel("weight")
            ax.legend(fontsize=8)
            ax = axes[1, 0]
            ax.plot(it, col["norm_h"], lw=1, label="|g_h|")
            ax.plot(it, col["norm_t"], lw=1, label="|g_t|")
            ax.set_ylabel("gradient norm")
            ax.set_yscale("log")
            ax.legend(fontsize=8)
            ax = axes[1, 1]
            ax.plot(it, running, lw=1)
            ax.set_ylim(0, 1)
            ax.set_ylabel("conflicting steps (running fraction)")
            for a in axes[1]:
                a.set_xlabel("iteration")
            for a in axes.flat:
                a.grid(alpha=0.3)
            fig.suptitle(f"gradient mixing ({self.rule_name}), experience {exp_id}: "
                         f"{100 * running[-1]:.0f}% of {len(rows)} steps conflicting")
            fig.tight_layout()
            paths.append(save_figure(Path(out_dir) / f"{prefix}_exp{exp_id}.png", fig, dpi=100))
        return paths

    # ---------------------------------------------------------------- own library state (Avalanche use)
    def state_dict(self) -> dict[str, Any]:
        return {"library": None if self.library is None else self.library.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("library") is not None:
            self._own_library().load_state_dict(state["library"])


__all__ = [
    "Mix", "Geometry", "gradient_geometry", "weights_sum", "weights_similarity", "weights_agem", "weights_pcgrad",
    "weights_mega", "mix", "combine", "gram_matrix", "flatten_grads_into", "mix_sum", "mix_similarity", "mix_agem", "mix_pcgrad", "mix_mega",
    "RULES", "DEFAULT_RULE", "get_rule", "flatten_grads", "assign_flat_grad", "max_cosine", "eviction_weights",
    "replacement_probability", "per_sample_gradients", "GradientDiversityPolicy", "GradientMixingPlugin",
    "STAT_NAMES",
]
