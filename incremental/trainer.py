"""The training loop: Avalanche's SupervisedTemplate shape, a plain PyTorch loop's cost.

Read top to bottom: ``train`` -> ``_train_experience`` -> ``_train_epoch`` -> one iteration, then
``eval``. Callback names, order and strategy attributes follow Avalanche 0.6's SupervisedTemplate
(``training_epoch`` in ``update_type/sgd_update.py``, ``_before_training_exp`` in ``base_sgd.py``),
so Avalanche plugins (LwF, EWC, ...) run here unmodified and ours run in Avalanche. Two things are
ours: minibatches are tensor slices instead of per-sample ``__getitem__`` calls, and callbacks are
dispatched only to plugins that override them. Both are what make the loop cost about what a
hand-written loop costs (``benchmarks/loop_overhead.py``).

The history library (replay buffer) belongs to the loop. For every training minibatch the loop draws
the next history minibatch (``mb_history``), cycling through the library. Unless a plugin declares
``consumes_history = True`` (gradient mixing takes its own gradient from it), the history minibatch
is concatenated into ``mbatch`` before ``before_training_iteration``, which is what Avalanche's replay
does; either way ``mb_history`` stays visible to plugins.
"""
from __future__ import annotations

import contextlib
import math
import random
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from . import distributed as dist_utils
from .buffer import HistoryLibrary
from .data import (
    Batch, EpochBatchSampler, TensorSamples, as_batch, batch_indices, batch_size_of, concat_batches, dataset_labels,
    eval_view, global_batch_sizes, in_memory, make_loader, move_to, train_view,
)
from .guards import LossGuard, collapsed_class
from .plugins import ALL_CALLBACKS, overrides


class Clock:
    """Counters with Avalanche's names and update points (Avalanche runs its Clock as the last
    plugin, so every plugin sees the value from before the update of the current callback)."""

    def __init__(self) -> None:
        self.train_iterations = 0
        self.train_exp_counter = 0
        self.train_exp_epochs = 0
        self.train_exp_iterations = 0
        self.train_epoch_iterations = 0
        self.total_iterations = 0

    def state_dict(self) -> dict[str, int]:
        return dict(vars(self))

    def load_state_dict(self, state: dict[str, int]) -> None:
        for key, value in state.items():
            setattr(self, key, int(value))


class ClassificationAccumulator:
    """Accuracy and mean loss over one evaluation experience.

    A label the (growing) head has no output for yet counts as wrong and is left out of the loss.
    """

    def __init__(self, criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
        self.criterion = criterion
        self.correct = 0
        self.count = 0
        self.loss_sum = 0.0
        self.loss_count = 0
        # how often each class was predicted, and each true class seen: a model that answers one
        # class for a test set of several has collapsed (incremental.guards.collapsed_class)
        self.predicted: torch.Tensor | None = None
        self.labels: torch.Tensor | None = None

    @staticmethod
    def _add_counts(total: torch.Tensor | None, values: torch.Tensor, size: int) -> torch.Tensor:
        counts = torch.bincount(values, minlength=size).to(torch.float64)
        if total is None:
            return counts
        if len(total) < len(counts):  # the head grew, or a larger label came
            total = torch.cat([total, total.new_zeros(len(counts) - len(total))])
        total[: len(counts)] += counts
        return total

    def update(self, output: torch.Tensor, y: torch.Tensor) -> None:
        predicted = output.argmax(dim=1)
        self.correct += int((predicted == y).sum())
        if len(y):
            self.predicted = self._add_counts(self.predicted, predicted, output.shape[1])
            self.labels = self._add_counts(self.labels, y, output.shape[1])
        n = len(y)
        self.count += n
        if isinstance(self.criterion, nn.CrossEntropyLoss) and self.criterion.weight is None:
            # one pass: per-sample cross-entropy, labels the head cannot output yet left out
            known = y < output.shape[1]
            losses = nn.functional.cross_entropy(output, torch.where(known, y, 0), reduction="none")
            self.loss_sum += float(losses.mul_(known).sum())
            self.loss_count += int(known.sum()) if n else 0
            return
        if int(y.max()) >= output.shape[1]:  # labels the head cannot output yet
            keep = y < output.shape[1]
            output, y = output[keep], y[keep]
        if len(y):
            self.loss_sum += float(self.criterion(output, y)) * len(y)
            self.loss_count += len(y)

    def all_reduce(self) -> None:
        """Sum the counts of every rank, so sharded evaluation reports the single-process numbers."""
        totals = torch.tensor([self.correct, self.count, self.loss_sum, self.loss_count], dtype=torch.float64)
        dist_utils.all_reduce_sum_(totals)
        self.correct, self.count, self.loss_count = int(totals[0]), int(totals[1]), int(totals[3])
        self.loss_sum = float(totals[2])
        for name in ("predicted", "labels"):  # every rank evaluates the same head: same lengths
            counts = getattr(self, name)
            if counts is not None:
                dist_utils.all_reduce_sum_(counts)

    def result(self) -> dict[str, float]:
        true_classes = 0 if self.labels is None else int((self.labels > 0).sum())
        collapsed = None if self.predicted is None else collapsed_class(self.predicted, true_classes)
        return {
            "accuracy": self.correct / max(self.count, 1),
            "loss": self.loss_sum / self.loss_count if self.loss_count else float("nan"),
            "count": self.count,
            "predicted_classes": 0 if self.predicted is None else int((self.predicted > 0).sum()),
            "true_classes": true_classes,
            "collapsed_to": -1 if collapsed is None else collapsed,  # the one class answered, or -1
        }


def experience_classes(experience: Any, dataset: Any) -> list[int]:
    classes = getattr(experience, "classes_in_this_experience", None)
    if classes is None:
        classes = sorted(set(dataset_labels(dataset).tolist()))
    return sorted(int(c) for c in classes)


def grow_model(model: nn.Module, n_classes: int) -> None:
    """Call ``grow_to(n_classes)`` on every module that has one (growing heads, models that grow)."""
    for module in model.modules():
        grow = getattr(module, "grow_to", None)
        if callable(grow):
            grow(n_classes)


class Trainer:
    """Continual-learning loop over a stream of experiences, with plugins and a history library.

    ``history`` is the shared replay buffer (``None`` or capacity 0 for no replay);
    ``history_mb_size`` is the history minibatch size (default: ``train_mb_size``, as Avalanche's
    replay). ``seed`` drives the loop's own generator (shuffling), independent of the global RNG.

    Data: an experience whose dataset is an in-memory :class:`~incremental.data.TensorSamples` /
    ``ListSamples`` is sliced directly (the fast path); any other map-style dataset is read through a
    ``DataLoader`` with ``num_workers`` worker processes (persistent across the epochs of an
    experience), its transforms running per sample and per epoch. Both paths draw the same order
    from the same seed.

    ``grad_clip``: the gradient's total norm is clipped to this value right before each optimizer
    step, after every plugin has written its gradient (gradient mixing's mixed one included). Why
    here and not in a plugin's ``before_update``: a plugin listed before another that rewrites
    ``.grad`` would clip the wrong gradient.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        criterion: Callable[..., torch.Tensor] | None = None,
        *,
        train_mb_size: int = 32,
        train_epochs: int = 1,
        eval_mb_size: int | None = None,
        device: str | torch.device = "cpu",
        plugins: Sequence[Any] | None = None,
        history: HistoryLibrary | None = None,
        history_mb_size: int | None = None,
        seed: int = 0,
        shuffle: bool = True,
        progress: bool = False,
        eval_accumulator: Callable[["Trainer"], Any] | None = None,
        amp: bool = False,
        num_workers: int = 0,
        persistent_workers: bool = True,
        grad_clip: float | None = None,
    ) -> None:
        from .config import check

        check(int(train_mb_size) >= 1, "train_mb_size", f"must be >= 1, got {train_mb_size}")
        check(int(train_epochs) >= 1, "train_epochs", f"must be >= 1, got {train_epochs}")
        check(eval_mb_size is None or int(eval_mb_size) >= 1, "eval_mb_size", f"must be >= 1, got {eval_mb_size}")
        check(history_mb_size is None or int(history_mb_size) >= 1, "history_mb_size",
              f"must be >= 1, got {history_mb_size}")
        check(int(num_workers) >= 0, "num_workers", f"must be >= 0, got {num_workers}")
        check(grad_clip is None or (math.isfinite(grad_clip) and grad_clip > 0), "grad_clip",
              f"must be a finite number > 0 or None, got {grad_clip}")
        self.device = torch.device(device)
        # Sample sets live on the CPU; moving a CPU batch to the CPU is a no-op we skip per iteration.
        self._move = self.device.type != "cpu"
        self.model = model.to(self.device)
        self.optimizer = optimizer
        self._criterion = criterion if criterion is not None else nn.CrossEntropyLoss()
        self.train_mb_size = int(train_mb_size)
        self.train_epochs = int(train_epochs)
        self.eval_mb_size = int(eval_mb_size or max(train_mb_size, 256))
        self.plugins: list[Any] = list(plugins or [])
        self.history = history
        self.history_mb_size = int(history_mb_size or train_mb_size)
        self.shuffle = shuffle
        self.progress = progress
        self.seed = int(seed)
        self.generator = torch.Generator().manual_seed(self.seed)
        self.num_workers = int(num_workers)
        self.persistent_workers = bool(persistent_workers)
        self._train_loader: Any = None
        self.eval_accumulator = eval_accumulator or (lambda s: ClassificationAccumulator(s._criterion))
        self.clock = Clock()
        self.retain_graph = False
        self.classes_seen: set[int] = set()
        # Data parallelism (no-op in one process): each rank trains on its share of every global
        # minibatch; see incremental/distributed.py.
        self.sharder = dist_utils.GlobalBatchSharder()
        self.amp = bool(amp) and self.device.type == "cuda"
        self._ddp: nn.Module | None = None
        self._loss_weight = 1.0
        self.loss_guard = LossGuard()  # NaN / inf loss -> NonFiniteLossError (see incremental/guards.py)
        self.grad_clip = None if grad_clip is None else float(grad_clip)

        # Strategy attributes plugins read (Avalanche's names).
        self.experience: Any = None
        self.adapted_dataset: Any = None
        self.dataloader: Iterable[Batch] | None = None
        self.mbatch: Batch | None = None
        self.mb_history: Batch | None = None
        self.mb_output: Any = None
        self.loss: torch.Tensor | None = None
        self._loss_terms: dict[str, torch.Tensor] | torch.Tensor = {}
        #: Set by a plugin that has written this step's gradients itself (gradient mixing's one-pass
        #: paths) and left a loss that needs no backward; reset before every step's before_backward.
        self.gradients_written = False
        self.is_training = False
        self.current_eval_stream: Any = None
        self._stop_training = False
        self._history_iter: Iterator[Batch] | None = None
        self._callbacks: dict[str, list[Callable[..., Any]]] = {}
        self._refresh_callbacks()

    # ------------------------------------------------------------------ plugin dispatch
    def _refresh_callbacks(self) -> None:
        """Bind, per callback, only the plugins that override it (a no-op costs nothing then)."""
        self._callbacks = {
            name: [getattr(p, name) for p in self.plugins if overrides(p, name)] for name in ALL_CALLBACKS
        }
        self.consumes_history = any(getattr(p, "consumes_history", False) for p in self.plugins)
        self._loss_before_criterion = any(self._callbacks[name] for name in
                                          ("before_training_iteration", "before_forward", "after_forward"))
        # A plugin that averages gradients over ranks itself (gradient mixing: one flat all-reduce per
        # gradient) must not get DDP's all-reduce on top of it.
        self.plugin_averages_gradients = any(getattr(p, "averages_gradients", False) for p in self.plugins)

    def _fire(self, name: str, **kwargs: Any) -> None:
        for callback in self._callbacks[name]:
            callback(self, **kwargs)

    def add_plugin(self, plugin: Any) -> None:
        self.plugins.append(plugin)
        self._refresh_callbacks()

    # ------------------------------------------------------------------ minibatch views
    @property
    def mb_x(self) -> Any:
        return self.mbatch[0]

    @property
    def mb_y(self) -> Any:
        return self.mbatch[1]

    @property
    def mb_task_id(self) -> Any:
        return self.mbatch[-1]

    @property
    def mb_history_x(self) -> Any:
        return None if self.mb_history is None else self.mb_history[0]

    @property
    def mb_history_y(self) -> Any:
        return None if self.mb_history is None else self.mb_history[1]

    @property
    def is_eval(self) -> bool:
        return not self.is_training

    # ------------------------------------------------------------------ overridable steps
    def forward(self) -> Any:
        module = self._ddp if (self._ddp is not None and self.is_training) else self.model
        return module(self.mb_x)

    def criterion(self) -> torch.Tensor:
        """The minibatch loss. A family's criterion may return named loss terms (a dict: a detector's
        four losses, one per task); they are summed here and kept in ``loss_terms`` for plugins that
        weight them (dynamic loss weighting)."""
        loss = self._criterion(self.mb_output, self.mb_y)
        if isinstance(loss, torch.Tensor):
            self._loss_terms = loss  # the one term, made a dict only if someone asks
            return loss
        self._loss_terms = dict(loss)
        return sum(self._loss_terms.values())  # type: ignore[return-value]

    @property
    def loss_terms(self) -> dict[str, torch.Tensor]:
        """Named terms of the last ``criterion()`` (their sum is what it added to ``loss``)."""
        terms = self._loss_terms
        return {"loss": terms} if isinstance(terms, torch.Tensor) else terms

    @loss_terms.setter
    def loss_terms(self, terms: dict[str, torch.Tensor]) -> None:
        self._loss_terms = terms

    def backward(self) -> None:
        # A plugin that wrote the gradients itself leaves a loss without a graph: nothing to propagate
        # (a term another plugin adds after it brings a graph back, and its gradient is taken).
        if self.gradients_written and not self.loss.requires_grad:
            return
        # With uneven shards (an epoch's last minibatch) each rank's mean loss is re-weighted so that
        # the average over ranks is the mean over the global minibatch.
        loss = self.loss if self._loss_weight == 1.0 else self.loss * self._loss_weight
        loss.backward(retain_graph=self.retain_graph)

    def optimizer_step(self) -> None:
        if self.grad_clip is not None:  # (parameters without a gradient are skipped by clip_grad_norm_)
            params = [p for group in self.optimizer.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(params, self.grad_clip)  # on the device: no host sync
        self.optimizer.step()

    def stop_training(self) -> None:
        self._stop_training = True

    def _autocast(self) -> Any:
        """bfloat16 autocast on GPUs with ``amp``; a no-op context otherwise (entering a disabled
        ``torch.autocast`` still costs a few microseconds per step)."""
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.amp else _NO_CONTEXT

    def _make_empty_loss(self) -> torch.Tensor:
        return torch.zeros(1, device=self.device)

    def model_adaptation(self, model: nn.Module | None = None) -> nn.Module:
        """Grow every growing classifier head to cover the classes seen so far (old rows kept)."""
        model = model if model is not None else self.model
        if self.classes_seen:
            grow_model(model, max(self.classes_seen) + 1)
        return model.to(self.device)

    def make_optimizer(self) -> None:
        """Point the optimizer at the model's current parameters (they change when a head grows).

        Optimizer state (momentum, Adam moments) is kept for parameters that did not change; a grown
        head is a new parameter and starts with fresh state.
        """
        params = [p for p in self.model.parameters() if p.requires_grad]
        current = [p for group in self.optimizer.param_groups for p in group["params"]]
        if [id(p) for p in params] == [id(p) for p in current]:
            return
        if len(self.optimizer.param_groups) != 1:
            raise ValueError(
                "the model's parameters changed (a head grew) and the optimizer has several param groups; "
                "override Trainer.make_optimizer to rebuild them"
            )
        keep = {id(p) for p in params}
        for p in list(self.optimizer.state):
            if id(p) not in keep:
                del self.optimizer.state[p]
        self.optimizer.param_groups[0]["params"] = params

    # ------------------------------------------------------------------ training
    def train(self, experiences: Any, eval_streams: Any = None, **kwargs: Any) -> None:
        """Train on one experience or a sequence of them, in order."""
        if hasattr(experiences, "current_experience"):
            experiences = [experiences]
        self.is_training = True
        self._stop_training = False
        self.model.train()
        self.model.to(self.device)
        self._fire("before_training", **kwargs)
        for self.experience in experiences:
            self._before_training_exp(**kwargs)
            self._train_experience(**kwargs)
            self._after_training_exp(**kwargs)
        self._fire("after_training", **kwargs)
        self.is_training = False

    def _before_training_exp(self, **kwargs: Any) -> None:
        self._fire("before_train_dataset_adaptation", **kwargs)
        self.adapted_dataset = train_view(self.experience.dataset)
        self._fire("after_train_dataset_adaptation", **kwargs)
        self._train_loader = self._make_train_loader()
        self.classes_seen.update(experience_classes(self.experience, self.adapted_dataset))
        self.model = self.model_adaptation()
        self.make_optimizer()
        self._wrap_for_data_parallel()
        if self.history is not None:
            self.history.adopt_transforms(self.adapted_dataset)  # replayed samples are augmented like new ones
        self._history_iter = (
            self.history.batches(self.history_mb_size, self.sharder) if self.history is not None and len(self.history) else None
        )
        self._fire("before_training_exp", **kwargs)
        self.loss_guard.start(getattr(self.experience, "current_experience", self.clock.train_exp_counter))
        self.clock.train_exp_iterations = 0
        self.clock.train_exp_epochs = 0

    def _wrap_for_data_parallel(self) -> None:
        """DDP around the (possibly grown) model; parameters changed, so wrap anew per experience."""
        self._ddp = None
        if not self.sharder.active:
            return
        if self.plugin_averages_gradients:
            for tensor in [*self.model.parameters(), *self.model.buffers()]:
                dist_utils.broadcast_(tensor.data)  # DDP would do this; start every rank equal
            return
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        self._ddp = DistributedDataParallel(self.model, device_ids=ids)

    def _train_experience(self, **kwargs: Any) -> None:
        epochs = tqdm(
            range(self.train_epochs),
            desc=f"experience {self.experience.current_experience} epochs",
            leave=False,
            disable=not (self.progress and dist_utils.is_main_process()),
        )
        for _ in epochs:
            self._fire("before_training_epoch", **kwargs)
            self.clock.train_epoch_iterations = 0
            if self._stop_training:
                self._stop_training = False
                break
            self._train_epoch(**kwargs)
            self._fire("after_training_epoch", **kwargs)
            self.clock.train_exp_epochs += 1

    def _make_train_loader(self) -> Any:
        """A DataLoader for datasets off the fast path; None for in-memory sample sets."""
        if in_memory(self.adapted_dataset) is not None:
            return None
        sampler = EpochBatchSampler(len(self.adapted_dataset), self.train_mb_size, self.generator, self.shuffle,
                                    drop_smaller_than=self.sharder.world, sharder=self.sharder)
        # Workers' RNGs (random augmentation) from the run's seed and the experience, not from the
        # loop's generator, so both data paths draw the same sample order.
        worker_seed = self.seed * 1_000_003 + self.clock.train_exp_counter
        return make_loader(self.adapted_dataset, sampler, num_workers=self.num_workers,
                           pin_memory=self.device.type == "cuda", persistent_workers=self.persistent_workers,
                           seed=worker_seed)

    def _training_batches(self) -> Iterator[tuple[Batch, int]]:
        """One epoch of (this rank's minibatch, global minibatch size), from either data path."""
        sharder = self.sharder
        n = len(self.adapted_dataset)
        samples = in_memory(self.adapted_dataset)
        if samples is not None:
            for global_idx in batch_indices(n, self.train_mb_size, self.generator, self.shuffle,
                                            drop_smaller_than=sharder.world):
                yield samples.batch(sharder.shard(global_idx) if sharder.active else global_idx), len(global_idx)
            return
        sizes = global_batch_sizes(n, self.train_mb_size, sharder.world)
        for batch, n_global in zip(self._train_loader, sizes):
            yield as_batch(batch), n_global

    def _train_epoch(self, **kwargs: Any) -> None:
        sharder = self.sharder
        self.dataloader = self._training_batches()
        for batch, n_global_batch in self.dataloader:
            if self._stop_training:
                break
            self.mb_history = next(self._history_iter) if self._history_iter else None
            if self._move:
                batch = move_to(batch, self.device)
                self.mb_history = move_to(self.mb_history, self.device)
            concat = self.mb_history is not None and not self.consumes_history
            if sharder.active:
                # rank's share of the samples in this step / its equal share (exact global mean)
                n_rank, n_global = batch_size_of(batch), n_global_batch
                if concat:
                    n_rank += batch_size_of(self.mb_history)
                    n_global += self.history.last_global_batch_size
                self._loss_weight = n_rank * sharder.world / n_global
            if concat:
                batch = concat_batches(batch, self.mb_history)
            self.mbatch = batch
            self._fire("before_training_iteration", **kwargs)

            self.optimizer.zero_grad()
            # Avalanche computes ``loss = zeros(1)``, plugins may add to it before the forward pass, then
            # ``loss += criterion``. When no plugin can have touched it (none listens before the
            # criterion) or none did (the empty loss's version counter is unchanged), the sum is the
            # criterion itself: taking it directly saves an allocation and an autograd node per step.
            empty = self._make_empty_loss() if self._loss_before_criterion else None
            self.loss = empty

            with self._autocast():
                self._fire("before_forward", **kwargs)
                self.mb_output = self.forward()
                self._fire("after_forward", **kwargs)
                if self.loss is empty and (empty is None or empty._version == 0):
                    self.loss = self.criterion()
                else:
                    self.loss += self.criterion()

            self.gradients_written = False
            self._fire("before_backward", **kwargs)
            self.backward()
            self._fire("after_backward", **kwargs)

            self._fire("before_update", **kwargs)
            self.optimizer_step()
            self._fire("after_update", **kwargs)

            self._fire("after_training_iteration", **kwargs)
            self.loss_guard.observe(self.loss, self.clock.train_exp_iterations)
            clock = self.clock
            clock.train_epoch_iterations += 1
            clock.train_exp_iterations += 1
            clock.train_iterations += 1
            clock.total_iterations += 1

    def _after_training_exp(self, **kwargs: Any) -> None:
        # The library learns the experience before plugins see after_training_exp, so a plugin that
        # snapshots state there (a checkpoint, a copy of the old model) sees the updated library.
        self.loss_guard.check()
        if self.history is not None:
            self.history.update(self.adapted_dataset, strategy=self)
        self._train_loader = None  # ends persistent workers
        self._fire("after_training_exp", **kwargs)
        self.clock.train_exp_counter += 1

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def eval(self, stream: Any, **kwargs: Any) -> dict[int, dict[str, float]]:
        """Evaluate on every experience of ``stream``; returns ``{experience id: metrics}``."""
        if hasattr(stream, "current_experience"):
            stream = [stream]
        was_training = self.model.training
        prev_state = (self.is_training, self.experience, self.mbatch, self.mb_output)
        self.is_training = False
        self.model.eval()
        self.current_eval_stream = stream
        results: dict[int, dict[str, float]] = {}
        self._fire("before_eval", **kwargs)
        for self.experience in stream:
            self._fire("before_eval_dataset_adaptation", **kwargs)
            self.adapted_dataset = eval_view(self.experience.dataset)
            self._fire("after_eval_dataset_adaptation", **kwargs)
            self._fire("before_eval_exp", **kwargs)
            accumulator = self.eval_accumulator(self)
            # Sharded evaluation when the accumulator can sum its counts over ranks; otherwise every
            # rank evaluates everything (same numbers, more work).
            shard = self.sharder.active and hasattr(accumulator, "all_reduce")
            for batch in self._eval_batches(shard):
                self.mbatch = move_to(batch, self.device) if self._move else batch
                self._fire("before_eval_iteration", **kwargs)
                self._fire("before_eval_forward", **kwargs)
                with self._autocast():
                    self.mb_output = self.forward()
                self._fire("after_eval_forward", **kwargs)
                accumulator.update(self.mb_output, self.mb_y)
                self._fire("after_eval_iteration", **kwargs)
                self.clock.total_iterations += 1
            if shard:
                accumulator.all_reduce()
            results[int(self.experience.current_experience)] = accumulator.result()
            self._fire("after_eval_exp", **kwargs)
        self._fire("after_eval", **kwargs)
        self.model.train(was_training)
        self.is_training, self.experience, self.mbatch, self.mb_output = prev_state
        return results

    def _eval_batches(self, shard: bool) -> Iterator[Batch]:
        """Minibatches of the evaluation dataset in order (this rank's share when ``shard``)."""
        dataset = self.adapted_dataset
        samples = in_memory(dataset)
        if samples is not None:
            if not shard and isinstance(samples, TensorSamples):  # in order: slices are views, no copy
                for start in range(0, len(samples), self.eval_mb_size):
                    yield samples.slice(start, start + self.eval_mb_size)
                return
            for global_idx in batch_indices(len(samples), self.eval_mb_size, None, shuffle=False):
                idx = self.sharder.shard(global_idx) if shard else global_idx
                if len(idx):
                    yield samples.batch(idx)
            return
        sampler = EpochBatchSampler(len(dataset), self.eval_mb_size, None, shuffle=False,
                                    sharder=self.sharder if shard else None)
        loader = make_loader(dataset, sampler, num_workers=self.num_workers, pin_memory=self.device.type == "cuda",
                             seed=self.seed)
        for batch in loader:
            if batch_size_of(as_batch(batch)):
                yield as_batch(batch)

    # ------------------------------------------------------------------ state for checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly where the loop stopped (between experiences)."""
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "history": None if self.history is None else self.history.state_dict(),
            "clock": self.clock.state_dict(),
            "classes_seen": sorted(self.classes_seen),
            "generator": self.generator.get_state(),
            "rng": capture_rng_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.classes_seen = set(int(c) for c in state["classes_seen"])
        self.model = self.model_adaptation()  # grow heads first so the weights fit
        self.model.load_state_dict(state["model"])
        self.make_optimizer()
        self.optimizer.load_state_dict(state["optimizer"])
        if self.history is not None and state["history"] is not None:
            self.history.load_state_dict(state["history"])
        self.clock.load_state_dict(state["clock"])
        self.generator.set_state(state["generator"])
        restore_rng_state(state["rng"])


_NO_CONTEXT = contextlib.nullcontext()


def capture_rng_state() -> dict[str, Any]:
    """Global RNG states (torch, numpy, python) as plain tensors/lists for a weights-only checkpoint."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(float, np_state[2:])],
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached)))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def seed_everything(seed: int) -> None:
    """Seed torch, numpy and python RNGs (model init, dropout, data generation)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
