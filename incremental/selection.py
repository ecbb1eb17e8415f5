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

Which one gradient mixing uses by default, and the spread each leaves over library draws, is measured in
docs/gradient_mixing.md, which also says why the gradient-diversity policy (GSS-greedy) was retired.
Importing this module registers the policies by name (``make_policy``).
"""
from __future__ import annotations

from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F

from .buffer import HistoryLibrary, Pool, class_quotas, register_policy
from .data import move_to

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


register_policy("herding", HerdingPolicy)
register_policy("loss_stratified", LossStratifiedPolicy)
