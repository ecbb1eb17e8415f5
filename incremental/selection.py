"""What the history library keeps: storage policies beyond reservoir and random class-balanced.

The library (:mod:`incremental.buffer`) owns storage, sampling and state; a policy only chooses which
indices of a :class:`~incremental.buffer.Pool` (stored samples, then the new data set's) to keep. The
policies here look at the model to choose, so they take the loop (``strategy``: ``model``, ``device``,
``_criterion``) in :meth:`select`:

- ``herding`` (iCaRL, Rebuffi et al. 2017): an equal share per class; within a class, the samples whose
  running feature mean best follows the class mean, kept in that order so that a class whose share
  shrinks keeps its best prefix. No random draw: the choice depends on the model only.
- ``loss_stratified``: an equal share per class; within a class, samples spread evenly over the ranking
  of their loss under the current model (easy to hard, as Rainbow Memory spreads over uncertainty).
- ``gradient_diversity`` (GSS-greedy, Aljundi et al. 2019, bounded cost): redundant samples, whose
  gradient points where stored ones already point, are the likelier to go; ``class_balanced=True``
  runs the same contest inside each class's share.

Which one gradient mixing uses by default, and the spread each leaves over library draws, is measured in
docs/gradient_mixing.md. Importing this module registers the policies by name (``make_policy``).
"""
from __future__ import annotations

import warnings
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .buffer import HistoryLibrary, Pool, class_quotas, register_policy
from .config import check
from .data import move_to
from .flat_gradients import flatten_grads

#: Samples per forward when a policy reads features or losses of a pool (memory, not results, depends on it).
CHUNK = 1024


# --------------------------------------------------------------------------------------------------
# Pure functions
# --------------------------------------------------------------------------------------------------


def herding_order(features: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of ``k`` rows of ``features`` chosen by herding, in the order chosen.

    Rows are L2-normalised; step ``j`` picks the unchosen row that brings the mean of the ``j + 1``
    chosen rows closest to the mean ``mu`` of all rows: ``argmin_i |mu - (S + f_i) / (j + 1)|`` with
    ``S`` the sum of the rows chosen so far. With unit rows that is ``argmax_i f_i . ((j + 1) mu - S)``,
    one matrix-vector product per step. Why: the kept samples then summarise the class as a whole (its
    mean feature) instead of whatever a random draw hit; and a prefix of the order is itself a good
    summary, so shrinking a class's share keeps a prefix.
    """
    if features.dim() != 2:
        raise ValueError(f"features must be an (n, d) matrix, got {tuple(features.shape)}")
    n = len(features)
    k = min(int(k), n)
    f = F.normalize(features.double(), dim=1)
    mu = f.mean(dim=0)
    available = torch.ones(n, dtype=torch.bool)
    order = []
    running = torch.zeros_like(mu)
    for j in range(k):
        score = f @ ((j + 1) * mu - running)
        score[~available] = -float("inf")
        i = int(score.argmax())
        order.append(i)
        available[i] = False
        running += f[i]
    return torch.tensor(order, dtype=torch.long)


def stratified_ranks(values: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of ``k`` entries spread evenly over the ascending ranking of ``values``.

    Rank ``floor((j + 0.5) n / k)`` for ``j = 0..k-1``: the middle of each of ``k`` equal slices of the
    ranking, so the kept samples cover easy to hard in equal steps (ties broken by position).
    """
    n = len(values)
    k = min(int(k), n)
    if k <= 0:
        return torch.zeros(0, dtype=torch.long)
    order = torch.argsort(values, stable=True)
    ranks = ((torch.arange(k, dtype=torch.float64) + 0.5) * n / k).long().clamp_max(n - 1)
    return order[ranks]


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



# --------------------------------------------------------------------------------------------------
# Reading a pool through the model
# --------------------------------------------------------------------------------------------------


def _need_model(strategy: Any, name: str) -> None:
    if strategy is None or not hasattr(strategy, "model"):
        raise ValueError(f"storage policy {name!r} needs the strategy (model and criterion) to choose samples: "
                         "call HistoryLibrary.update(samples, strategy=...)")


def _chunks(pool: Pool, idx: torch.Tensor, device: Any) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for start in range(0, len(idx), CHUNK):
        x, y = pool.batch(idx[start: start + CHUNK])[:2]
        yield move_to(x, device), move_to(y, device)


@torch.no_grad()
def pool_features(strategy: Any, pool: Pool, idx: torch.Tensor) -> torch.Tensor:
    """``(len(idx), d)`` inputs of the model's last linear layer (its penultimate features), eval mode.

    Read with a forward hook on the last ``nn.Linear``, so any classifier of this project (and any
    torchvision one) works without a ``features`` method. Batch norm runs on its running statistics.
    """
    from .models import last_linear

    model = strategy.model
    _, head = last_linear(model)
    captured: list[torch.Tensor] = []
    hook = head.register_forward_hook(lambda module, args, output: captured.append(args[0].detach().flatten(1)))
    was_training = model.training
    model.eval()
    try:
        for x, _ in _chunks(pool, idx, strategy.device):
            model(x)
    finally:
        hook.remove()
        model.train(was_training)
    return torch.cat(captured).float().cpu() if captured else torch.zeros(0, 0)


@torch.no_grad()
def pool_losses(strategy: Any, pool: Pool, idx: torch.Tensor) -> torch.Tensor:
    """Per-sample cross-entropy of pool samples ``idx`` under the current model (eval mode)."""
    model = strategy.model
    was_training = model.training
    model.eval()
    try:
        parts = [F.cross_entropy(model(x), y, reduction="none") for x, y in _chunks(pool, idx, strategy.device)]
    finally:
        model.train(was_training)
    return torch.cat(parts).float().cpu() if parts else torch.zeros(0)


def per_class_select(library: HistoryLibrary, pool: Pool,
                     choose: Callable[[torch.Tensor, int], torch.Tensor]) -> torch.Tensor:
    """An equal share of the capacity per class; ``choose(candidates, quota)`` picks within a class.

    A class with no new samples keeps the first ``quota`` of its stored samples in slot order (the
    policies below store each class in the order they chose it, so that is their best prefix); a class
    with new samples is chosen anew among its stored and new samples. Returns pool indices, class by
    class, each class in its chosen order.
    """
    labels = pool.labels
    classes = sorted(set(labels.tolist()))
    if not classes:
        return torch.arange(len(pool))
    keep = []
    for c, quota in zip(classes, class_quotas(library.capacity, len(classes))):
        idx = torch.nonzero(labels == c).flatten()
        if len(idx) <= quota:
            keep.append(idx)
        elif bool((idx >= pool.n_current).any()):
            keep.append(idx[choose(idx, quota)])
        else:
            keep.append(idx[:quota])
    return torch.cat(keep)


# --------------------------------------------------------------------------------------------------
# The policies
# --------------------------------------------------------------------------------------------------


class PerClassModelPolicy:
    """An equal share per class (:func:`per_class_select`), chosen within a class by :meth:`choose` from
    what the current model makes of the candidates. No state of its own: the choice depends on the model."""

    name = "per_class"

    def choose(self, strategy: Any, pool: Pool, idx: torch.Tensor, k: int) -> torch.Tensor:
        """Positions in ``idx`` of the ``k`` candidates to keep, in the order they should be kept."""
        raise NotImplementedError

    def select(self, library: HistoryLibrary, pool: Pool, generator: torch.Generator, strategy: Any = None
               ) -> torch.Tensor:
        _need_model(strategy, self.name)
        return per_class_select(library, pool, lambda idx, k: self.choose(strategy, pool, idx, k))

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class HerdingPolicy(PerClassModelPolicy):
    """Class-balanced herding on the model's penultimate features (iCaRL's exemplar selection).

    Cost: one no-grad forward over the classes that got new samples, plus ``quota`` matrix-vector products
    per such class. No random draw, so two runs that trained the same model keep the same samples.
    """

    name = "herding"

    def choose(self, strategy: Any, pool: Pool, idx: torch.Tensor, k: int) -> torch.Tensor:
        return herding_order(pool_features(strategy, pool, idx), k)


class LossStratifiedPolicy(PerClassModelPolicy):
    """Class-balanced, within a class spread evenly over the ranking of per-sample loss (easy to hard).

    Cost: one no-grad forward over the classes that got new samples. Deterministic given the model.
    """

    name = "loss_stratified"

    def choose(self, strategy: Any, pool: Pool, idx: torch.Tensor, k: int) -> torch.Tensor:
        return stratified_ranks(pool_losses(strategy, pool, idx), k)


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


register_policy("herding", HerdingPolicy)
register_policy("loss_stratified", LossStratifiedPolicy)
register_policy("gradient_diversity", GradientDiversityPolicy)
