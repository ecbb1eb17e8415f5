"""DynamicLossWeightingPlugin in this project's loop: periods, masks, learnable weights, replay, output."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from incremental.buffer import HistoryLibrary
from incremental.data import Experience, TensorSamples
from incremental.multitask.metrics import MultiTaskAccumulator
from incremental.multitask.model import HydraNet
from incremental.multitask.tasks import TaskSpec
from incremental.trainer import Trainer
from strategies.dynamic_loss_weighting import DynamicLossWeightingPlugin

THREE = [TaskSpec("a", "regression"), TaskSpec("b", "regression"), TaskSpec("c", "regression")]


def feed_period(plugin: DynamicLossWeightingPlugin, losses: list[float]) -> torch.Tensor:
    """One period of one iteration whose MSE per task is exactly ``losses`` (outputs 0, labels sqrt(L))."""
    out = {n: torch.zeros(2, requires_grad=True) for n in "abc"}
    y = {n: torch.full((2,), math.sqrt(v)) for n, v in zip("abc", losses)}
    total = plugin.criterion(out, y)
    strategy = SimpleNamespace(model=None)
    plugin.after_training_iteration(strategy)
    plugin.after_training_epoch(strategy)
    return total


def test_plugin_worked_example_three_periods():
    # the same numbers as test_worked_example_three_periods_k3, through criterion + callbacks:
    # period 1 total = 1*10 + 1*1 + 1*0.5 = 11.5; period 2 total = 5 + 0.9 + 0.5 = 6.4
    # period 3 uses w(3) = (0.724542, 1.080890, 1.194568): 0.724542*4 + 1.080890*0.45 + 1.194568*0.5
    #   = 2.898168 + 0.486401 + 0.597284 = 3.981853
    plugin = DynamicLossWeightingPlugin(THREE, "dwa_ema_exp")
    assert feed_period(plugin, [10.0, 1.0, 0.5]).item() == pytest.approx(11.5, rel=1e-6)
    assert feed_period(plugin, [5.0, 0.9, 0.5]).item() == pytest.approx(6.4, rel=1e-6)
    assert feed_period(plugin, [4.0, 0.45, 0.5]).item() == pytest.approx(3.981853, abs=1e-5)
    assert [e["period"] for e in plugin.log] == [1, 2, 3]
    assert plugin.log[0]["losses"]["a"] == pytest.approx(10.0)
    assert plugin.log[2]["weights"]["a"] == pytest.approx(0.724542, abs=1e-5)
    assert plugin.weights["a"] == pytest.approx(0.751698, abs=1e-5)  # w(4), from the test above


def test_batch_without_labels_for_a_task_adds_zero_and_no_nan():
    out = {n: torch.zeros(3, requires_grad=True) for n in "abc"}
    y = {"a": torch.tensor([2.0, -1.0, -1.0]), "b": torch.full((3,), -1.0), "c": torch.full((3,), float("inf"))}
    c_spec = TaskSpec("c", "regression", marker=float("inf"))
    plugin = DynamicLossWeightingPlugin([THREE[0], THREE[1], c_spec], "equal")
    total = plugin.criterion(out, y)
    assert total.item() == pytest.approx(4.0)  # only sample 0 of task a: (0 - 2)^2
    total.backward()
    for n in "abc":
        assert torch.isfinite(out[n].grad).all()
    assert out["b"].grad.abs().sum() == 0 and out["a"].grad[1:].abs().sum() == 0


def test_multiclass_marker_is_not_an_index_error():
    spec = TaskSpec("race", "multiclass", dim=5)
    plugin = DynamicLossWeightingPlugin([spec], "equal")
    logits = torch.zeros(3, 5, requires_grad=True)
    # samples 0 and 2 labelled: CE of uniform logits = ln 5 each; sample 1 (marker -1) ignored
    total = plugin.criterion({"race": logits}, {"race": torch.tensor([1, -1, 4])})
    assert total.item() == pytest.approx(math.log(5))


def test_period_steps_mode_and_eval_calls_not_counted():
    plugin = DynamicLossWeightingPlugin(THREE, "dwa", period_steps=2)
    strategy = SimpleNamespace(model=None)
    out = {n: torch.zeros(2, requires_grad=True) for n in "abc"}
    y = {n: torch.ones(2) for n in "abc"}
    with torch.no_grad():  # evaluation-time calls (Avalanche's eval) must not enter the statistics
        plugin.criterion({n: torch.zeros(2) for n in "abc"}, y)
    assert plugin._count.sum() == 0
    for _ in range(5):
        plugin.criterion(out, y)
        plugin.after_training_iteration(strategy)
        plugin.after_training_epoch(strategy)  # ignored in steps mode
    assert [e["steps"] for e in plugin.log] == [2, 2]


def test_unknown_method_and_bad_inputs_are_clear():
    with pytest.raises(ValueError, match="unknown weighting method 'dwa2'"):
        DynamicLossWeightingPlugin(THREE, "dwa2")
    plugin = DynamicLossWeightingPlugin(THREE, "equal")
    with pytest.raises(TypeError, match="must return a dict"):
        plugin.criterion(torch.zeros(2), {})
    with pytest.raises(KeyError, match="no task 'c'"):
        plugin.criterion({"a": torch.zeros(1), "b": torch.zeros(1)}, {"a": torch.zeros(1), "b": torch.zeros(1)})


# ------------------------------------------------------------------ inside the loop
TASKS = [
    TaskSpec("pts", "points", dim=4),
    TaskSpec("val", "regression", loss="l1", offset=(10.0,), scale=(5.0,)),
    TaskSpec("flag", "binary"),
    TaskSpec("cls", "multiclass", dim=3),
]


def toy_samples(n: int, seed: int, missing: float = 0.0) -> TensorSamples:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, 32, 32, generator=g)
    m = x.mean(dim=(1, 2, 3))
    y = {
        "pts": torch.stack([m * 30, m * 10, m * 20 + 5, 3 + m], dim=1),
        "val": 10 + 5 * x[:, 0].mean(dim=(1, 2)),
        "flag": (x[:, 1].mean(dim=(1, 2)) > 0.5).float(),
        "cls": (x[:, 2].mean(dim=(1, 2)) * 3).long().clamp(0, 2),
    }
    if missing:
        for k, v in y.items():
            drop = torch.rand(n, generator=g) < missing
            v[drop] = -1
    return TensorSamples(x, y)


def make_trainer(method: str, **kwargs) -> tuple[Trainer, DynamicLossWeightingPlugin]:
    torch.manual_seed(0)
    model = HydraNet(TASKS, image_size=32, channels=(4, 8, 8), fusion_channels=4, head_hidden=8)
    plugin = DynamicLossWeightingPlugin(TASKS, method, **kwargs)
    trainer = Trainer(model, torch.optim.Adam(model.parameters(), lr=1e-2), plugin.criterion, train_mb_size=16,
                      train_epochs=4, plugins=[plugin], seed=0,
                      eval_accumulator=lambda s: MultiTaskAccumulator(TASKS))
    return trainer, plugin


def test_dwa_in_trainer_weights_fixed_for_two_epochs_then_move_only_at_boundaries():
    trainer, plugin = make_trainer("dwa_ema_exp")
    seen: list[tuple[int, list[float]]] = []
    original = plugin.criterion

    def spy(out, y):
        seen.append((plugin.period, plugin.current_weights().tolist()))
        return original(out, y)

    trainer._criterion = spy
    trainer.train(Experience(toy_samples(64, 0, missing=0.3), 0, [0]))
    assert len(plugin.log) == 4
    by_period: dict[int, set] = {}
    for period, w in seen:
        by_period.setdefault(period, set()).add(tuple(w))
    assert all(len(ws) == 1 for ws in by_period.values())  # constant inside a period
    assert by_period[1] == by_period[2] == {(1.0, 1.0, 1.0, 1.0)}
    assert by_period[3] != by_period[2] and by_period[4] != by_period[3]
    assert sum(next(iter(by_period[3]))) == pytest.approx(4.0, abs=1e-5)  # weights sum to K


def test_with_replay_two_experiences_and_eval():
    torch.manual_seed(0)
    model = HydraNet(TASKS, image_size=32, channels=(4, 8, 8), fusion_channels=4, head_hidden=8)
    plugin = DynamicLossWeightingPlugin(TASKS, "dwa_ema_exp")
    trainer = Trainer(model, torch.optim.Adam(model.parameters(), lr=1e-2), plugin.criterion, train_mb_size=16,
                      train_epochs=2, plugins=[plugin], history=HistoryLibrary(20, "reservoir", seed=0),
                      eval_accumulator=lambda s: MultiTaskAccumulator(TASKS))
    batch_sizes = []
    original = plugin.criterion
    trainer._criterion = lambda out, y: (batch_sizes.append(len(y["val"])), original(out, y))[1]
    trainer.train(Experience(toy_samples(32, 1, missing=0.5), 0, [0]))
    trainer.train(Experience(toy_samples(32, 2, missing=0.5), 1, [0]))
    assert len(trainer.history) == 20
    assert max(batch_sizes) == 32  # 16 new + 16 replayed, label dicts concatenated
    assert len(plugin.log) == 4 and plugin.weights != {t.name: 1.0 for t in TASKS}
    result = trainer.eval(Experience(toy_samples(20, 3), 0, [0]))[0]
    assert set(result) == {"pts", "val", "flag", "cls"}
    assert result["flag"]["count"] == 20 and 0.0 <= result["flag"]["accuracy"] <= 1.0
    assert all(math.isfinite(result[n]["loss"]) for n in result)


def test_gradnorm_learns_weights_summing_to_k_without_touching_model_grads():
    trainer, plugin = make_trainer("gradnorm")
    trainer.train_epochs = 2
    trainer.train(Experience(toy_samples(64, 0), 0, [0]))
    w = plugin.current_weights()
    assert w.sum().item() == pytest.approx(4.0, abs=1e-4)
    assert not torch.allclose(w, torch.ones(4))
    assert torch.isfinite(plugin.gn_initial).all()


def test_gradnorm_step_leaves_model_gradient_equal_to_weighted_loss_gradient():
    torch.manual_seed(0)
    model = HydraNet(TASKS, image_size=32, channels=(4, 8, 8), fusion_channels=4, head_hidden=8)
    plugin = DynamicLossWeightingPlugin(TASKS, "gradnorm")
    x, y, _ = toy_samples(8, 0).batch(torch.arange(8))
    loss = plugin.criterion(model(x), y)
    plugin.before_backward(SimpleNamespace(model=model))  # the extra autograd.grad calls
    loss.backward()
    g1 = model.last_shared_layer.weight.grad.clone()
    model.zero_grad()
    plugin2 = DynamicLossWeightingPlugin(TASKS, "equal")
    plugin2.criterion(model(x), y).backward()  # gradnorm weights were 1 for this step too
    assert torch.allclose(g1, model.last_shared_layer.weight.grad, atol=1e-6)


def test_uncertainty_learns_log_variances_in_the_loop():
    trainer, plugin = make_trainer("uncertainty", uncertainty_lr=0.05)
    trainer.train_epochs = 2
    trainer.train(Experience(toy_samples(64, 0), 0, [0]))
    assert plugin.log_vars.abs().max() > 0.01
    assert plugin.log_vars.grad is None  # stepped and cleared by the plugin


def test_weight_curve_png_and_state_roundtrip(tmp_path):
    trainer, plugin = make_trainer("dwa_ema")
    trainer.train_epochs = 3
    trainer.train(Experience(toy_samples(32, 0), 0, [0]))
    path = plugin.plot_weights(tmp_path / "w.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [len(v) for v in plugin.weight_curves().values()] == [3, 3, 3, 3]
    from incremental.io import save_torch

    save_torch(tmp_path / "p.pt", plugin.state_dict())
    other = DynamicLossWeightingPlugin(TASKS, "dwa_ema")
    other.load_state_dict(torch.load(tmp_path / "p.pt", weights_only=True))
    assert other.weights == plugin.weights and other.log == plugin.log and other.period == plugin.period


def test_gradnorm_without_shared_layer_says_how_to_fix():
    plugin = DynamicLossWeightingPlugin(THREE, "gradnorm")
    out = {n: torch.zeros(2, requires_grad=True) for n in "abc"}
    plugin.criterion(out, {n: torch.ones(2) for n in "abc"})
    with pytest.raises(AttributeError, match="last_shared_layer"):
        plugin.before_backward(SimpleNamespace(model=nn.Linear(1, 1)))


def test_task_scales_multiply_the_period_weights():
    # equal weights 1 times scales (2, 0.5, 1); losses (1, 4, 3): 2*1 + 0.5*4 + 1*3 = 7
    plugin = DynamicLossWeightingPlugin(THREE, "equal", task_scales=[2.0, 0.5, 1.0])
    assert feed_period(plugin, [1.0, 4.0, 3.0]).item() == pytest.approx(7.0, rel=1e-6)
    assert plugin.log[0]["weights"] == {"a": 2.0, "b": 0.5, "c": 1.0}
    with pytest.raises(ValueError, match="learns its own scales"):
        DynamicLossWeightingPlugin(THREE, "gradnorm", task_scales=[1.0, 1.0, 1.0])


def test_period_losses_are_summed_over_ranks_before_weights(monkeypatch):
    # Simulated second rank whose period saw losses (30, 3, 0.5) on 2 labelled samples per task.
    # This rank: (10, 1, 0.5) on 2 samples. Global means: (20, 2, 0.5), so both ranks close the
    # period with those; with one rank only the logged means would be (10, 1, 0.5).
    import strategies.dynamic_loss_weighting as dlw

    other = torch.tensor([[60.0, 6.0, 1.0], [2.0, 2.0, 2.0]], dtype=torch.float64)

    def fake_all_reduce_sum_(tensor):
        if tensor.shape == other.shape:
            tensor += other
        return tensor

    monkeypatch.setattr(dlw.dist_utils, "all_reduce_sum_", fake_all_reduce_sum_)
    plugin = DynamicLossWeightingPlugin(THREE, "dwa_ema_exp")
    feed_period(plugin, [10.0, 1.0, 0.5])
    assert [plugin.log[0]["losses"][n] for n in "abc"] == pytest.approx([20.0, 2.0, 0.5])


def test_period_epochs_groups_epochs_into_one_period():
    # 5 epochs of 1 iteration with period_epochs=2: periods close after epochs 2 and 4 (2 steps each);
    # the fifth epoch is still open
    plugin = DynamicLossWeightingPlugin(THREE, "dwa", period_epochs=2)
    for losses in ([1.0, 2.0, 3.0], [3.0, 2.0, 1.0], [1.0, 1.0, 1.0], [1.0, 1.0, 1.0], [2.0, 2.0, 2.0]):
        feed_period(plugin, losses)
    assert [e["steps"] for e in plugin.log] == [2, 2]
    assert plugin.log[0]["losses"] == pytest.approx({"a": 2.0, "b": 2.0, "c": 2.0})  # mean over the two epochs
    assert plugin._steps_in_period == 1 and plugin.period == 3
