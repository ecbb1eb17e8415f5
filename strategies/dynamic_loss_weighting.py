"""Dynamic multi-task loss weights with a per-sample loss mask (METHODS.md section 1), as a plugin.

The plugin is the adapter between the loop and the pure formulas of
:mod:`incremental.multitask.weighting`:

- ``plugin.criterion(mb_output, mb_y)`` is the loss to hand to the loop (``Trainer(criterion=...)``
  or Avalanche's ``Naive(criterion=...)``): per task, the mean loss over the samples that have a
  label (formula 10's mask; a batch without labels for a task adds exactly 0), then the weighted sum
  with the current period's weights (formula 9). It also accumulates each task's loss for the
  period statistics (only when gradients are on, so evaluation calls are not counted).
- A period is an epoch (``after_training_epoch``) or ``period_steps`` training iterations. At its end
  the period's mean losses are stored and, for the DWA family, the next period's weights computed;
  periods 1 and 2 use the fixed weights (default 1), so the weights are dynamic from period 3 on and
  never change inside a period.
- ``gradnorm`` and ``uncertainty`` learn their weights every step, from the first step (as published);
  their parameters and optimizers live in the plugin, so they work in any loop that calls the
  criterion and the callbacks: GradNorm updates its weights in ``before_backward`` (per-task gradient
  norms w.r.t. the model's ``last_shared_layer`` by ``autograd.grad`` on that layer only), uncertainty
  weighting steps its log-variances in ``after_update`` from the gradient the loop's backward left.

Methods: ``dwa_ema_exp`` (3, 5, 8; default), ``dwa_ema`` (3, 5, 6), ``dwa_ratio`` (3, 4), ``dwa``
(Liu et al., T = 2), ``gradnorm`` (alpha 1.5), ``uncertainty`` (Kendall et al.), ``equal``, ``fixed``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from incremental.multitask.tasks import TaskSpec, label_present, per_sample_loss, safe_targets, task_specs_by_name
from incremental.multitask.weighting import (
    DWA_METHODS,
    METHODS,
    dynamic_weights,
    fixed_weight_vector,
    gradnorm_loss,
    gradnorm_targets,
    masked_task_mean,
    renormalize,
    uncertainty_loss,
    uncertainty_weights,
    weighted_sum,
)
from incremental import distributed as dist_utils
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
    """Multi-task loss weighting with a per-sample loss mask; see the module docstring.

    ``tasks``: the :class:`TaskSpec` list (names, types, losses, missing markers). ``period_steps``:
    None for one period per epoch, else a period every that many training iterations.
    ``fixed_weights``: weights of periods 1 and 2 (and of every period for ``fixed``), a
    ``{task: weight}`` mapping (missing tasks 1) or a list in task order; default all 1.
    ``task_scales``: for the period-based methods (DWA family, ``equal``, ``fixed``), a constant
    factor per task multiplying the period's weight (default 1): brings losses of very different
    units to one scale so the dynamic weights act on comparable numbers (formula 3's speeds are
    ratios, so they do not change). GradNorm and uncertainty weighting learn scales themselves.
    ``gradnorm_lr`` / ``uncertainty_lr``: Adam learning rates of the learnable weights; the published
    methods train them with the model's optimizer, so the model's learning rate is the natural value
    (the runner passes it unless told otherwise).
    """

    def __init__(
        self,
        tasks: Sequence[TaskSpec] | Mapping[str, TaskSpec],
        method: str = "dwa_ema_exp",
        *,
        period_steps: int | None = None,
        fixed_weights: Mapping[str, float] | Sequence[float] | None = None,
        beta: float = 0.9,
        temperature: float | None = None,
        alpha: float = 1.5,
        gradnorm_lr: float = 1e-3,
        uncertainty_lr: float = 1e-3,
        task_scales: Mapping[str, float] | Sequence[float] | None = None,
        shared_layer: Callable[[nn.Module], nn.Module] | None = None,
    ) -> None:
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"unknown weighting method {method!r}; known: {', '.join(METHODS)}")
        if period_steps is not None and period_steps < 1:
            raise ValueError(f"period_steps must be >= 1 or None (one period per epoch), got {period_steps}")
        self.specs = task_specs_by_name(tasks)
        self.names = list(self.specs)
        self.method = method
        self.period_steps = period_steps
        self.alpha = float(alpha)
        self.shared_layer = shared_layer or default_shared_layer
        k = len(self.names)
        self.schedule = PeriodSchedule(method, fixed_weight_vector(self.names, fixed_weights), beta, temperature)
        if task_scales is not None and method in ("gradnorm", "uncertainty"):
            raise ValueError(f"task_scales apply to the period-based methods; {method} learns its own scales")
        self.task_scales = fixed_weight_vector(self.names, task_scales)
        self.is_regression = torch.tensor([not s.is_classification for s in self.specs.values()])

        # learnable weights live here, with their own optimizers, so any loop can run them
        self.log_vars = nn.Parameter(torch.zeros(k))
        self.gn_weights = nn.Parameter(torch.ones(k))
        self.gn_initial = torch.full((k,), float("nan"))
        self.aux_optimizer: torch.optim.Optimizer | None = None
        if method == "uncertainty":
            self.aux_optimizer = torch.optim.Adam([self.log_vars], lr=uncertainty_lr)
        elif method == "gradnorm":
            self.aux_optimizer = torch.optim.Adam([self.gn_weights], lr=gradnorm_lr)

        self._loss_sum = torch.zeros(k, dtype=torch.float64)
        self._count = torch.zeros(k, dtype=torch.float64)
        self._steps_in_period = 0
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None
        self.log: list[dict[str, Any]] = []  # one entry per finished period

    # ------------------------------------------------------------------ weights
    @property
    def period(self) -> int:
        return self.schedule.period

    def current_weights(self) -> torch.Tensor:
        """(K,) weights applied right now: the period's weight times the task scale, GradNorm's
        learned weight, or uncertainty weighting's effective ``c_k exp(-s_k)``."""
        if self.method == "gradnorm":
            return self.gn_weights.detach().clone()
        if self.method == "uncertainty":
            return uncertainty_weights(self.log_vars.detach(), self.is_regression)
        return self.schedule.weights * self.task_scales

    @property
    def weights(self) -> dict[str, float]:
        return dict(zip(self.names, self.current_weights().tolist()))

    # ------------------------------------------------------------------ the loss
    def task_losses(self, output: Mapping[str, torch.Tensor], y: Mapping[str, torch.Tensor]
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-task masked mean losses (K,), whether each task had a label (K,) bool, label counts (K,)."""
        if not isinstance(output, Mapping):
            raise TypeError(f"the model must return a dict {{task: output}}, got {type(output).__name__}")
        if not isinstance(y, Mapping):
            raise TypeError(f"labels must be a dict {{task: tensor}}, got {type(y).__name__}")
        losses, counts = [], []
        for name, spec in self.specs.items():
            if name not in output:
                raise KeyError(f"the model's output has no task {name!r} (it has {sorted(output)})")
            if name not in y:
                raise KeyError(f"the labels have no task {name!r} (they have {sorted(y)})")
            present = label_present(y[name], spec.marker)
            per = per_sample_loss(spec, output[name], safe_targets(spec, y[name], present))
            losses.append(masked_task_mean(per, present))
            counts.append(present.sum())
        count = torch.stack(counts).to(torch.float64)
        return torch.stack(losses), count > 0, count

    def criterion(self, output: Mapping[str, torch.Tensor], y: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The masked, weighted multi-task loss of a minibatch (formulas 9 and 10)."""
        losses, present, count = self.task_losses(output, y)
        if self.method == "uncertainty":
            total = uncertainty_loss(losses, self.log_vars.to(losses.device), self.is_regression, present.to(losses.device))
        else:
            w = self.current_weights().to(losses.device)
            total = weighted_sum(losses, w, present.to(losses.device))
        if torch.is_grad_enabled() and total.requires_grad:
            detached = losses.detach().double().cpu()
            self._loss_sum += torch.where(count > 0, detached * count, torch.zeros_like(detached))
            self._count += count.cpu()
            self._last = (losses, present)
        return total

    # ------------------------------------------------------------------ callbacks
    def before_backward(self, strategy: Any, **kwargs: Any) -> None:
        if self.method == "gradnorm" and self._last is not None:
            self._gradnorm_step(strategy.model)

    def after_update(self, strategy: Any, **kwargs: Any) -> None:
        if self.method == "uncertainty" and self.aux_optimizer is not None and self.log_vars.grad is not None:
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
        return {
            "schedule": self.schedule.state_dict(),
            "log_vars": self.log_vars.detach().clone(),
            "gn_weights": self.gn_weights.detach().clone(),
            "gn_initial": self.gn_initial.clone(),
            "aux_optimizer": None if self.aux_optimizer is None else self.aux_optimizer.state_dict(),
            "loss_sum": self._loss_sum.clone(),
            "count": self._count.clone(),
            "steps_in_period": self._steps_in_period,
            "log": self.log,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.schedule.load_state_dict(state["schedule"])
        with torch.no_grad():
            self.log_vars.copy_(state["log_vars"])
            self.gn_weights.copy_(state["gn_weights"])
        self.gn_initial = torch.as_tensor(state["gn_initial"]).clone()
        if self.aux_optimizer is not None and state["aux_optimizer"] is not None:
            self.aux_optimizer.load_state_dict(state["aux_optimizer"])
        self._loss_sum = torch.as_tensor(state["loss_sum"], dtype=torch.float64).clone()
        self._count = torch.as_tensor(state["count"], dtype=torch.float64).clone()
        self._steps_in_period = int(state["steps_in_period"])
        self.log = [dict(entry) for entry in state["log"]]

