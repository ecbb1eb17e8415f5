"""Loop pieces for the panoptic model: optimizer with a class-head rate, LR schedule, clipping.

``PanopticTrainer`` is ``incremental.Trainer`` with one change: the optimizer may hold two parameter
groups (the class head and the rest) as long as the model's parameters are the ones it holds; the
runner grows the head *before* building an update's optimizer, so the loop never has to re-point it.
"""
from __future__ import annotations

import math
from typing import Any

import torch

from ..plugins import Plugin
from ..trainer import Trainer, grow_model


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, head_lr: float | None = None
                   ) -> torch.optim.Optimizer:
    """AdamW; with ``head_lr`` the class head gets its own rate.

    With Adam a weight moves about ``lr`` per step whatever its gradient, so at an update's low rate
    (1e-4, to spare the old classes) the freshly initialised rows of new classes barely move in a
    few hundred steps; a higher rate on the (small) class head lets them catch up.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    # every class head: the deployed one and, on a model with query groups, each group's own
    head = {id(p) for name, m in model.named_modules() if name.split(".")[-1] == "class_head" for p in m.parameters()}
    if head_lr is None or not head:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    groups = [{"params": [p for p in params if id(p) not in head], "lr": lr},
              {"params": [p for p in params if id(p) in head], "lr": head_lr}]
    return torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=weight_decay)


class PanopticTrainer(Trainer):
    """``Trainer`` accepting an optimizer with several parameter groups when they hold exactly the
    model's parameters (else the base class's rule applies), and growing the model one update step at
    a time: ``class_steps`` (the number of classes after each step) lets a model that grows by query
    groups rebuild one group per step when a checkpoint is restored."""

    class_steps: tuple[int, ...] = ()

    def model_adaptation(self, model: torch.nn.Module | None = None) -> torch.nn.Module:
        model = model if model is not None else self.model
        if self.classes_seen:
            n = max(self.classes_seen) + 1
            for boundary in self.class_steps:
                if boundary < n:
                    grow_model(model, boundary)
        return super().model_adaptation(model)

    def make_optimizer(self) -> None:
        params = {id(p) for p in self.model.parameters() if p.requires_grad}
        held = {id(p) for group in self.optimizer.param_groups for p in group["params"]}
        if params == held:
            return
        super().make_optimizer()


class ScheduleAndClip(Plugin):
    """Cosine learning-rate decay over each experience, and gradient-norm clipping.

    Transformer decoders train poorly at a constant rate (Mask2Former uses poly decay and clipping);
    a per-experience cosine keeps each step's schedule self-contained.
    """

    def __init__(self, schedule: str = "cosine", grad_clip: float | None = None) -> None:
        super().__init__()
        self.schedule = schedule
        self.grad_clip = grad_clip
        self.base_lrs: list[float] = []
        self.total = 1

    def before_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        self.base_lrs = [g["lr"] for g in strategy.optimizer.param_groups]
        per_epoch = math.ceil(len(strategy.adapted_dataset) / strategy.train_mb_size)
        self.total = max(per_epoch * strategy.train_epochs, 1)

    def before_training_iteration(self, strategy: Any, **kwargs: Any) -> None:
        if self.schedule != "cosine":
            return
        factor = 0.5 * (1 + math.cos(math.pi * min(strategy.clock.train_exp_iterations / self.total, 1.0)))
        for group, base in zip(strategy.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * factor

    def before_update(self, strategy: Any, **kwargs: Any) -> None:
        if self.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(strategy.model.parameters(), self.grad_clip)

    def after_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        for group, base in zip(strategy.optimizer.param_groups, self.base_lrs):
            group["lr"] = base
