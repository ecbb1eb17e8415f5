"""Gradient-similarity mixing of history and transfer gradients (METHODS.md section 2, steps B and C).

For every training (transfer) minibatch the plugin takes the history minibatch too, gets two gradients of
the same parameters, ``g_t`` from the transfer loss (the loop's loss, regularisers included) and ``g_h``
from the history loss, and the optimizer steps with ``g = w_h g_h + w_t g_t``, the weights set by a rule.
The formulas are pure functions in :mod:`strategies.mixing_rules`, the flat buffers in
:mod:`incremental.flat_gradients`, the library policies (step C) in :mod:`incremental.selection`, the
statistics in :mod:`strategies.mixing_stats`; this file only adapts loop callbacks to them.
"""
from __future__ import annotations

import contextlib
import numbers
import warnings
from pathlib import Path
from typing import Any, Iterator

import torch

import incremental.selection  # noqa: F401 - registers the herding and loss_stratified policies
from incremental.buffer import STORAGE_POLICIES, HistoryLibrary, StoragePolicy, make_policy
from incremental.config import check
from incremental.data import Batch, batch_size_of, concat_batches, move_to
from incremental.flat_gradients import (
    GradientBuffers, assign_flat_grad, batched_gradients_into, flatten_grads, flatten_grads_into, gather_into,
)
from incremental.linear_gradients import (
    LinearCapture, group_gradients_into, group_gram, ineligibility, output_gradients, views_by_param,
    weighted_gradients_into,
)
from incremental.plugins import Plugin
from incremental.transforms import random_shift
from .logit_memory import LogitMemory
from .mixing_rules import (
    DEFAULT_RULE, HISTORY_LOSSES, RULES, TRANSFER_LOSSES, AsymmetricCrossEntropy, Geometry, LogitAdjustedCrossEntropy,
    class_log_prior, combine, gram_matrix, is_history_weight, logit_replay_loss, mix, with_history_weight,
)
from .mixing_stats import STAT_NAMES, plot_stats, summarize_stats

#: What the plugin's own library keeps when none is named (chosen by measurement, docs/gradient_mixing.md).
DEFAULT_POLICY = "herding"
#: ``ghost``: one forward over the joint minibatch, one backward to the linear layers' outputs, the
#: geometry from per-sample Gram matrices and the mixed gradient as one weighted product per layer
#: (:mod:`incremental.linear_gradients`; models of ``nn.Linear`` layers without batch norm, in this
#: project's loop); ``fused``: one forward over the joint minibatch, one batched backward for both
#: gradients; ``two_pass``: the loop's own forward/backward for g_t, one more over the history batch for
#: g_h; ``auto``: ghost where it applies, else fused on CUDA and two passes on CPU (the faster one there,
#: docs/gradient_mixing.md).
GRADIENT_PASSES = ("auto", "ghost", "fused", "two_pass")
DISAGREED = "its gradients disagreed with the batched backward of the same graph"
#: ``auto`` takes the ghost pass from this many trainable parameters on: below it the ghost pass's fixed
#: few dozen small ops cost more than a second pass over a tiny model (CPU time per step against two
#: passes, 32 + 32 samples: 1.15x at 19k parameters, 0.99x at 51k, 0.94x at 102k, 0.91x at 204k;
#: docs/gradient_mixing.md).
GHOST_MIN_PARAMETERS = 50_000


class GradientMixingPlugin(Plugin):
    """Mixes the history gradient into the transfer gradient before every optimizer step.

    In this project's :class:`incremental.Trainer` with a history library the loop draws the history
    minibatch (``strategy.mb_history``) and leaves it to this plugin (``consumes_history``). Anywhere else
    (Avalanche's ``Naive``, our loop without a library) the plugin keeps its own library of ``mem_size``
    samples, seeded by ``seed`` or else by the run (the loop's ``seed``; in Avalanche, a draw from the torch
    generator the experiment seeded), filled after each experience.

    Per step: ``gradient_pass="fused"`` concatenates the history batch into the loop's minibatch, splits
    the output after the forward (the loop and other plugins see only the transfer part, so ``strategy.loss``
    is the transfer loss), and takes both gradients by one batched backward; the loop's own backward then
    runs on a detached stand-in (terms other plugins add to the loss after this plugin's ``before_backward``
    still reach ``g_t``). ``two_pass`` takes ``g_t`` from the loop's backward and ``g_h`` from one more
    forward/backward. Both give the same mixed gradient on models without batch norm (fused normalises
    over the joint batch, as replay does). The mixed gradient becomes every ``.grad`` as a view into a
    persistent buffer (a logger keeping ``.grad`` across steps must clone it).

    Two options change what is replayed, both off by default (docs/gradient_mixing.md, "Why this one cell"):
    ``history_shift`` shifts every replayed history image by its own random offset of up to that many
    pixels (a small library replayed for many epochs is otherwise fitted pixel for pixel), and
    ``logit_adjustment`` trains both losses on logits shifted by ``tau log pi``, ``pi`` the label
    frequencies of the experience's joint minibatches.

    ``history_weight`` (``lam``, default 1) scales the history loss before the rule reads the geometry, so
    the default rule steps with ``g_t + (lam + max(0, -g_h.g_t)/|g_h|^2) g_h``; where the two scenes share
    one head a heavier history step helped both (docs/gradient_mixing.md, "Transfer").

    Under torchrun the plugin all-reduces ``[g_h, g_t, loss_h, loss_t]`` in one collective before mixing
    (``averages_gradients`` tells the loop not to use DDP). ``stats[experience]`` holds one dict per step
    (``similarity``, ``w_h``, ``w_t``, ``norm_h``, ``norm_t``, ``loss_h``, ``loss_t``, ``conflict``).
    """

    consumes_history = True
    averages_gradients = True

    def __init__(self, rule: str = DEFAULT_RULE, *, mem_size: int = 200,
                 storage_policy: str | StoragePolicy = DEFAULT_POLICY, history_batch_size: int | None = None,
                 seed: int | None = None, gradient_pass: str = "auto", logit_weight: float = 0.3,
                 logit_adjustment: float = 0.0, history_shift: int = 0, history_weight: float = 1.0,
                 record_stats: bool = True) -> None:
        super().__init__()
        check(isinstance(rule, str) and rule in RULES, "rule",
              f"unknown gradient mixing rule {rule!r}; known: {', '.join(RULES)}")
        check(_is_int(mem_size) and mem_size >= 0, "mem_size", f"must be an integer >= 0, got {mem_size!r}")
        check(hasattr(storage_policy, "select") or storage_policy in STORAGE_POLICIES, "storage_policy",
              f"unknown policy {storage_policy!r}; known: {', '.join(sorted(STORAGE_POLICIES))}")
        check(history_batch_size is None or (_is_int(history_batch_size) and history_batch_size >= 1),
              "history_batch_size", f"must be None or an integer >= 1, got {history_batch_size!r}")
        check(seed is None or _is_int(seed), "seed", f"must be None or an integer, got {seed!r}")
        check(gradient_pass in GRADIENT_PASSES, "gradient_pass",
              f"must be one of {', '.join(GRADIENT_PASSES)}, got {gradient_pass!r}")
        check(isinstance(logit_weight, numbers.Real) and logit_weight >= 0, "logit_weight",
              f"must be a number >= 0, got {logit_weight!r}")
        check(isinstance(logit_adjustment, numbers.Real) and logit_adjustment >= 0, "logit_adjustment",
              f"must be a number >= 0, got {logit_adjustment!r}")
        check(_is_int(history_shift) and history_shift >= 0, "history_shift",
              f"must be an integer >= 0 (pixels), got {history_shift!r}")
        check(is_history_weight(history_weight), "history_weight",
              f"must be a finite number > 0, got {history_weight!r}")
        #: ``lam``: the rule mixes ``lam g_h`` with ``g_t`` (:func:`with_history_weight`; 1: the rule as stated).
        self.history_weight = float(history_weight)
        self.rule_name, self.rule = rule, with_history_weight(RULES[rule], self.history_weight)
        self.ace = TRANSFER_LOSSES[rule] == "ace"
        check(not (self.ace and logit_adjustment > 0), "logit_adjustment",
              f"the {rule} rule's asymmetric loss already leaves the other classes out; use one or the other")
        #: ``tau`` of the logit-adjusted cross-entropy both losses take (0: the loop's criterion as it is).
        self.logit_adjustment = float(logit_adjustment)
        self._label_counts: torch.Tensor | None = None  # labels of this experience's joint minibatches
        self._adjusted: LogitAdjustedCrossEntropy | None = None  # this step's criterion with that prior
        #: Each history image is translated by up to this many pixels, its own random shift every time it
        #: is replayed (0: replayed as stored); the draws come from the run's seed.
        self.history_shift = int(history_shift)
        self._shift_generator: torch.Generator | None = None
        self.logits = LogitMemory() if HISTORY_LOSSES[rule] == "der" else None
        self.logit_weight = float(logit_weight)
        self.mem_size, self.storage_policy, self.history_batch_size = int(mem_size), storage_policy, history_batch_size
        self.seed, self.gradient_pass, self.record_stats = seed, gradient_pass, record_stats
        self.library: HistoryLibrary | None = None  # our own, only when the loop has none
        self.stats: dict[int, list[dict[str, float]]] = {}
        #: The history minibatch of the current step (None when there is none), for loggers and tests.
        self.last_history_batch: Batch | None = None
        self._own_iter: Iterator[Batch] | None = None
        self._params_cache: list[torch.Tensor] | None = None
        self._bufs: GradientBuffers | None = None
        self._fused = False
        self._ghost = False  # this step takes the ghost path (a fused step with the shortcut)
        self._capture: LinearCapture | None = None  # forward hooks on the linear layers (ghost)
        self._ghost_reason: str | None = "not checked"  # why the model cannot take the ghost path
        self._ghost_checked = False  # compared once per experience with the batched backward
        self._ghost_disagreed = False  # the comparison failed once: the ghost path is off for the run
        #: Why the last mixing step did not take the ghost pass (None when it did), for people and tests.
        self.ghost_unavailable: str | None = None
        self._impure_loss = False  # another plugin added a loss term before ours, this experience
        self._saved_criterion: Any = None
        self._stored_logits: torch.Tensor | None = None  # DER: the logits stored with this step's history batch

    # ---------------------------------------------------------------- where the history comes from
    @staticmethod
    def _loop_has_history(strategy: Any) -> bool:
        return getattr(strategy, "history", None) is not None

    def _own_library(self, strategy: Any = None) -> HistoryLibrary:
        if self.library is None:
            policy = make_policy(self.storage_policy) if isinstance(self.storage_policy, str) else self.storage_policy
            self.library = HistoryLibrary(self.mem_size, policy, seed=self._library_seed(strategy))
        return self.library

    def _library_seed(self, strategy: Any) -> int:
        """The explicit ``seed``, else the loop's, else one draw from the torch generator the run seeded."""
        if self.seed is not None:
            return int(self.seed)
        loop_seed = getattr(strategy, "seed", None)
        if _is_int(loop_seed):
            return int(loop_seed)
        return int(torch.randint(0, 2**31 - 1, (1,))) if strategy is not None else 0

    def before_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        self._params_cache = None
        self._label_counts = None
        self._ghost_checked = self._impure_loss = False
        if self.logits is not None:
            self.logits.ensure(self._library(strategy), strategy.model, strategy.device)
        if self._loop_has_history(strategy):
            self._own_iter = None
            return
        library = self._own_library(strategy)
        size = self.history_batch_size or int(strategy.train_mb_size)
        self._own_iter = library.batches(size) if len(library) else None

    def after_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        self._release_capture()
        if not self._loop_has_history(strategy):
            self._own_library(strategy).update(strategy.experience.dataset, strategy=strategy)
        if self.logits is not None:  # DER: logits of the samples that came in, by the model that learned them
            self.logits.refresh(self._library(strategy), strategy.model, strategy.device)

    def _library(self, strategy: Any) -> HistoryLibrary:
        return strategy.history if self._loop_has_history(strategy) else self._own_library(strategy)

    def before_training_epoch(self, strategy: Any, **kwargs: Any) -> None:
        self._params_cache = None  # heads may have grown / parameters been frozen between epochs

    # ---------------------------------------------------------------- one step
    def before_training_iteration(self, strategy: Any, **kwargs: Any) -> None:
        if self._loop_has_history(strategy):
            batch = strategy.mb_history
        else:
            batch = move_to(next(self._own_iter), strategy.device) if self._own_iter is not None else None
        if batch is not None and self.history_shift:
            batch = self._shifted(strategy, batch)
        self.last_history_batch = batch
        if batch is not None and self.logits is not None:
            idx = self._library(strategy).last_indices
            self._stored_logits = self.logits.targets(strategy.sharder.shard(idx) if self._sharded(strategy) else idx,
                                                      strategy.device)
        if batch is not None and self.logit_adjustment > 0:
            self._count_labels(strategy.mbatch[1], batch[1])
        self._ghost = batch is not None and self._use_ghost(strategy, batch)
        self._fused = self._ghost or (batch is not None and self._use_fused(strategy, batch))
        if self._fused:
            self._transfer_batch = strategy.mbatch
            self._n_t = batch_size_of(strategy.mbatch)
            strategy.mbatch = concat_batches(strategy.mbatch, batch)
        if self._ghost:
            assert self._capture is not None
            self._capture.start()  # records the linear layers of the loop's forward; stopped in after_forward

    def _use_fused(self, strategy: Any, batch: Batch) -> bool:
        tensors = isinstance(strategy.mbatch[0], torch.Tensor) and isinstance(batch[0], torch.Tensor)
        if self.gradient_pass == "fused":
            check(tensors, "gradient_pass", "fused needs tensor inputs (detection images are lists); use two_pass")
            return True
        return tensors and self.gradient_pass == "auto" and torch.device(strategy.device).type == "cuda"

    def _use_ghost(self, strategy: Any, batch: Batch) -> bool:
        """Whether this step takes the ghost path: asked for (``ghost``) or ``auto``, the model qualifies
        (:func:`incremental.linear_gradients.ineligibility`, checked when the parameters are listed), and the
        loop is this project's (it tells whether other plugins added loss terms), unsharded, without autocast."""
        if self.gradient_pass not in ("auto", "ghost"):
            return False
        reason = None
        if not (isinstance(strategy.mbatch[0], torch.Tensor) and isinstance(batch[0], torch.Tensor)):
            reason = "the inputs are not tensors"
        elif self._sharded(strategy) or getattr(strategy, "amp", False):
            reason = "the run is sharded or uses autocast"
        elif not hasattr(strategy, "_loss_terms"):
            reason = "the loop is not this project's Trainer"
        elif self._impure_loss and self.gradient_pass == "auto":  # ghost asked for: those steps go batched
            reason = "another plugin adds a loss term before gradient mixing's before_backward"
        else:
            bufs = self._buffers(strategy)  # lists the parameters and (re)attaches the capture when they changed
            reason = self._ghost_reason
            if reason is None and self.gradient_pass == "auto" and bufs.stacked.shape[1] < GHOST_MIN_PARAMETERS:
                reason = f"fewer than {GHOST_MIN_PARAMETERS} trainable parameters: two passes cost less"
        if self.gradient_pass == "ghost":
            check(reason is None, "gradient_pass", f"ghost cannot serve this run: {reason}; use auto or two_pass")
        self.ghost_unavailable = reason
        return reason is None

    def after_forward(self, strategy: Any, **kwargs: Any) -> None:
        if self.last_history_batch is None:
            return
        if self._ghost:
            assert self._capture is not None
            self._capture.stop()
        if self._fused:  # the loop and the other plugins go on with the transfer part alone
            out = strategy.mb_output
            self._out_h, strategy.mb_output = out[self._n_t:], out[: self._n_t]
            strategy.mbatch = self._transfer_batch
        if self.ace:  # the loop's criterion() gives ER-ACE's transfer loss until before_backward
            self._saved_criterion, strategy._criterion = strategy._criterion, AsymmetricCrossEntropy()
        elif self.logit_adjustment > 0:  # ... or the logit-adjusted one, whose prior the history loss shares
            self._adjusted = LogitAdjustedCrossEntropy(
                class_log_prior(self._label_counts, strategy.mb_output.shape[1]), self.logit_adjustment)
            self._saved_criterion, strategy._criterion = strategy._criterion, self._adjusted

    def before_backward(self, strategy: Any, **kwargs: Any) -> None:
        if self._saved_criterion is not None:
            strategy._criterion, self._saved_criterion = self._saved_criterion, None
        if not self._fused:
            return
        bufs = self._buffers(strategy)
        # the loop's loss is the criterion alone when no plugin added a term before this callback
        pure = strategy.loss is getattr(strategy, "_loss_terms", None) and strategy.loss._version == 0
        loss_t = _scalar(strategy.loss)
        shard_weight = float(getattr(strategy, "_loss_weight", 1.0))
        if shard_weight != 1.0:
            loss_t = loss_t * shard_weight
        loss_h = self._weighted_history_loss(strategy, self.last_history_batch, self._out_h)
        self._out_h = None
        bufs.losses.copy_(torch.stack([loss_h.detach(), loss_t.detach()]))
        if self._ghost and not pure:  # a term that need not be per sample: not for the rest of the experience
            self._impure_loss = True
        if self._ghost:
            self._ghost = pure and self._ghost_covers(bufs)
        if self._ghost and not self._ghost_checked:
            # Once per experience, against the batched backward of the same graph: a model that breaks
            # the shortcut's assumptions in a way the structural check cannot see (a functional in-place
            # op, a layer output reused across samples) is caught here and leaves the shortcut.
            self._present = batched_gradients_into(bufs, loss_h, loss_t, retain_graph=True)
            self._ghost_checked = True
            self._dz = output_gradients(loss_h + loss_t, self._capture.records, retain_graph=True)
            if not self._ghost_agrees(bufs):
                self._ghost_disagreed = True
                self._ghost_reason = DISAGREED
                warnings.warn(f"gradient mixing: the ghost path is off for this model ({DISAGREED})")
            self._ghost, self._dz = False, None  # this step mixes the batched gradients already in bufs
            self._capture.records = []
        elif self._ghost:
            self._dz = output_gradients(loss_h + loss_t, self._capture.records, retain_graph=True)
        else:
            self._present = batched_gradients_into(bufs, loss_h, loss_t, retain_graph=True)
        # The graph is kept (it goes with the step's outputs): a plugin after this one may add a term of
        # the outputs (LwF's distillation) whose gradient the loop's backward then takes through it.
        # The loop's backward runs on a stand-in with the transfer loss's value (for loggers); a term a
        # later plugin adds to it back-propagates into .grad, which after_backward adds to g_t. This
        # project's loop skips the backward of a stand-in that nothing was added to (gradients_written);
        # other loops (Avalanche) always call it, so there the stand-in hangs from a trivial graph.
        if hasattr(strategy, "gradients_written"):
            strategy.gradients_written = True
            strategy.loss = self._stand_in = strategy.loss.detach().clone()  # its own storage: a later += stays off the graph
        else:
            anchor = torch.zeros((), device=loss_t.device, requires_grad=True)
            strategy.loss = self._stand_in = anchor + strategy.loss.detach()

    def after_backward(self, strategy: Any, **kwargs: Any) -> None:
        batch = self.last_history_batch
        if batch is None:
            if self._sharded(strategy):  # the loop left gradient averaging to this plugin: no DDP
                self._average_loop_gradient(strategy)
            return
        bufs = self._buffers(strategy)
        params = bufs.params
        if self._fused:
            if isinstance(strategy.mb_output, torch.Tensor):  # the graph kept for later terms goes now, not
                strategy.mb_output = strategy.mb_output.detach()  # when the next forward replaces the output
            later = strategy.loss is not self._stand_in or self._stand_in._version  # a term added after our
            if self._ghost and not later:  # before_backward: its gradient is in .grad, it belongs to g_t
                return self._mix_ghost(strategy, bufs)
            if self._ghost:  # the two gradients explicitly, from the same layer inputs and output gradients
                group_gradients_into(self._views_t, self._views_h, self._capture.records, self._dz, self._n_t)
                self._present, self._dz, self._capture.records = bufs.all_present, None, []
            if later:
                bufs.stacked[1].add_(flatten_grads([p.grad for p in params], params))
            present = self._present
        else:
            grads_t = [p.grad for p in params]
            gather_into(bufs.stacked[1], bufs.views_t, grads_t, params)  # before .grad (maybe `out`) is rewritten
            loss_h = self._weighted_history_loss(strategy, batch)
            grads_h = torch.autograd.grad(loss_h, params, allow_unused=True)
            gather_into(bufs.stacked[0], bufs.views_h, grads_h, params)
            bufs.losses.copy_(torch.stack([loss_h.detach(), _scalar(strategy.loss).detach()]))
            present = [a is not None or b is not None for a, b in zip(grads_t, grads_h)]
        if self._sharded(strategy):
            if not self._fused:
                bufs.losses[1] *= float(getattr(strategy, "_loss_weight", 1.0))
            from incremental.distributed import all_reduce_mean_

            all_reduce_mean_(bufs.flat)  # one collective: both gradients and both losses
        (sq_h, dot), (_, sq_t) = gram_matrix(bufs.stacked).tolist()  # the host transfers of this step
        loss_h_value, loss_t_value = bufs.losses.tolist()
        geo = Geometry(dot, sq_h, sq_t)
        w_h, w_t = self.rule(geo, loss_h_value, loss_t_value)
        combine(bufs.stacked[0], bufs.stacked[1], w_h, w_t, out=bufs.out)
        for p, view, keep in zip(params, bufs.views_out, present):  # binds views: no tensor work per parameter
            p.grad = view if keep else None
        self._record(strategy, geo, w_h, w_t, loss_h_value, loss_t_value)

    def _mix_ghost(self, strategy: Any, bufs: GradientBuffers) -> None:
        """The ghost step: geometry from the Gram matrices, then ``w_h g_h + w_t g_t`` as the gradient of
        the per-sample weighted loss, written straight into the buffer ``.grad`` points to."""
        records, dz, n_t = self._capture.records, self._dz, self._n_t
        gram = group_gram(records, dz, n_t)  # [[|g_h|^2, g_h.g_t], [., |g_t|^2]]: transfer rows come first
        (sq_h, dot), (_, sq_t) = gram.tolist()
        loss_h_value, loss_t_value = bufs.losses.tolist()
        geo = Geometry(dot, sq_h, sq_t)
        w_h, w_t = self.rule(geo, loss_h_value, loss_t_value)
        weights = torch.full((len(dz[0]),), w_h, dtype=dz[0].dtype, device=dz[0].device)
        weights[:n_t] = w_t
        weighted_gradients_into(self._views_out, records, dz, weights)
        for p, view in zip(bufs.params, bufs.views_out):
            p.grad = view
        self._dz, self._capture.records = None, []  # the step's activations are not kept to the next
        self._record(strategy, geo, w_h, w_t, loss_h_value, loss_t_value)

    def _record(self, strategy: Any, geo: Geometry, w_h: float, w_t: float, loss_h: float, loss_t: float) -> None:
        if self.record_stats:
            s = geo.similarity
            self.stats.setdefault(self._experience_id(strategy), []).append({
                "similarity": s, "w_h": w_h, "w_t": w_t, "norm_h": geo.norm_h, "norm_t": geo.norm_t,
                "loss_h": loss_h, "loss_t": loss_t, "conflict": float(s < 0.0),
            })

    # ---------------------------------------------------------------- the ghost path's bookkeeping
    def _ghost_covers(self, bufs: GradientBuffers) -> bool:
        """The forward called every layer once, on (samples, features), and every trainable parameter
        was in a called layer (else that step takes the batched backward)."""
        capture = self._capture
        if capture is None or not capture.valid:
            return False
        called = {id(p) for r in capture.records for p in (r.module.weight, r.module.bias) if p is not None}
        return all(id(p) in called for p in bufs.params)

    def _ghost_agrees(self, bufs: GradientBuffers) -> bool:
        """The explicit group gradients from the capture equal the batched backward's (in ``bufs``)."""
        pair = torch.empty_like(bufs.stacked)
        sizes = [p.numel() for p in bufs.params]
        views = [[c.view_as(p) for c, p in zip(row.split(sizes), bufs.params)] for row in pair]
        group_gradients_into(views_by_param(bufs.params, views[1]), views_by_param(bufs.params, views[0]),
                             self._capture.records, self._dz, self._n_t)
        scale = float(bufs.stacked.abs().max()) or 1.0
        return bool(torch.allclose(pair, bufs.stacked, rtol=1e-4, atol=1e-5 * scale))

    def _release_capture(self) -> None:
        if self._capture is not None:
            self._capture.remove()
            self._capture = None

    # ---------------------------------------------------------------- losses and buffers
    def _weighted_history_loss(self, strategy: Any, batch: Batch, output: Any = None) -> torch.Tensor:
        """The history loss as the loop computes a loss (its criterion, under its autocast): on ``output``
        when the joint forward gave it, else after one more forward; re-weighted for an uneven shard."""
        saved = (strategy.mbatch, strategy.mb_output, strategy._criterion)
        amp = bool(getattr(strategy, "amp", False))
        try:
            strategy.mbatch = batch
            with torch.autocast("cuda", dtype=torch.bfloat16) if amp else contextlib.nullcontext():
                strategy.mb_output = strategy.forward() if output is None else output
                if self.logit_adjustment > 0:  # the step's prior, made in after_forward
                    strategy._criterion = self._adjusted
                loss = _scalar(strategy.criterion())
                if self.logits is not None:
                    loss = loss + self.logit_weight * logit_replay_loss(strategy.mb_output, self._stored_logits)
        finally:
            strategy.mbatch, strategy.mb_output, strategy._criterion = saved
        if self._sharded(strategy):  # same re-weighting the loop applies to its own loss for uneven shards
            loss = loss * self._history_shard_weight(strategy, batch)
        return loss

    def _shifted(self, strategy: Any, batch: Batch) -> Batch:
        """The history batch with every image shifted (the library's stored tensors are left as they are)."""
        x = batch[0]
        check(isinstance(x, torch.Tensor) and x.dim() == 4, "history_shift",
              f"needs (N, C, H, W) image batches, got {type(x).__name__} of shape {tuple(getattr(x, 'shape', ()))}")
        if self._shift_generator is None:
            self._shift_generator = torch.Generator().manual_seed(self._library_seed(strategy) + 7919)
        return (random_shift(x, self.history_shift, self._shift_generator), *batch[1:])

    def _count_labels(self, *labels: Any) -> None:
        """Adds a step's transfer and history labels to this experience's counts (the prior of the
        logit-adjusted loss: the label frequencies of the joint minibatches the model trains on)."""
        for y in labels:
            check(isinstance(y, torch.Tensor) and y.dim() == 1 and not y.is_floating_point(), "logit_adjustment",
                  "needs class-index labels (a 1-d integer tensor per minibatch)")
            old = self._label_counts
            counts = torch.bincount(y, minlength=0 if old is None else len(old))  # at least as long as old
            if old is not None:
                counts[: len(old)] += old
            self._label_counts = counts

    def _buffers(self, strategy: Any) -> GradientBuffers:
        """Trainable parameters and their flat buffers, listed once per epoch (walking the modules every
        step costs more than the mixing itself on a small model); rebuilt when the parameters change."""
        if self._params_cache is None:
            self._params_cache = [p for p in strategy.model.parameters() if p.requires_grad]
            if self._bufs is None or not self._bufs.fits(self._params_cache):
                self._bufs = GradientBuffers(self._params_cache)
            if self.gradient_pass in ("auto", "ghost"):  # layers may have been replaced (a grown head)
                self._release_capture()
                self._ghost_reason = DISAGREED if self._ghost_disagreed else ineligibility(strategy.model, self._params_cache)
                if self._ghost_reason is None:
                    self._capture = LinearCapture(strategy.model)
                    bufs = self._bufs
                    self._views_h = views_by_param(bufs.params, bufs.views_h)
                    self._views_t = views_by_param(bufs.params, bufs.views_t)
                    self._views_out = views_by_param(bufs.params, bufs.views_out)
        assert self._bufs is not None
        return self._bufs

    # ---------------------------------------------------------------- data parallelism (our loop only)
    @staticmethod
    def _sharded(strategy: Any) -> bool:
        sharder = getattr(strategy, "sharder", None)
        return bool(sharder is not None and sharder.active)

    def _average_loop_gradient(self, strategy: Any) -> None:
        """No history yet (first experience): average the loop's gradient over ranks, as DDP would."""
        from incremental.distributed import all_reduce_mean_

        bufs = self._buffers(strategy)
        grads = [p.grad for p in bufs.params]
        gather_into(bufs.out, bufs.views_out, grads, bufs.params)
        all_reduce_mean_(bufs.out)
        assign_flat_grad(bufs.params, bufs.out, [g is not None for g in grads])

    @staticmethod
    def _history_shard_weight(strategy: Any, batch: Batch) -> float:
        """``n_rank * world / n_global`` for this rank's share of the global history minibatch."""
        n_global = int(getattr(strategy.history, "last_global_batch_size", 0) or 0)
        if n_global <= 0:
            return 1.0
        return batch_size_of(batch) * strategy.sharder.world / n_global

    @staticmethod
    def _experience_id(strategy: Any) -> int:
        exp = getattr(strategy, "experience", None)
        return int(getattr(exp, "current_experience", 0) or 0)

    # ---------------------------------------------------------------- statistics and state
    def summary(self) -> dict[int, dict[str, float]]:
        """Per experience: iterations, mean of every statistic, fraction of conflicting steps (s < 0)."""
        return summarize_stats(self.stats)

    def plot_stats(self, out_dir: str | Path, prefix: str = "gradient_mixing") -> list[Path]:
        """One PNG per experience: similarity, weights, gradient norms and the running conflict fraction."""
        return plot_stats(self.stats, out_dir, prefix, self.rule_name)

    def state_dict(self) -> dict[str, Any]:
        return {"library": None if self.library is None else self.library.state_dict(),
                "logits": None if self.logits is None else self.logits.state_dict(),
                "shift_generator": None if self._shift_generator is None else self._shift_generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("library") is not None:
            self._own_library().load_state_dict(state["library"])
        if self.logits is not None and state.get("logits") is not None:
            self.logits.load_state_dict(state["logits"])
        if state.get("shift_generator") is not None:
            self._shift_generator = torch.Generator()
            self._shift_generator.set_state(state["shift_generator"])


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _scalar(loss: torch.Tensor) -> torch.Tensor:
    return loss if loss.dim() == 0 else loss.sum()


__all__ = [
    "GradientMixingPlugin", "DEFAULT_POLICY", "GRADIENT_PASSES", "STAT_NAMES",
    # re-exported for callers of the one-file version
    "RULES", "mix", "flatten_grads", "flatten_grads_into", "assign_flat_grad",
]
