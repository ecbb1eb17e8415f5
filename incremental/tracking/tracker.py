"""The tracking plugin: records per-iteration values on the device, hands them to loggers in bulk.

Why a single plugin in front of several loggers: the values are read from the loop once, kept as
detached tensors where they live (a GPU loss stays on the GPU: no per-iteration host sync), and brought
to the host in one transfer per device at the end of each epoch (or every ``flush_every`` iterations
on very long epochs). Each logger (CSV, TensorBoard, W&B) then writes plain floats.

What is recorded each iteration (``after_training_iteration``, Avalanche's callback):
- ``strategy.loss`` as ``Loss_MB/train_phase/train_stream`` (the total loss, as Avalanche's metric);
- ``strategy.loss_terms`` (name -> scalar tensor) as ``loss_terms/<name>``, when the loop exposes it;
- loss weights as ``loss_weights/<name>``: ``strategy.loss_weights`` (a mapping) when the loop exposes
  it, and plugins with ``current_weights()`` and ``names`` (dynamic loss weighting);
- per-iteration statistics of plugins that keep them (``stats``: experience id -> list of dicts of
  floats, e.g. gradient mixing's similarity and weights) as ``<plugin>/<stat>``. They are host floats
  already; the tracker only picks up the row the plugin added this iteration.

The runner calls :meth:`Tracker.log_eval` after each experience's evaluation and :meth:`Tracker.close`
at the end (or uses the tracker as a context manager).
"""
from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch

from ..data import batch_size_of
from ..plugins import Plugin
from . import names


@dataclass
class IterationLog:
    """Per-iteration values, column-wise, as host floats (NaN where a value was not recorded)."""

    iteration: list[int] = field(default_factory=list)
    experience: list[int] = field(default_factory=list)
    epoch: list[int] = field(default_factory=list)
    values: dict[str, list[float]] = field(default_factory=dict)
    #: names of plugin statistics: every iteration goes to CSV; TensorBoard gets epoch means and histograms
    detail: frozenset[str] = frozenset()

    def __len__(self) -> int:
        return len(self.iteration)


class Logger:
    """A destination for tracked values; every method is optional (no-ops here)."""

    def log_iterations(self, log: IterationLog) -> None:
        """A block of consecutive training iterations (one epoch, or part of a long one)."""

    def log_epoch(self, iteration: int, experience: int, epoch: int, values: Mapping[str, float],
                  distributions: Mapping[str, Sequence[float]]) -> None:
        """End of a training epoch: epoch means and timing; ``distributions``: per-iteration values to histogram."""

    def log_eval(self, iteration: int, experience: int, values: Mapping[str, float],
                 accuracy_matrix: Sequence[Sequence[float]]) -> None:
        """After the evaluation that follows training experience ``experience``."""

    def close(self) -> None:
        """Flush and release files, writers and runs."""


def _snake(name: str) -> str:
    name = re.sub(r"Plugin$", "", name)
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


class Tracker(Plugin):
    """Loop plugin that collects per-iteration values and forwards them, in bulk, to ``loggers``.

    ``histogram_stats``: plugin statistics whose per-epoch distribution loggers draw as histograms.
    """

    histogram_stats: tuple[str, ...] = ("similarity",)

    def __init__(self, loggers: Sequence[Logger], *, flush_every: int = 1024, strategy: Any = None) -> None:
        super().__init__()
        self.loggers = list(loggers)
        self.flush_every = int(flush_every)
        self._strategy: Any = strategy  # for the clock in log_eval; set again by before_training
        self._weight_sources: list[tuple[Any, str]] = []
        self._stats_sources: list[tuple[Any, str]] = []
        self._stats_seen: dict[int, tuple[int, int]] = {}
        self._reset_pending()
        self._reset_epoch()

    # ------------------------------------------------------------------ loop callbacks
    def before_training(self, strategy: Any, **kwargs: Any) -> None:
        self._strategy = strategy
        self._weight_sources, self._stats_sources = [], []
        for plugin in getattr(strategy, "plugins", []):
            if plugin is self:
                continue
            prefix = _snake(type(plugin).__name__)
            if callable(getattr(plugin, "current_weights", None)) and getattr(plugin, "names", None) is not None:
                self._weight_sources.append((plugin, prefix))
            if isinstance(getattr(plugin, "stats", None), dict):
                self._stats_sources.append((plugin, prefix))

    def before_training_epoch(self, strategy: Any, **kwargs: Any) -> None:
        self._epoch_start = time.perf_counter()

    def after_training_iteration(self, strategy: Any, **kwargs: Any) -> None:
        clock = strategy.clock
        exp = getattr(strategy.experience, "current_experience", clock.train_exp_counter)
        self._meta.append((clock.train_iterations, int(exp), clock.train_exp_epochs, batch_size_of(strategy.mbatch)))
        entries = self._entries
        loss = strategy.loss
        if loss is not None:
            entries.append(((names.LOSS_MB,), loss.detach()))
        terms = getattr(strategy, "loss_terms", None)
        if terms:
            for key, value in terms.items():
                entries.append(((f"loss_terms/{key}",), value.detach() if isinstance(value, torch.Tensor) else value))
        weights = getattr(strategy, "loss_weights", None)
        if weights:
            for key, value in weights.items():
                entries.append(((f"loss_weights/{key}",), value.detach() if isinstance(value, torch.Tensor) else value))
        for plugin, prefix in self._weight_sources:
            keys = tuple(f"loss_weights/{n}" for n in plugin.names)
            entries.append((keys, plugin.current_weights().detach()))
        host: dict[str, float] = {}
        for plugin, prefix in self._stats_sources:
            rows = plugin.stats.get(int(exp))
            if rows:
                seen = self._stats_seen.get(id(plugin))
                if seen != (int(exp), len(rows)):  # the plugin added this iteration's row
                    self._stats_seen[id(plugin)] = (int(exp), len(rows))
                    for key, value in rows[-1].items():
                        host[f"{prefix}/{key}"] = float(value)
        self._host.append(host)
        self._ends.append(len(entries))
        if len(self._meta) >= self.flush_every:
            self._flush()

    def after_training_epoch(self, strategy: Any, **kwargs: Any) -> None:
        self._flush()
        if self._epoch_n == 0:
            return
        clock = strategy.clock
        exp = int(getattr(strategy.experience, "current_experience", clock.train_exp_counter))
        means = {key: total / count for key, (total, count) in self._epoch_sums.items() if count}
        if self._epoch_samples:
            means[names.LOSS_EPOCH] = self._epoch_loss / self._epoch_samples
        means[names.TIME_EPOCH] = time.perf_counter() - self._epoch_start
        for logger in self.loggers:
            logger.log_epoch(clock.train_iterations, exp, clock.train_exp_epochs, means, self._epoch_dist)
        self._reset_epoch()

    # ------------------------------------------------------------------ calls from the runner
    def log_eval(self, experience: int, results: Mapping[int, Mapping[str, float]],
                 accuracy_matrix: Sequence[Sequence[float]]) -> dict[str, float]:
        """After evaluating the test stream that follows training experience ``experience``.

        ``results``: the loop's ``eval`` output (``{test experience: {accuracy, loss, count}}``);
        ``accuracy_matrix``: every row so far, this step's last. Returns the values logged.
        """
        self._flush()
        values = names.eval_metrics(results, accuracy_matrix)
        clock = getattr(self._strategy, "clock", None)
        iteration = clock.train_iterations if clock is not None else int(experience)
        for logger in self.loggers:
            logger.log_eval(iteration, int(experience), values, accuracy_matrix)
        return values

    def close(self) -> None:
        self._flush()
        for logger in self.loggers:
            logger.close()
        self.loggers = []

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ bulk transfer
    def _reset_pending(self) -> None:
        self._meta: list[tuple[int, int, int, int]] = []
        self._entries: list[tuple[tuple[str, ...], Any]] = []
        self._ends: list[int] = []
        self._host: list[dict[str, float]] = []

    def _reset_epoch(self) -> None:
        self._epoch_start = time.perf_counter()
        self._epoch_n = 0
        self._epoch_loss = 0.0
        self._epoch_samples = 0
        self._epoch_sums: dict[str, tuple[float, int]] = {}
        self._epoch_dist: dict[str, list[float]] = {}

    def _to_host(self) -> list[float | None]:
        """Every pending entry as floats: one ``cat`` and one ``tolist`` per device, none per iteration."""
        flat: list[float | None] = [None] * len(self._entries)
        groups: dict[torch.device, list[int]] = {}
        for k, (_, value) in enumerate(self._entries):
            if isinstance(value, torch.Tensor):
                groups.setdefault(value.device, []).append(k)
            else:
                flat[k] = [float(value)]
        for idx in groups.values():
            tensors = [self._entries[k][1].reshape(-1).float() for k in idx]
            numbers = torch.cat(tensors).tolist()
            pos = 0
            for k, t in zip(idx, tensors):
                flat[k] = numbers[pos : pos + t.numel()]
                pos += t.numel()
        return flat

    def _flush(self) -> None:
        if not self._meta:
            return
        flat = self._to_host()
        n = len(self._meta)
        log = IterationLog()
        detail: set[str] = set()
        start = 0
        for row, ((it, exp, epoch, size), end, host) in enumerate(zip(self._meta, self._ends, self._host)):
            log.iteration.append(it)
            log.experience.append(exp)
            log.epoch.append(epoch)
            values: dict[str, float] = {}
            for (keys, _), numbers in zip(self._entries[start:end], flat[start:end]):
                values.update(zip(keys, numbers))
            values.update(host)
            detail.update(host)
            start = end
            for key, value in values.items():
                column = log.values.get(key)
                if column is None:
                    column = log.values[key] = [math.nan] * row
                column.append(value)
            for column in log.values.values():
                if len(column) == row:
                    column.append(math.nan)
            self._accumulate(values, size, host)
        log.detail = frozenset(detail)
        self._reset_pending()
        assert len(log) == n
        for logger in self.loggers:
            logger.log_iterations(log)

    def _accumulate(self, values: Mapping[str, float], size: int, host: Mapping[str, float]) -> None:
        self._epoch_n += 1
        loss = values.get(names.LOSS_MB)
        if loss is not None and math.isfinite(loss):
            self._epoch_loss += loss * size
            self._epoch_samples += size
        for key, value in values.items():
            if key == names.LOSS_MB:
                continue
            total, count = self._epoch_sums.get(key, (0.0, 0))
            self._epoch_sums[key] = (total + value, count + 1)
        for key, value in host.items():
            if key.rsplit("/", 1)[-1] in self.histogram_stats:
                self._epoch_dist.setdefault(key, []).append(value)
