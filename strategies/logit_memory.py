"""Logits stored beside the history library, for DER's logit replay (Buzzega et al., NeurIPS 2020).

DER keeps, with every stored sample, the logits the model gave it when it was stored, and trains the
model to reproduce them (``|f(x) - z|^2``): the old function itself is replayed, not only its labels,
which is what made DER the strongest rehearsal baseline on Split Fashion-MNIST. The table follows the
library: after each library update, rows of samples that stayed move with their slots, rows of samples
that came in are computed by the current model (as Avalanche's DER does: after training on their
experience, on the sample without random augmentation). The library tells which slots moved where
(``last_update``) and which slots a minibatch came from (``last_indices``).
"""
from __future__ import annotations

from typing import Any

import torch

from incremental.buffer import HistoryLibrary, _transform_each
from incremental.data import move_to

CHUNK = 512


class LogitMemory:
    """``(len(library), C)`` logits aligned with the library's slots."""

    def __init__(self) -> None:
        self.table: torch.Tensor | None = None
        self._seen_update: Any = None

    def refresh(self, library: HistoryLibrary, model: torch.nn.Module, device: Any) -> None:
        """Follow the library's last update: keep the rows of samples that stayed, compute the new ones."""
        update = library.last_update
        if update is None or update is self._seen_update or library.samples is None:
            return
        self._seen_update = update
        keep, n_before = update
        is_new = keep >= n_before
        new_slots = torch.nonzero(is_new).flatten()
        fresh = self._logits(library, new_slots, model, device)
        width = fresh.shape[1] if len(fresh) else (self.table.shape[1] if self.table is not None else 0)
        table = torch.zeros(len(keep), width)
        if self.table is not None and bool((~is_new).any()):
            old = self.table[keep[~is_new]]
            k = min(old.shape[1], width)
            table[~is_new, :k] = old[:, :k]
        if len(new_slots):  # an update may keep only samples it held (no fresh rows: a (0, 0) tensor)
            table[new_slots] = fresh
        self.table = table

    @staticmethod
    @torch.no_grad()
    def _logits(library: HistoryLibrary, slots: torch.Tensor, model: torch.nn.Module, device: Any) -> torch.Tensor:
        assert library.samples is not None
        was_training = model.training
        model.eval()
        try:
            parts = []
            for start in range(0, len(slots), CHUNK):
                batch = _transform_each(library.eval_transform, library.samples.batch(slots[start: start + CHUNK]))
                parts.append(model(move_to(batch[0], device)).float().cpu())
        finally:
            model.train(was_training)
        return torch.cat(parts) if parts else torch.zeros(0, 0)

    def ensure(self, library: HistoryLibrary, model: torch.nn.Module, device: Any) -> None:
        """Rows for every slot: after a resume (checkpoints hold the library, not this table) or when the
        library was filled before this plugin saw it, the missing table is computed by the current model."""
        n = len(library)
        if n and (self.table is None or len(self.table) != n):
            self.table = self._logits(library, torch.arange(n), model, device)
            self._seen_update = library.last_update

    def targets(self, idx: torch.Tensor, device: Any) -> torch.Tensor:
        """Stored logits of library slots ``idx`` (the slots the current history minibatch came from)."""
        assert self.table is not None, "LogitMemory.ensure runs before the first history minibatch"
        return self.table[idx].to(device, non_blocking=True)

    def state_dict(self) -> dict[str, Any]:
        return {"table": self.table}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.table = state.get("table")
