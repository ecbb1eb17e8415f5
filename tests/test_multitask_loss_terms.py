"""DynamicLossWeightingPlugin on named loss terms (``strategy.loss_terms``), the scale-invariant
variants through the plugin, and the multi-task criterion that returns named terms."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from incremental.config import ConfigError
from incremental.multitask.tasks import TaskSpec, task_loss_terms
from strategies.dynamic_loss_weighting import DynamicLossWeightingPlugin
from tests.test_multitask_plugin import feed_period  # one period of one iteration through plugin.criterion

THREE = [TaskSpec("a", "regression"), TaskSpec("b", "regression"), TaskSpec("c", "regression")]


def terms_period(plugin: DynamicLossWeightingPlugin, terms: dict[str, float], extra: float = 0.0) -> SimpleNamespace:
    """One period of one iteration in named-terms mode: a fake strategy whose loop put the plain sum of
    ``terms`` (plus an unrelated ``extra`` term) in ``strategy.loss``."""
    tensors = {k: torch.tensor(v, requires_grad=True) for k, v in terms.items()}
    strategy = SimpleNamespace(model=None, loss_terms=tensors, loss=sum(tensors.values()) + extra)
    plugin.before_backward(strategy)
    plugin.after_training_iteration(strategy)
    plugin.after_training_epoch(strategy)
    return strategy


def test_named_terms_fixed_weights_keep_other_loss_terms():
    # loss = 2 * cls + 0.5 * box + extra: 2*3 + 0.5*4 + 10 = 18; gradients are the weights
    plugin = DynamicLossWeightingPlugin(None, "fixed", fixed_weights={"cls": 2.0, "box": 0.5})
    strategy = terms_period(plugin, {"cls": 3.0, "box": 4.0}, extra=10.0)
    assert plugin.names == ["cls", "box"]  # read from the first iteration's terms
    assert strategy.loss.item() == pytest.approx(18.0)
    strategy.loss.backward()
    assert strategy.loss_terms["cls"].grad.item() == pytest.approx(2.0)
    assert strategy.loss_terms["box"].grad.item() == pytest.approx(0.5)
    assert plugin.log[0]["losses"] == {"cls": 3.0, "box": 4.0}


def test_named_terms_and_criterion_modes_give_the_same_dwa_schedule():
    # the worked example of test_multitask_weighting (dwa_ema_exp, K 3): period 3 total 3.981853
    # (w(3) = (0.724542, 1.080890, 1.194568) on losses (4, 0.45, 0.5)), whichever way the losses come
    by_criterion = DynamicLossWeightingPlugin(THREE, "dwa_ema_exp")
    by_terms = DynamicLossWeightingPlugin(["a", "b", "c"], "dwa_ema_exp")
    for losses, total in (([10.0, 1.0, 0.5], 11.5), ([5.0, 0.9, 0.5], 6.4), ([4.0, 0.45, 0.5], 3.981853)):
        assert feed_period(by_criterion, losses).item() == pytest.approx(total, abs=1e-5)
        strategy = terms_period(by_terms, dict(zip("abc", losses)))
        assert strategy.loss.item() == pytest.approx(total, abs=1e-5)
    assert by_terms.weights == pytest.approx(by_criterion.weights)


def test_named_terms_absent_term_is_not_weighted_nor_counted():
    plugin = DynamicLossWeightingPlugin(["cls", "distill"], "equal")
    strategy = SimpleNamespace(model=None, loss_terms={"cls": torch.tensor(2.0)}, loss=torch.tensor(2.0))
    plugin.before_backward(strategy)  # no distillation term in this iteration (first experience)
    plugin.after_training_iteration(strategy)
    terms_period(plugin, {"cls": 4.0, "distill": 1.0})
    # period means over the iterations that had the term: cls (2 + 4) / 2, distill 1 / 1
    assert plugin.log[0]["losses"] == {"cls": 3.0, "distill": 1.0}


def test_named_terms_unknown_later_term_and_missing_loss_are_clear():
    plugin = DynamicLossWeightingPlugin(None, "equal")
    terms_period(plugin, {"cls": 1.0})
    with pytest.raises(KeyError, match="pass every term name up front"):
        terms_period(plugin, {"cls": 1.0, "distill": 1.0})
    with pytest.raises(RuntimeError, match="strategy.loss_terms"):
        plugin.before_backward(SimpleNamespace(model=None, loss=torch.tensor(1.0)))
    empty = SimpleNamespace(model=None, loss=torch.tensor(1.0), loss_terms={})  # a batch without any term
    plugin.before_backward(empty)
    assert empty.loss.item() == 1.0
    with pytest.raises(TypeError, match="needs the TaskSpec list"):
        DynamicLossWeightingPlugin(["a"], "equal").criterion({"a": torch.zeros(1)}, {"a": torch.zeros(1)})


def test_named_terms_uncertainty_starts_at_plain_sum_and_learns():
    # bare names have Kendall factor 1: exp(-0) * L + 0/2 = L per term, so step 1 leaves the loss unchanged
    plugin = DynamicLossWeightingPlugin(None, "uncertainty", uncertainty_lr=0.1)
    tensors = {"cls": torch.tensor(3.0, requires_grad=True), "box": torch.tensor(0.25, requires_grad=True)}
    strategy = SimpleNamespace(model=None, loss_terms=tensors, loss=tensors["cls"] + tensors["box"])
    plugin.before_backward(strategy)
    assert strategy.loss.item() == pytest.approx(3.25)
    strategy.loss.backward()
    plugin.after_update(strategy)
    # d/ds [exp(-s) L + s/2] at s=0 is 1/2 - L: cls (L=3, -2.5) gets a larger s (smaller weight), box
    # (L=0.25, +0.25) a smaller one
    assert plugin.log_vars[0].item() > 0 > plugin.log_vars[1].item()


class TwoHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Linear(4, 8)
        self.cls, self.box = nn.Linear(8, 3), nn.Linear(8, 2)

    @property
    def last_shared_layer(self) -> nn.Module:
        return self.shared


def test_named_terms_gradnorm_with_a_shared_layer():
    torch.manual_seed(0)
    model = TwoHeads()
    plugin = DynamicLossWeightingPlugin(None, "gradnorm", gradnorm_lr=0.05)
    x, labels, targets = torch.randn(16, 4), torch.randint(0, 3, (16,)), 100 * torch.randn(16, 2)
    for _ in range(5):
        h = torch.relu(model.shared(x))
        terms = {"cls": nn.functional.cross_entropy(model.cls(h), labels),
                 "box": nn.functional.mse_loss(model.box(h), targets)}
        strategy = SimpleNamespace(model=model, loss_terms=terms, loss=terms["cls"] + terms["box"])
        plugin.before_backward(strategy)
        model.zero_grad()
        strategy.loss.backward()
        plugin.after_training_iteration(strategy)
    w = plugin.weights
    assert sum(w.values()) == pytest.approx(2.0, abs=1e-5)
    assert w["box"] < 1.0 < w["cls"]  # the box loss (scale 1e4) has the far larger gradient: weighted down
    # the option can be omitted for the loss-only methods; GradNorm without a shared layer says how to fix
    bare = DynamicLossWeightingPlugin(None, "gradnorm")
    with pytest.raises(AttributeError, match="shared_layer"):
        terms_period(bare, {"cls": 1.0, "box": 2.0})


def test_scaled_variants_through_the_plugin():
    # same losses as the worked example: L(1) = (10, 1, 0.5), L(2) = (5, 0.9, 0.5), L(3) = (4, 0.45, 0.5);
    # dwa_ema_exp weights w(3) = (0.724542, 1.080890, 1.194568), periods 1-2 weights 1
    # init: s = first batch = (10, 1, 0.5): 3; (0.5 + 0.9 + 1) = 2.4; 0.724542*0.4 + 1.080890*0.45 + 1.194568*1 = 1.970785
    # running: period 1 s = first batch -> 3; period 2 s = L(1) -> 2.4; period 3 s = L(2) = (5, 0.9, 0.5):
    #   0.724542*0.8 + 1.080890*0.5 + 1.194568*1 = 2.314647
    # log: ln10 + ln1 + ln0.5 = 1.609438; ln5 + ln0.9 + ln0.5 = 0.810930;
    #   0.724542 ln4 + 1.080890 ln0.45 + 1.194568 ln0.5 = 1.004428 - 0.863099 - 0.828011 = -0.686682
    expected = {"dwa_ema_exp_init": [3.0, 2.4, 1.970785], "dwa_ema_exp_running": [3.0, 2.4, 2.314647],
                "dwa_ema_exp_log": [1.609438, 0.810930, -0.686682]}
    for method, totals in expected.items():
        plugin = DynamicLossWeightingPlugin(THREE, method)
        got = [feed_period(plugin, losses).item() for losses in ([10.0, 1.0, 0.5], [5.0, 0.9, 0.5], [4.0, 0.45, 0.5])]
        assert got == pytest.approx(totals, abs=1e-5), method
        # the weights are the METHODS formula's on the raw losses, whatever the transform
        assert plugin.log[2]["weights"]["a"] == pytest.approx(0.724542, abs=1e-5)


def test_equal_log_is_sum_of_log_losses():
    # ln 4 + ln 0.25 = 0: a loss of 4 and one of 0.25 cancel
    plugin = DynamicLossWeightingPlugin(THREE[:2], "equal_log")
    out = {n: torch.zeros(1, requires_grad=True) for n in "ab"}
    assert plugin.criterion(out, {"a": torch.tensor([2.0]), "b": torch.tensor([0.5])}).item() == pytest.approx(0.0, abs=1e-6)


def test_task_loss_terms_leave_out_tasks_without_labels():
    specs = [TaskSpec("age", "regression", loss="l1"), TaskSpec("smile", "binary")]
    out = {"age": torch.tensor([30.0, 20.0]), "smile": torch.zeros(2)}
    terms = task_loss_terms(specs, out, {"age": torch.tensor([35.0, -1.0]), "smile": torch.tensor([-1.0, -1.0])})
    assert list(terms) == ["age"] and terms["age"].item() == pytest.approx(5.0)  # |30 - 35|, sample 2 unlabelled


def test_constructor_rejects_impossible_values_naming_the_option():
    for kwargs, key in (({"beta": 1.0}, "beta"), ({"period_steps": 0}, "period_steps"),
                        ({"temperature": 0.0}, "temperature"), ({"log_eps": 0.0}, "log_eps"),
                        ({"uncertainty_lr": -1.0}, "uncertainty_lr")):
        with pytest.raises(ConfigError, match=f"^{key}:"):
            DynamicLossWeightingPlugin(THREE, "dwa_ema_exp", **kwargs)
