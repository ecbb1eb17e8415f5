"""The tracking plugin: records per-iteration values on the device, hands them to loggers in bulk.

Why a single plugin in front of several loggers: the values are read from the loop once, kept as
detached tensors where they live (a GPU loss stays on the GPU: no per-iteration host sync), and brought
to the host in one transfer per device at the end of each experience, at the end of an epoch when
``flush_secs`` have passed since the last transfer, and every ``flush_every`` iterations. Each logger
(CSV, TensorBoard, W&B) then writes plain floats, in one go per flush. Why not per epoch: on the
quickstart an epoch is 8 iterations (about 10 ms), and a file write per epoch alone cost 5% of it.

What is recorded each iteration (``after_training_iteration``, Avalanche's callback):
- ``strategy.loss`` as ``Loss_MB/train_phase/train_stream`` (the total loss, as Avalanche's metric);
- ``strategy.loss_terms`` (name -> scalar tensor, the criterion's named terms, read in ``before_backward``)
  as ``loss_terms/<name>`` (not when the only term is the loss itself);
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
        """A block of consecutive training iterations (those since the last flush). The summaries of the
        epochs that ended in the block follow (``log_epoch``): a logger that needs its steps in order
        (W&B) holds the rows back until then."""

    def log_epoch(self, iteration: int, experience: int, epoch: int, values: Mapping[str, float]) -> None:
        """End of a training epoch: epoch means and timing."""

    def log_histograms(self, iteration: int, experience: int, distributions: Mapping[str, Sequence[float]]) -> None:
        """End of a training experience: per-iteration values of the experience to draw as histograms."""

    def log_eval(self, iteration: int, experience: int, values: Mapping[str, float],
                 accuracy_matrix: Sequence[Sequence[float]] | None) -> None:
        """After the evaluation that follows training experience ``experience`` (the accuracy matrix so
        far, or None when the family's evaluation is not one)."""

    def flush(self) -> None:
        """End of a tracker flush: make what was logged visible (write files, send events)."""

    def close(self) -> None:
        """Flush and release files, writers and runs."""


def _batch_size(mbatch: Any) -> int:
    x = mbatch[0]
    return x.shape[0] if isinstance(x, torch.Tensor) else batch_size_of(mbatch)  # shape: cheaper than len()


def _stack_scalars(tensors: list[torch.Tensor]) -> torch.Tensor:
    """One-element tensors (shape () or (1,)) as one flat float tensor: one op when the shapes agree."""
    try:
        return torch.stack(tensors).reshape(-1).float()
    except RuntimeError:  # mixed shapes
        return torch.stack([t.reshape(()) for t in tensors]).float()


def _experience_id(strategy: Any) -> int:
    exp = getattr(strategy, "experience", None)
    return int(getattr(exp, "current_experience", strategy.clock.train_exp_counter))


def _snake(name: str) -> str:
    name = re.sub(r"Plugin$", "", name)
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


class Tracker(Plugin):
    """Loop plugin that collects per-iteration values and forwards them, in bulk, to ``loggers``.

    ``histogram_stats``: plugin statistics whose distribution over each experience's iterations loggers
    draw as histograms (one per experience: the quickstart's epochs have 8 iterations, too few to draw).
    """

    histogram_stats: tuple[str, ...] = ("similarity",)

    def __init__(self, loggers: Sequence[Logger], *, flush_every: int = 1024, flush_secs: float = 5.0,
                 strategy: Any = None, metric: str = "Top1_Acc") -> None:
        super().__init__()
        self.loggers = list(loggers)
        self.metric = metric
        self.flush_every = int(flush_every)
        self.flush_secs = float(flush_secs)
        self._strategy: Any = strategy  # for the clock in log_eval; set again by before_training
        self._weight_sources: list[tuple[Any, tuple[str, ...]]] = []
        self._extra_sources = True  # weights or statistics to read each iteration (known at before_training)
        self._stats_sources: list[tuple[Any, str]] = []
        self._stats_seen: dict[int, tuple[int, int]] = {}
        self._last_flush = time.perf_counter()
        self._epoch_start = self._last_flush
        self._exp = 0
        self._terms: dict[str, Any] | None = None
        self._keys: dict[tuple[str, str], tuple[str]] = {}  # (prefix, term) -> column names
        self._stat_keys: dict[tuple[str, str], str] = {}  # (plugin, statistic) -> column name
        self._dist: dict[str, list[float]] = {}  # this experience's values of histogram_stats
        self._reset_pending()
        self._reset_epoch()

    # ------------------------------------------------------------------ loop callbacks
    def before_training(self, strategy: Any, **kwargs: Any) -> None:
        self._strategy = strategy
        self._weight_sources, self._stats_sources = [], []
        for plugin in getattr(strategy, "plugins", []):
            if plugin is self:
                continue
            if callable(getattr(plugin, "current_weights", None)) and getattr(plugin, "names", None) is not None:
                self._weight_sources.append((plugin, tuple(f"loss_weights/{n}" for n in plugin.names)))
            if isinstance(getattr(plugin, "stats", None), dict):
                self._stats_sources.append((plugin, _snake(type(plugin).__name__)))
        self._extra_sources = bool(self._weight_sources or self._stats_sources) or hasattr(strategy, "loss_weights")

    def before_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        self._exp = _experience_id(strategy)

    def before_training_epoch(self, strategy: Any, **kwargs: Any) -> None:
        self._epoch_start = time.perf_counter()

    def before_backward(self, strategy: Any, **kwargs: Any) -> None:
        # The criterion's terms, read here: a plugin that runs the criterion again after the backward
        # (gradient mixing, on the history minibatch) replaces strategy.loss_terms with its own.
        # (The loop assigns a new dict per criterion call, so keeping the reference is enough.)
        self._terms = getattr(strategy, "loss_terms", None)

    def after_training_iteration(self, strategy: Any, **kwargs: Any) -> None:
        # Kept to a few appends: in the loop this runs with cold caches, several times slower than alone.
        losses = self._losses
        row = len(losses)
        if not row:  # a block starts: the iteration numbers of its rows follow from here
            clock = strategy.clock
            self._block = (clock.train_iterations, clock.train_exp_epochs)
        loss = strategy.loss
        losses.append(None if loss is None else loss.detach())
        self._sizes.append(_batch_size(strategy.mbatch))
        terms = self._terms
        if terms is not None:
            self._terms = None
            if not (len(terms) == 1 and next(iter(terms.values())) is loss):  # a lone term that is the loss
                self._add(row, terms, "loss_terms/")
        if self._extra_sources:
            self._record_sources(strategy, row)
        if row + 1 >= self.flush_every:
            self._flush()

    def _record_sources(self, strategy: Any, row: int) -> None:
        weights = getattr(strategy, "loss_weights", None)
        if weights:
            self._add(row, weights, "loss_weights/")
        for plugin, keys in self._weight_sources:
            self._tensors.append((row, keys, plugin.current_weights().detach()))
        exp = self._exp
        for plugin, prefix in self._stats_sources:
            rows = plugin.stats.get(exp)
            if rows and self._stats_seen.get(id(plugin)) != (exp, len(rows)):  # the plugin added a row this iteration
                self._stats_seen[id(plugin)] = (exp, len(rows))
                self._host.append((row, prefix, rows[-1]))

    def _add(self, row: int, mapping: Mapping[str, Any], prefix: str) -> None:
        keys = self._keys
        for key, value in mapping.items():
            name = keys.get((prefix, key))
            if name is None:
                name = keys[(prefix, key)] = (prefix + key,)
            self._tensors.append((row, name, value.detach() if isinstance(value, torch.Tensor) else value))

    def after_training_epoch(self, strategy: Any, **kwargs: Any) -> None:
        clock = strategy.clock
        exp = self._exp
        now = time.perf_counter()
        self._epochs.append((len(self._losses), clock.train_iterations, exp, clock.train_exp_epochs, now - self._epoch_start))
        if now - self._last_flush >= self.flush_secs:
            self._flush()

    def after_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        self._flush(end_of_experience=strategy.clock.train_iterations)

    # ------------------------------------------------------------------ calls from the runner
    def log_eval(self, experience: int, results: Mapping[int, Mapping[str, float]],
                 accuracy_matrix: Sequence[Sequence[float]]) -> dict[str, float]:
        """After evaluating the test stream that follows training experience ``experience``.

        ``results``: the loop's ``eval`` output (``{test experience: {accuracy, loss, count}}``);
        ``accuracy_matrix``: every row so far, this step's last. Logs Avalanche's eval metrics and the
        matrix as an image; returns the values logged.
        """
        values = names.eval_metrics(results, accuracy_matrix, self.metric)
        self.log_values(experience, values, accuracy_matrix)
        return values

    def log_values(self, experience: int, values: Mapping[str, float],
                   accuracy_matrix: Sequence[Sequence[float]] | None = None) -> None:
        """Named evaluation values after training experience ``experience``, for a family whose
        evaluation is not an accuracy per test experience (multi-task: a metric per task); the matrix
        image only when ``accuracy_matrix`` is given."""
        self._flush()
        clock = getattr(self._strategy, "clock", None)
        iteration = clock.train_iterations if clock is not None else int(experience)
        for logger in self.loggers:
            logger.log_eval(iteration, int(experience), values, accuracy_matrix)

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
        self._block = (0, 0)  # iteration and epoch of the block's first row (rows are consecutive iterations)
        self._losses: list[torch.Tensor | None] = []  # strategy.loss, detached, one per iteration
        self._sizes: list[int] = []  # minibatch sizes
        self._tensors: list[tuple[int, tuple[str, ...], Any]] = []  # row, names, tensor (or float)
        self._host: list[tuple[int, str, Mapping[str, float]]] = []  # row, prefix, plugin statistics
        self._epochs: list[tuple[int, int, int, int, float]] = []  # end row, iteration, experience, epoch, seconds

    def _reset_epoch(self) -> None:
        self._epoch_loss = 0.0
        self._epoch_samples = 0
        self._epoch_sums: dict[str, tuple[float, int]] = {}

    def _to_host(self) -> tuple[list[float | None], list[list[float]]]:
        """Every pending tensor as floats (the losses, then the other entries): one ``tolist`` per device,
        none per iteration (scalar losses are stacked, other entries flattened and concatenated)."""
        losses: list[float | None] = [None] * len(self._losses)
        extra: list[list[float]] = [[]] * len(self._tensors)
        by_device: dict[torch.device, tuple[list[int], list[int]]] = {}
        for row, loss in enumerate(self._losses):
            if loss is not None:
                by_device.setdefault(loss.device, ([], []))[0].append(row)
        for k, (_, _, value) in enumerate(self._tensors):
            if isinstance(value, torch.Tensor):
                by_device.setdefault(value.device, ([], []))[1].append(k)
            else:
                extra[k] = [float(value)]
        for rows, ks in by_device.values():
            parts = [_stack_scalars([self._losses[r] for r in rows])] if rows else []
            flat = [self._tensors[k][2].reshape(-1).float() for k in ks]
            numbers = torch.cat(parts + flat).tolist() if len(parts) + len(flat) > 1 else (parts or flat)[0].tolist()
            for r, v in zip(rows, numbers):
                losses[r] = v
            pos = len(rows)
            for k, t in zip(ks, flat):
                extra[k] = numbers[pos : pos + t.numel()]
                pos += t.numel()
        return losses, extra

    def _flush(self, end_of_experience: int | None = None) -> None:
        """Pending iterations to the host and to every logger (one block), then the summaries of the
        epochs that ended among them, in order, then (at an experience's end) the histograms."""
        self._last_flush = time.perf_counter()
        n = len(self._losses)
        log = self._columns(n) if n else IterationLog()
        if n:
            for logger in self.loggers:
                logger.log_iterations(log)
        sizes = self._sizes
        start = 0
        for end, iteration, exp, epoch, seconds in self._epochs:
            self._accumulate(log, sizes, start, end)
            means = {key: total / count for key, (total, count) in self._epoch_sums.items() if count}
            if self._epoch_samples:
                means[names.LOSS_EPOCH] = self._epoch_loss / self._epoch_samples
            means[names.TIME_EPOCH] = seconds
            for logger in self.loggers:
                logger.log_epoch(iteration, exp, epoch, means)
            self._reset_epoch()
            start = end
        self._accumulate(log, sizes, start, n)  # an epoch still running: its totals carry to the next flush
        self._reset_pending()
        if end_of_experience is not None and self._dist:
            for logger in self.loggers:
                logger.log_histograms(end_of_experience, self._exp, self._dist)
            self._dist = {}
        for logger in self.loggers:
            logger.flush()

    def _columns(self, n: int) -> IterationLog:
        first, epoch = self._block
        epochs = []
        start = 0
        for end, *_ in self._epochs:  # rows after an epoch's end belong to the next epoch
            epochs += [epoch] * (end - start)
            epoch, start = epoch + 1, end
        epochs += [epoch] * (n - start)
        log = IterationLog(list(range(first, first + n)), [self._exp] * n, epochs)
        columns = log.values
        nan = math.nan
        losses, extra = self._to_host()
        if any(v is not None for v in losses):
            columns[names.LOSS_MB] = [nan if v is None else v for v in losses]
        for (row, keys, _), numbers in zip(self._tensors, extra):
            for key, value in zip(keys, numbers):
                column = columns.get(key)
                if column is None:
                    column = columns[key] = [nan] * n
                column[row] = value
        detail = set()
        keys = self._stat_keys
        for row, prefix, stats in self._host:
            for stat, value in stats.items():
                key = keys.get((prefix, stat))
                if key is None:
                    key = keys[(prefix, stat)] = f"{prefix}/{stat}"
                column = columns.get(key)
                if column is None:
                    column = columns[key] = [nan] * n
                    detail.add(key)
                column[row] = value if type(value) is float else float(value)
        log.detail = frozenset(detail)
        return log

    def _accumulate(self, log: IterationLog, sizes: list[int], start: int, end: int) -> None:
        """Add rows ``start:end`` of a flushed block to the current epoch's totals."""
        if end <= start:
            return
        sizes = sizes[start:end]
        for key, column in log.values.items():
            column = column[start:end]
            total = sum(column)
            if total == total:  # no NaN (a value recorded every row): the common case, without the pairs
                if key == names.LOSS_MB:
                    self._epoch_loss += sum(v * s for v, s in zip(column, sizes))
                    self._epoch_samples += sum(sizes)
                    continue
                old, count = self._epoch_sums.get(key, (0.0, 0))
                self._epoch_sums[key] = (old + total, count + len(column))
                if key.rsplit("/", 1)[-1] in self.histogram_stats:
                    self._dist.setdefault(key, []).extend(column)
                continue
            pairs = [(v, s) for v, s in zip(column, sizes) if v == v]  # v == v: not NaN
            if not pairs:
                continue
            if key == names.LOSS_MB:
                self._epoch_loss += sum(v * s for v, s in pairs)
                self._epoch_samples += sum(s for _, s in pairs)
                continue
            total, count = self._epoch_sums.get(key, (0.0, 0))
            self._epoch_sums[key] = (total + sum(v for v, _ in pairs), count + len(pairs))
            if key.rsplit("/", 1)[-1] in self.histogram_stats:
                self._dist.setdefault(key, []).extend(v for v, _ in pairs)
