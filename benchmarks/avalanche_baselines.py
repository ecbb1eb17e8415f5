"""Avalanche's rehearsal strategies as the benchmarks build them (one place, the same settings everywhere).

AGEM gets ``patterns_per_exp = mem / (n_experiences - 1)``: its memory grows by that much per finished
experience, so it holds ``mem`` samples while training the last one, as the fixed-size memories do.
GSS_greedy stores inputs of ``input_size``; DER is DER++ with Avalanche's defaults (alpha 0.1, beta 0.5).
"""
from __future__ import annotations

import warnings
from typing import Any, Sequence

import torch
from torch import nn

NAMES = ("Naive", "Replay", "AGEM", "GSS_greedy", "ER_ACE", "DER")


def grad_clip_plugin(max_norm: float) -> Any:
    """Clips the gradient's norm where this project's loop does (``train.grad_clip``): after every loss
    term's backward, right before the optimizer step (Avalanche's ``before_update``)."""
    from avalanche.core import SupervisedPlugin

    class ClipGradNorm(SupervisedPlugin):
        def before_update(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
            torch.nn.utils.clip_grad_norm_(strategy.model.parameters(), max_norm)

    return ClipGradNorm()


def avalanche_strategy(name: str, model: nn.Module, *, mem: int, lr: float, batch: int, epochs: int,
                       eval_batch: int, n_experiences: int, input_size: Sequence[int], evaluator: Any,
                       grad_clip: float | None = None) -> Any:
    """Avalanche's ``name`` strategy on ``model`` with plain SGD, memory batch = training batch;
    ``grad_clip`` clips the gradient norm before each optimizer step, as ``train.grad_clip`` does."""
    from avalanche.training import AGEM, DER, ER_ACE, GSS_greedy, Naive, Replay

    common = dict(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=lr), criterion=nn.CrossEntropyLoss(),
                  train_mb_size=batch, train_epochs=epochs, eval_mb_size=eval_batch, evaluator=evaluator,
                  plugins=[grad_clip_plugin(grad_clip)] if grad_clip else None)
    builders = {
        "Naive": lambda: Naive(**common),
        "Replay": lambda: Replay(mem_size=mem, **common),
        "AGEM": lambda: AGEM(patterns_per_exp=mem // (n_experiences - 1), sample_size=batch, **common),
        "GSS_greedy": lambda: GSS_greedy(mem_size=mem, mem_strength=5, input_size=list(input_size), **common),
        "ER_ACE": lambda: ER_ACE(mem_size=mem, batch_size_mem=batch, **common),
        "DER": lambda: DER(mem_size=mem, batch_size_mem=batch, **common),
    }
    if name not in builders:
        raise ValueError(f"unknown Avalanche strategy {name!r}; known: {', '.join(NAMES)}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Avalanche warns that no logger is attached: on purpose
        return builders[name]()
