"""Dynamic loss weights with a per-sample loss mask (METHODS.md section 1), as a plugin.

The plugin is the adapter between the loop and the pure formulas of
:mod:`incremental.multitask.weighting`. It weighs losses in one of two ways:

- **criterion mode** (multi-task heads, any loop): ``plugin.criterion(mb_output, mb_y)`` is the loss
  to hand to the loop (``Trainer(criterion=...)`` or Avalanche's ``Naive(criterion=...)``): per
  task, the mean loss over the samples that have a label (formula 10's mask; a batch without labels
  for a task adds exactly 0), then the weighted sum with the current weights (formula 9).
- **named-terms mode** (any model family): when the criterion was not called and the loop exposes
  ``strategy.loss_terms`` (``{name: scalar tensor}`` whose plain sum the loop put in
  ``strategy.loss``), ``before_backward`` replaces that plain sum by the weighted one; the term
  names are read at the first iteration unless given. Other terms in ``strategy.loss`` (replay,
  distillation added by other plugins) are left as they are.

Either way it accumulates each term's loss for the period statistics (training minibatches only).

- A period is ``period_epochs`` epochs (default 1) or ``period_steps`` training iterations. At its end
  the period's mean losses are stored and, for the DWA family, the next period's weights computed;
  periods 1 and 2 use the fixed weights (default 1), so the weights are dynamic from period 3 on and
  never change inside a period.
- ``gradnorm`` and ``uncertainty`` learn their weights every step, from the first step (as published);
  their parameters and optimizers live in the plugin, so they work in any loop: GradNorm updates
  its weights in ``before_backward`` (per-task gradient norms w.r.t. the model's shared layer by
  ``autograd.grad`` on that layer only), uncertainty weighting steps its log-variances in
  ``after_update`` from the gradient the loop's backward left.

Methods: ``dwa_ema_exp`` (3, 5, 8), ``dwa_ema`` (3, 5, 6), ``dwa_ratio`` (3, 4), ``dwa`` (Liu et al.,
T = 2), ``gradnorm`` (alpha 1.5), ``uncertainty`` (Kendall et al.), ``equal``, ``fixed``; and the
scale-invariant variants (not in METHODS.md), whose weights are the named formula's on the raw
losses but multiply ``L_k / s_k`` or ``log L_k``: ``dwa_ema_exp_init`` (``s_k`` the task's first
minibatch loss), ``dwa_ema_exp_running`` (``s_k`` its mean loss over the previous period),
``dwa_ema_exp_log`` and ``equal_log`` (``log(L_k + eps)``, dual-balancing MTL's loss-scale part).
Under data parallelism the ``initial`` scale is each rank's own first batch (the gradients DDP
averages then come from per-rank objectives that differ by constant factors; the parameters stay
in sync); period statistics, hence weights and ``previous_period`` scales, are all-reduced.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from incremental import distributed as dist_utils
from incremental.config import check
from incremental.multitask.tasks import TaskSpec, masked_task_losses, task_specs_by_name
from incremental.multitask.weighting import (
    DWA_METHODS,
    METHODS,
    dynamic_weights,
    fixed_weight_vector,
    gradnorm_loss,
    gradnorm_targets,
    period_scales,
    renormalize,
    split_method,
    transform_losses,
    uncertainty_loss,
    uncertainty_weights,
    weighted_sum,
)
from incremental.plugins import Plugin

FIXED_PERIODS = 2  # periods 1 and 2 have no loss history: fixed weights


class PeriodSchedule:
    """Period-by-period weights of the DWA family and ``equal`` / ``fixed``: the state between periods.

    ``close(mean_losses)`` ends the current period with its mean task losses (nan = no measurement)
    and returns the weights of the next one. Periods 1 and 2 get ``fixed``; from period 3 on,
    :func:`~incremental.multitask.weighting.dynamic_weights` of the two previous periods.
    """

    def __init__(self, method: str, fixed: torch.Tensor, beta: float = 0.9, temperature: float | None = None) -> None:
        self.method = method
        self.fixed = fixed.float()
        self.beta = beta
        self.temperature = temperature
        self.losses: list[torch.Tensor] = []
        self.ema: torch.Tensor | None = None
        self.weights = self.fixed.clone() if method != "equal" else torch.ones_like(self.fixed)

    @property
    def period(self) -> int:
        """1-based index of the period in progress."""
        return len(self.losses) + 1

    def close(self, mean_losses: torch.Tensor) -> torch.Tensor:
        self.losses.append(mean_losses.detach().double().clone())
        if self.method in DWA_METHODS and len(self.losses) >= FIXED_PERIODS:
            w, self.ema = dynamic_weights(self.method, self.losses[-1], self.losses[-2], self.ema,
                                          beta=self.beta, temperature=self.temperature)
            self.weights = w.float()
        return self.weights

    def state_dict(self) -> dict[str, Any]:
        return {"losses": [l.clone() for l in self.losses], "ema": self.ema, "weights": self.weights.clone()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.losses = [torch.as_tensor(l, dtype=torch.float64) for l in state["losses"]]
        self.ema = None if state["ema"] is None else torch.as_tensor(state["ema"], dtype=torch.float64)
        self.weights = torch.as_tensor(state["weights"], dtype=torch.float32)


def default_shared_layer(model: nn.Module) -> nn.Module:
    """The model's ``last_shared_layer`` (HydraNet's fusion conv); GradNorm needs one."""
    layer = getattr(model, "last_shared_layer", None)
    if not isinstance(layer, nn.Module):
        raise AttributeError(
            f"gradnorm needs the last shared layer: {type(model).__name__} has no `last_shared_layer` module; "
            "pass shared_layer=lambda model: <module> to DynamicLossWeightingPlugin"
        )
    return layer


class DynamicLossWeightingPlugin(Plugin):
    """Loss weighting with a per-sample loss mask; see the module docstring.

    ``tasks``: the :class:`TaskSpec` list (names, types, losses, missing markers) for the criterion
    mode; or plain term names, or None, for the named-terms mode, where the names are read from
    ``strategy.loss_terms`` at the first iteration. ``period_steps``: a period every that many
    training iterations; None for periods of ``period_epochs`` epochs (default 1).
    ``fixed_weights``: weights of periods 1 and 2 (and of every period for ``fixed``), a
    ``{task: weight}`` mapping (missing tasks 1) or a list in task order; default all 1. ``beta``, ``temperature``: formulas (5) and
    (7)/(8) (temperature None: 1 for the ``dwa_ema_exp`` family, 2 for ``dwa``). ``log_eps``: the
    epsilon of ``log(L + eps)`` for the ``*_log`` methods. ``task_scales``: for the period-based
    methods, a constant factor per task multiplying the period's weight (default 1).
    ``gradnorm_lr`` / ``uncertainty_lr``: Adam learning rates of the learnable weights; the
    published methods train them with the model's optimizer, so the model's learning rate is the
    natural value (the runner passes it unless told otherwise). ``shared_layer``: for GradNorm, a
    function from the model to the layer whose gradient norms are balanced (default: the model's
    ``last_shared_layer``); the other methods never look at the model.
    """

    def __init__(
        self,
        tasks: Sequence[TaskSpec | str] | Mapping[str, TaskSpec] | None = None,
        method: str = "dwa_ema_exp",
        *,
        period_steps: int | None = None,
        period_epochs: int = 1,
        fixed_weights: Mapping[str, float] | Sequence[float] | None = None,
        beta: float = 0.9,
        temperature: float | None = None,
        alpha: float = 1.5,
        gradnorm_lr: float = 1e-3,
        uncertainty_lr: float = 1e-3,
        log_eps: float = 1e-8,
        task_scales: Mapping[str, float] | Sequence[float] | None = None,
        shared_layer: Callable[[nn.Module], nn.Module] | None = None,
    ) -> None:
        super().__init__()
        check(method in METHODS, "method", f"unknown weighting method {method!r}; known: {', '.join(METHODS)}")
        check(period_steps is None or period_steps >= 1, "period_steps",
              f"must be >= 1 or None (periods of period_epochs epochs), got {period_steps}")
        check(period_epochs >= 1, "period_epochs", f"must be >= 1, got {period_epochs}")
        check(0.0 <= beta < 1.0, "beta", f"must be in [0, 1), got {beta}")
        check(temperature is None or temperature > 0, "temperature", f"must be > 0 or None, got {temperature}")
        check(alpha >= 0, "alpha", f"must be >= 0, got {alpha}")
        check(gradnorm_lr > 0 and uncertainty_lr > 0, "gradnorm_lr" if gradnorm_lr <= 0 else "uncertainty_lr",
              f"must be > 0, got {min(gradnorm_lr, uncertainty_lr)}")
        check(log_eps > 0, "log_eps", f"must be > 0, got {log_eps}")
        self.method = method
        self.base, self.loss_scale = split_method(method)
        check(task_scales is None or self.base not in ("gradnorm", "uncertainty"), "task_scales",
              f"apply to the period-based methods; {method} learns its own scales")
        self.period_steps = period_steps
        self.period_epochs = int(period_epochs)
        self.alpha = float(alpha)
        self.beta = beta
        self.temperature = temperature
        self.log_eps = float(log_eps)
        self.lrs = {"gradnorm": gradnorm_lr, "uncertainty": uncertainty_lr}
        self.shared_layer = shared_layer or default_shared_layer
        self._fixed_option, self._scales_option = fixed_weights, task_scales
        self.specs: dict[str, TaskSpec] = {}
        self.names: list[str] = []
        self.log: list[dict[str, Any]] = []  # one entry per finished period
        self._steps_in_period = 0
        self._epochs_in_period = 0
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None
        if tasks is not None:
            if all(isinstance(t, str) for t in tasks):
                self._setup([str(t) for t in tasks])
            else:
                self.specs = task_specs_by_name(tasks)
                self._setup(list(self.specs))

    def _setup(self, names: list[str]) -> None:
        """Everything whose size is the number of tasks (K): at construction when the tasks are given,
        else at the first iteration from the names of ``strategy.loss_terms``."""
        check(len(names) >= 1 and len(set(names)) == len(names), "tasks", f"need unique names, got {names}")
        self.names = list(names)
        k = len(names)
        self.schedule = PeriodSchedule(self.base, fixed_weight_vector(self.names, self._fixed_option),
                                       self.beta, self.temperature)
        self.task_scales = fixed_weight_vector(self.names, self._scales_option)
        # Kendall's factor c_k (1/2 Gaussian, 1 otherwise); a bare term name has no type: 1
        self.is_regression = torch.tensor([name in self.specs and not self.specs[name].is_classification
                                           for name in self.names])
        # first measured loss per task: the ``initial`` scale (this rank's own first batch) and
        # GradNorm's L(0) (averaged over ranks, since every rank must take the same weight step)
        self.initial_losses = torch.full((k,), float("nan"), dtype=torch.float64)
        self.gn_initial = torch.full((k,), float("nan"))
        # learnable weights live here, with their own optimizers, so any loop can run them
        self.log_vars = nn.Parameter(torch.zeros(k))
        self.gn_weights = nn.Parameter(torch.ones(k))
        self.aux_optimizer: torch.optim.Optimizer | None = None
        if self.base in self.lrs:
            param = self.log_vars if self.base == "uncertainty" else self.gn_weights
            self.aux_optimizer = torch.optim.Adam([param], lr=self.lrs[self.base])
        self._loss_sum = torch.zeros(k, dtype=torch.float64)
        self._count = torch.zeros(k, dtype=torch.float64)

    # ------------------------------------------------------------------ weights
    @property
    def period(self) -> int:
        return self.schedule.period if self.names else 1

    def current_weights(self) -> torch.Tensor:
        """(K,) weights applied right now: the period's weight times the task scale, GradNorm's
        learned weight, or uncertainty weighting's effective ``c_k exp(-s_k)``."""
        if self.base == "gradnorm":
            return self.gn_weights.detach().clone()
        if self.base == "uncertainty":
            return uncertainty_weights(self.log_vars.detach(), self.is_regression)
        return self.schedule.weights * self.task_scales

    @property
    def weights(self) -> dict[str, float]:
        return dict(zip(self.names, self.current_weights().tolist())) if self.names else {}

    def loss_scales(self) -> torch.Tensor | None:
        """(K,) the ``s_k`` of the ``initial`` / ``previous_period`` transforms (None for the others)."""
        if self.loss_scale == "initial":
            return self.initial_losses
        if self.loss_scale == "previous_period":
            return period_scales(self.initial_losses, self.schedule.losses[-1] if self.schedule.losses else None)
        return None

    # ------------------------------------------------------------------ the loss
    def task_losses(self, output: Mapping[str, torch.Tensor], y: Mapping[str, torch.Tensor]
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-task masked mean losses (K,), whether each task had a label (K,) bool, label counts (K,)."""
        if not self.specs:
            raise TypeError("plugin.criterion needs the TaskSpec list (DynamicLossWeightingPlugin(tasks=[TaskSpec, ...])); "
                            "with bare term names the plugin weights strategy.loss_terms instead")
        losses, counts = masked_task_losses(self.specs, output, y)
        count = counts.to(torch.float64)
        return losses, count > 0, count

    def combine(self, losses: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """The weighted total of one minibatch's task losses (K,): formula (9)/(10), uncertainty
        weighting's likelihood form, or the weights times the scale-invariant losses."""
        present = present.to(losses.device)
        if self.base == "uncertainty":
            return uncertainty_loss(losses, self.log_vars.to(losses.device), self.is_regression, present)
        values = transform_losses(losses, self.loss_scale, self._scales_on(losses.device), self.log_eps)
        return weighted_sum(values, self.current_weights().to(losses.device), present)

    def _scales_on(self, device: torch.device) -> torch.Tensor | None:
        scales = self.loss_scales()
        return None if scales is None else scales.to(device)

    def _record(self, losses: torch.Tensor, present: torch.Tensor, count: torch.Tensor) -> None:
        """Period statistics and the first measured loss of each task (GradNorm's L(0), the
        ``initial`` scale) of a training minibatch."""
        detached = losses.detach().double().cpu()
        present = present.cpu()
        first = present & torch.isnan(self.initial_losses)
        self.initial_losses[first] = detached[first]
        self._loss_sum += torch.where(present, detached * count, torch.zeros_like(detached))
        self._count += count.cpu()
        self._last = (losses, present)

    def criterion(self, output: Mapping[str, torch.Tensor], y: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The masked, weighted multi-task loss of a minibatch (formulas 9 and 10)."""
        losses, present, count = self.task_losses(output, y)
        training = torch.is_grad_enabled() and losses.requires_grad
        if training:
            self._record(losses, present, count)  # before combine: the first batch sets the initial scale
        return self.combine(losses, present)

    def _weigh_loss_terms(self, strategy: Any) -> None:
        """Named-terms mode: replace the plain sum of ``strategy.loss_terms`` inside ``strategy.loss`` by
        the weighted sum (other terms a loop or plugin added to ``strategy.loss`` are kept)."""
        terms: Mapping[str, torch.Tensor] = strategy.loss_terms
        if not self.names:
            self._setup(list(terms))
        unknown = [name for name in terms if name not in self.names]
        if unknown:
            raise KeyError(f"loss terms {unknown} are not among the weighted terms {self.names}; "
                           "pass every term name up front: DynamicLossWeightingPlugin(tasks=[...])")
        ref = next(iter(terms.values()))
        losses = torch.stack([terms[n].reshape(()) if n in terms else ref.new_zeros(()) for n in self.names])
        present = torch.tensor([n in terms for n in self.names])
        self._record(losses, present, present.double())
        strategy.loss = strategy.loss + (self.combine(losses, present) - losses.sum())  # absent terms are 0

    # ------------------------------------------------------------------ callbacks
    def before_backward(self, strategy: Any, **kwargs: Any) -> None:
        if self._last is None:  # the criterion did not run: weigh the loop's named terms
            terms = getattr(strategy, "loss_terms", None)
            if terms is None:
                raise RuntimeError("DynamicLossWeightingPlugin saw no loss this iteration: pass plugin.criterion as "
                                   "the loop's criterion, or use a loop that exposes strategy.loss_terms")
            if not terms:  # a minibatch without any term (no labels at all): nothing to weigh
                return
            self._weigh_loss_terms(strategy)
        if self.base == "gradnorm":
            self._gradnorm_step(strategy.model)

    def after_update(self, strategy: Any, **kwargs: Any) -> None:
        if self.base == "uncertainty" and self.aux_optimizer is not None and self.log_vars.grad is not None:
            dist_utils.all_reduce_mean_(self.log_vars.grad)  # outside the model: DDP does not see it
            self.aux_optimizer.step()
            self.aux_optimizer.zero_grad(set_to_none=True)

    def after_training_iteration(self, strategy: Any, **kwargs: Any) -> None:
        self._last = None
        self._steps_in_period += 1
        if self.period_steps is not None and self._steps_in_period >= self.period_steps:
            self.close_period()

    def after_training_epoch(self, strategy: Any, **kwargs: Any) -> None:
        if self.period_steps is None and self._steps_in_period > 0:
            self._epochs_in_period += 1
            if self._epochs_in_period >= self.period_epochs:
                self.close_period()

    # ------------------------------------------------------------------ periods
    def close_period(self) -> None:
        """End the current period: log its weights and mean losses, compute the next weights."""
        # Every rank closes the period with the losses of all ranks (one all-reduce of sums and
        # counts), so every rank computes the same weights.
        totals = torch.stack([self._loss_sum, self._count.to(self._loss_sum.dtype)])
        dist_utils.all_reduce_sum_(totals)
        loss_sum, count = totals[0], totals[1]
        means = torch.where(count > 0, loss_sum / count.clamp_min(1), torch.full_like(loss_sum, float("nan")))
        used = self.current_weights()
        period = self.period
        self.schedule.close(means)
        self.log.append({
            "period": period,
            "steps": self._steps_in_period,
            "weights": dict(zip(self.names, used.tolist())),
            "losses": dict(zip(self.names, [float(v) for v in means])),
        })
        self._loss_sum.zero_()
        self._count.zero_()
        self._steps_in_period = 0
        self._epochs_in_period = 0

    # ------------------------------------------------------------------ GradNorm
    def _gradnorm_step(self, model: nn.Module) -> None:
        """One GradNorm update of the task weights from this minibatch's task losses.

        Under data parallelism the per-task gradient norms and losses are averaged over the ranks that
        have labels for the task (one all-reduce of a (3, K) tensor), so every rank takes the same step.
        """
        losses, present = self._last
        local = torch.nonzero(present.cpu()).flatten()
        layer = self.shared_layer(model)
        params = [p for p in layer.parameters() if p.requires_grad][:1]  # the layer's weight
        stats = torch.zeros(3, len(losses), dtype=torch.float64)  # norm sums, loss sums, label counts
        for k in local.tolist():
            (g,) = torch.autograd.grad(losses[k], params, retain_graph=True, allow_unused=True)
            stats[0, k] = 0.0 if g is None else float(g.norm())
            stats[1, k] = float(losses[k].detach())
            stats[2, k] = 1.0
        dist_utils.all_reduce_sum_(stats)
        idx = torch.nonzero(stats[2] > 0).flatten()
        if len(idx) < 2:
            return
        norms_t = (stats[0, idx] / stats[2, idx]).to(self.gn_weights.dtype)
        current = (stats[1, idx] / stats[2, idx]).to(self.gn_weights.dtype)
        first = torch.isnan(self.gn_initial[idx])
        self.gn_initial[idx[first]] = current[first]
        weighted = self.gn_weights[idx] * norms_t
        targets = gradnorm_targets(weighted, current, self.gn_initial[idx], self.alpha)
        (grad,) = torch.autograd.grad(gradnorm_loss(weighted, targets), [self.gn_weights])
        self.gn_weights.grad = grad
        self.aux_optimizer.step()
        self.aux_optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            self.gn_weights.copy_(renormalize(self.gn_weights))

    # ------------------------------------------------------------------ output
    def weight_curves(self) -> dict[str, list[float]]:
        """``{task: [weight in period 1, 2, ...]}`` over the finished periods."""
        return {n: [entry["weights"][n] for entry in self.log] for n in self.names}

    def plot_weights(self, path: str | Path, title: str | None = None) -> Path:
        """PNG of the weight of every task per period (one line per task)."""
        from incremental.plots import line_plot

        curves = self.weight_curves()
        periods = [entry["period"] for entry in self.log]
        return line_plot(curves, path, xlabel="period", ylabel="loss weight",
                         title=title or f"loss weights ({self.method})", x=periods)

    def state_dict(self) -> dict[str, Any]:
        """Plain tensors, lists and dicts (loads with ``torch.load(weights_only=True)``)."""
        if not self.names:
            return {"names": []}
        return {
            "names": list(self.names),
            "schedule": self.schedule.state_dict(),
            "log_vars": self.log_vars.detach().clone(),
            "gn_weights": self.gn_weights.detach().clone(),
            "gn_initial": self.gn_initial.clone(),
            "initial_losses": self.initial_losses.clone(),
            "aux_optimizer": None if self.aux_optimizer is None else self.aux_optimizer.state_dict(),
            "loss_sum": self._loss_sum.clone(),
            "count": self._count.clone(),
            "steps_in_period": self._steps_in_period,
            "epochs_in_period": self._epochs_in_period,
            "log": self.log,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        names = list(state["names"])
        if not names:
            return
        if self.names and names != self.names:
            raise ValueError(f"the saved weighting state is for terms {names}, this plugin weighs {self.names}")
        if not self.names:
            self._setup(names)
        self.schedule.load_state_dict(state["schedule"])
        with torch.no_grad():
            self.log_vars.copy_(state["log_vars"])
            self.gn_weights.copy_(state["gn_weights"])
        self.gn_initial = torch.as_tensor(state["gn_initial"]).clone()
        self.initial_losses = torch.as_tensor(state["initial_losses"], dtype=torch.float64).clone()
        if self.aux_optimizer is not None and state["aux_optimizer"] is not None:
            self.aux_optimizer.load_state_dict(state["aux_optimizer"])
        self._loss_sum = torch.as_tensor(state["loss_sum"], dtype=torch.float64).clone()
        self._count = torch.as_tensor(state["count"], dtype=torch.float64).clone()
        self._steps_in_period = int(state["steps_in_period"])
        self._epochs_in_period = int(state.get("epochs_in_period", 0))
        self.log = [dict(entry) for entry in state["log"]]
