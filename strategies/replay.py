"""Replay (experience replay): train each minibatch together with a minibatch of past samples.

Inside this project's loop the history library belongs to the loop (``strategy.history``), which
concatenates the history minibatch into every training minibatch: this plugin only declares that the
run replays (and the registry checks a library is configured). Inside any other loop (a plain
Avalanche strategy) it keeps its own :class:`~incremental.buffer.HistoryLibrary`, offers it each
experience's data when the experience ends, and concatenates one history minibatch into
``strategy.mbatch`` before every forward pass, which is what Avalanche's ``ReplayPlugin`` does.
"""
from __future__ import annotations

from typing import Any, Iterator

from incremental.buffer import HistoryLibrary
from incremental.config import check
from incremental.data import Batch, as_batch, concat_batches, move_to
from incremental.plugins import Plugin


class ReplayPlugin(Plugin):
    """``own_mem_size`` / ``own_policy`` / ``seed`` size the plugin's own library, used only where the
    loop has none (inside Avalanche); in this project's loop ``strategy.history`` is replayed."""

    replays_history = True

    def __init__(self, *, own_mem_size: int = 200, own_policy: str = "class_balanced", seed: int = 0,
                 batch_size: int | None = None) -> None:
        super().__init__()
        check(own_mem_size >= 1, "own_mem_size", f"must be >= 1, got {own_mem_size}")
        check(batch_size is None or batch_size >= 1, "batch_size", f"must be >= 1, got {batch_size}")
        self.library = HistoryLibrary(own_mem_size, own_policy, seed=seed)
        self.batch_size = batch_size
        self._iter: Iterator[Batch] | None = None

    @staticmethod
    def _loop_replays(strategy: Any) -> bool:
        return getattr(strategy, "history", None) is not None

    def before_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        if self._loop_replays(strategy) or not len(self.library):
            self._iter = None
            return
        self.library.adopt_transforms(strategy.experience.dataset)
        self._iter = self.library.batches(self.batch_size or int(strategy.train_mb_size))

    def before_forward(self, strategy: Any, **kwargs: Any) -> None:
        if self._iter is None or not strategy.is_training:
            return
        history = move_to(next(self._iter), strategy.device)
        strategy.mbatch = concat_batches(as_batch(strategy.mbatch), history)

    def after_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        if not self._loop_replays(strategy):
            self.library.update(strategy.experience.dataset, strategy=strategy)
