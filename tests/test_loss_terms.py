"""Named loss terms in the loop: a family's criterion returns a dict, the loop sums it and exposes it,
and dynamic loss weighting reweights the terms of any family (here a two-term classifier loss)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from incremental.data import Experience, TensorSamples
from incremental.models import MLP
from incremental.plugins import Plugin
from incremental.trainer import Trainer
from strategies.dynamic_loss_weighting import DynamicLossWeightingPlugin


class Probe(Plugin):
    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[float, dict[str, float]]] = []

    def before_backward(self, strategy, **kwargs):
        self.rows.append((float(strategy.loss), {k: float(v) for k, v in strategy.loss_terms.items()}))


def two_terms(output: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"ce": nn.functional.cross_entropy(output, y), "margin": output.pow(2).mean()}


def _train(plugins):
    torch.manual_seed(0)
    samples = TensorSamples(torch.rand(64, 8), torch.arange(64) % 3)
    model = MLP(8, 16, 3)
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.05), two_terms, train_mb_size=16,
                      train_epochs=4, plugins=plugins)
    trainer.train(Experience(samples, 0, [0, 1, 2]))
    return trainer


def test_the_loop_sums_named_terms_and_keeps_them():
    probe = Probe()
    _train([probe])
    assert len(probe.rows) == 16
    for loss, terms in probe.rows:
        assert set(terms) == {"ce", "margin"} and loss == pytest.approx(sum(terms.values()), rel=1e-6)


def test_dynamic_weights_apply_to_any_familys_terms():
    weighting = DynamicLossWeightingPlugin(None, "fixed", fixed_weights={"ce": 2.0, "margin": 0.5})
    probe = Probe()
    _train([weighting, probe])
    assert weighting.names == ["ce", "margin"]  # read from the loop's terms at the first iteration
    for loss, terms in probe.rows:
        assert loss == pytest.approx(2.0 * terms["ce"] + 0.5 * terms["margin"], rel=1e-5)
    dynamic = DynamicLossWeightingPlugin(None, "dwa_ema_exp")
    _train([dynamic])
    assert len(dynamic.log) == 4 and sum(dynamic.weights.values()) == pytest.approx(2.0, abs=1e-5)
    assert dynamic.log[3]["weights"] != dynamic.log[0]["weights"]  # dynamic from period 3
