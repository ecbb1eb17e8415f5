"""GradientMixingPlugin in this project's loop and in Avalanche's Naive: exactness, both gradient passes, options.

The central check: after the plugin's after_backward, every parameter's .grad is exactly the mixed
gradient computed independently (a copy of the model, two autograd.grad calls, the pure rule), at every
step. The same probe run on Avalanche's GSS_greedy finds stale gradients (its extra backward passes
happen after zero_grad and the main backward adds onto them), which shows the probe can fail.
"""
from __future__ import annotations

import copy
import importlib.util
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from incremental.buffer import HistoryLibrary
from incremental.models import MLP
from incremental.plugins import Plugin
from incremental.scenarios.digits import split_digits
from incremental.trainer import Trainer
from incremental.flat_gradients import flatten_grads
from strategies.gradient_mixing import GradientMixingPlugin
from strategies.mixing_rules import (
    DEFAULT_RULE, HISTORY_LOSSES, RULES, TRANSFER_LOSSES, WEIGHTS, asymmetric_cross_entropy, class_log_prior,
    logit_adjusted_cross_entropy, logit_replay_loss, mix,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def digits():
    return split_digits(5, seed=0)


def load_example() -> Any:
    spec = importlib.util.spec_from_file_location("avalanche_gradient_mixing", REPO / "examples" / "avalanche_gradient_mixing.py")
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


class Probe(Plugin):
    """Snapshots the model and batches before each step and the gradients the optimizer will use."""

    def __init__(self, mixing: GradientMixingPlugin | None = None) -> None:
        super().__init__()
        self.mixing = mixing
        self.records: list[tuple[nn.Module, list[torch.Tensor], Any, list[torch.Tensor | None]]] = []

    def before_training_iteration(self, strategy: Any, **kwargs: Any) -> None:
        self._model = copy.deepcopy(strategy.model)
        self._batch = [t.clone() for t in strategy.mbatch[:2]]

    def before_update(self, strategy: Any, **kwargs: Any) -> None:
        grads = [None if p.grad is None else p.grad.detach().clone() for p in strategy.model.parameters()]
        if self.mixing is None:
            history = None
        elif hasattr(strategy, "mb_history") and getattr(strategy, "history", None) is not None:
            history = strategy.mb_history
        else:
            history = self.mixing.last_history_batch
        history = None if history is None else [t.clone() for t in history[:2]]
        stored = getattr(self.mixing, "_stored_logits", None) if self.mixing is not None and self.mixing.logits else None
        if history is not None and stored is not None:
            history.append((stored.clone(), self.mixing.logit_weight))
        self.records.append((self._model, self._batch, history, grads))


def independent_gradient(model: nn.Module, batch: list[torch.Tensor], history: Any, rule: str,
                         history_weight: float = 1.0) -> torch.Tensor:
    """What the optimizer should see: the rule applied to freshly computed g_h and g_t (with a
    ``history_weight`` lam other than 1, only for the similarity rules: written out by hand,
    ``g_t + (lam + max(0, -g_h.g_t)/|g_h|^2) g_h``)."""
    params = [p for p in model.parameters() if p.requires_grad]
    ce = nn.CrossEntropyLoss()
    transfer_loss = asymmetric_cross_entropy if history is not None and TRANSFER_LOSSES[rule] == "ace" else ce
    loss_t = transfer_loss(model(batch[0]), batch[1])
    g_t = flatten_grads(torch.autograd.grad(loss_t, params, allow_unused=True), params)
    if history is None:
        return g_t
    out_h = model(history[0])
    loss_h = ce(out_h, history[1])
    if HISTORY_LOSSES[rule] == "der":  # DER: plus the weighted logit replay term on the stored logits
        stored, weight = history[2]
        loss_h = loss_h + weight * logit_replay_loss(out_h, stored)
    g_h = flatten_grads(torch.autograd.grad(loss_h, params, allow_unused=True), params)
    if history_weight != 1.0:
        assert rule.startswith("similarity")
        return g_t + (history_weight + max(0.0, -float(g_h @ g_t)) / float(g_h @ g_h)) * g_h
    return mix(rule, g_h, g_t, loss_h, loss_t).grad


def actual_gradient(model: nn.Module, grads: list[torch.Tensor | None]) -> torch.Tensor:
    params = [p for p in model.parameters() if p.requires_grad]
    trainable = [g for g, p in zip(grads, model.parameters()) if p.requires_grad]
    return flatten_grads(trainable, params)


def count_stale(probe: Probe, rule: str, atol: float = 0.0, history_weight: float = 1.0) -> tuple[int, int]:
    """(steps whose gradient differs from the independent one, steps with a history batch); ``atol=0``
    asks for bit equality (the two-pass path computes exactly what the independent code does)."""
    stale = mixed = 0
    for model, batch, history, grads in probe.records:
        expected = independent_gradient(model, batch, history, rule, history_weight)
        actual = actual_gradient(model, grads)
        if not (torch.equal(actual, expected) if atol == 0 else torch.allclose(actual, expected, atol=atol, rtol=0)):
            stale += 1
        mixed += history is not None
    return stale, mixed


def our_trainer(model: nn.Module, plugins: list[Any], mem: int = 60, **kwargs: Any) -> Trainer:
    opt = kwargs.pop("optimizer", None) or torch.optim.SGD(model.parameters(), lr=0.05)
    return Trainer(model, opt, nn.CrossEntropyLoss(), train_mb_size=16, train_epochs=1, plugins=plugins,
                   history=HistoryLibrary(mem, "reservoir", seed=0), seed=0, **kwargs)


# ---------------------------------------------------------------- exactness / no stale gradient

EXACTNESS_CASES = [(rule, "two_pass") for rule in sorted(RULES)] + \
    [(rule, "fused") for rule in [*sorted(WEIGHTS), "similarity_ace", "similarity_der", "pcgrad_ace_der"]] + \
    [(rule, "ghost") for rule in [*sorted(WEIGHTS), "similarity_ace", "similarity_der", "pcgrad_ace_der"]]


@pytest.mark.parametrize("rule,gradient_pass", EXACTNESS_CASES)
def test_grad_is_exactly_the_mixed_gradient_in_our_loop(digits, rule: str, gradient_pass: str) -> None:
    # two passes: bit for bit; one fused pass (joint forward, batched backward) and the ghost pass (joint
    # forward, Gram matrices, one weighted product per layer): the same to 1e-6
    torch.manual_seed(0)
    model = MLP(64, 32, 10)
    plugin = GradientMixingPlugin(rule=rule, gradient_pass=gradient_pass)
    probe = Probe(plugin)
    trainer = our_trainer(model, [probe, plugin])  # the probe snapshots the batch before fused joins it
    trainer.train(digits.train_stream[:2])
    stale, mixed = count_stale(probe, rule, atol=0.0 if gradient_pass == "two_pass" else 1e-6)
    assert mixed >= 10  # the second experience mixed every step
    assert stale == 0
    # the loop handed the plugin the training minibatch alone (history consumed, not concatenated)
    assert all(len(batch[0]) <= 16 for _, batch, _, _ in probe.records)



@pytest.mark.parametrize("gradient_pass", ["two_pass", "fused", "ghost"])
def test_history_weight_scales_the_history_gradient_before_the_rule(digits, gradient_pass: str) -> None:
    # lam = 2.5: every step's .grad is g_t + (2.5 + max(0, -g_h.g_t)/|g_h|^2) g_h, on every gradient pass
    torch.manual_seed(0)
    model = MLP(64, 32, 10)
    plugin = GradientMixingPlugin(rule="similarity_der", gradient_pass=gradient_pass, history_weight=2.5)
    probe = Probe(plugin)
    our_trainer(model, [probe, plugin]).train(digits.train_stream[:2])
    # to 1e-6 on every pass: the plugin scales the geometry and the weight, the hand formula does not
    stale, mixed = count_stale(probe, "similarity_der", atol=1e-6, history_weight=2.5)
    assert mixed >= 10 and stale == 0
    w_h = [row["w_h"] for row in plugin.stats[1]]
    assert min(w_h) >= 2.5 and max(w_h) > 2.5  # the base weight, and the conflict term on top of it


def train_in_avalanche(strategy_class: type, plugins: list[Any], experiences: int, **options: Any) -> None:
    """``experiences`` Split Digits experiences in an Avalanche strategy built the same way for every
    caller (MLP 64-32-10 seeded 0, SGD 0.05, minibatches of 16, one epoch, no loggers)."""
    from avalanche.training.plugins import EvaluationPlugin

    bench, _ = load_example().avalanche_split_digits(5, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        model = MLP(64, 32, 10)
        strategy = strategy_class(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
                                  criterion=nn.CrossEntropyLoss(), train_mb_size=16, train_epochs=1,
                                  plugins=plugins, evaluator=EvaluationPlugin(loggers=[]), **options)
        for exp in bench.train_stream[:experiences]:
            strategy.train(exp)


def train_in_avalanche_naive(plugin: GradientMixingPlugin) -> Probe:
    """Two Split Digits experiences in Avalanche's ``Naive`` with ``plugin`` (its own library); the probe
    that recorded every step."""
    from avalanche.training import Naive

    probe = Probe(plugin)
    train_in_avalanche(Naive, [plugin, probe], 2)
    return probe


def test_history_weight_inside_avalanche_naive() -> None:
    # the same hand formula when the plugin runs inside a plain Avalanche strategy with its own library
    probe = train_in_avalanche_naive(GradientMixingPlugin(rule="similarity_der", mem_size=60, history_weight=2.5))
    stale, mixed = count_stale(probe, "similarity_der", atol=1e-6, history_weight=2.5)
    assert mixed >= 10 and stale == 0


class PriorProbe(Plugin):
    """The label counts gradient mixing's logit adjustment used at each step (read before the update)."""

    def __init__(self, mixing: GradientMixingPlugin) -> None:
        super().__init__()
        self.mixing, self.counts = mixing, []

    def before_update(self, strategy: Any, **kwargs: Any) -> None:
        counts = self.mixing._label_counts
        self.counts.append(None if counts is None else counts.clone())


@pytest.mark.parametrize("gradient_pass", ["two_pass", "fused", "ghost"])
def test_logit_adjustment_mixes_the_gradients_of_both_adjusted_losses(digits, gradient_pass: str) -> None:
    torch.manual_seed(0)
    model = MLP(64, 32, 10)
    plugin = GradientMixingPlugin(rule="similarity_der", gradient_pass=gradient_pass, logit_adjustment=1.0)
    probe, priors = Probe(plugin), PriorProbe(plugin)
    our_trainer(model, [probe, plugin, priors]).train(digits.train_stream[:2])
    mixed, running, differs = 0, torch.zeros(10, dtype=torch.long), 0
    for (m, batch, history, grads), counts in zip(probe.records, priors.counts):
        if history is None:  # first experience: the loop's own step, nothing adjusted
            assert counts is None
            continue
        mixed += 1
        # the prior counts the labels of this experience's joint minibatches so far, this step's included
        running += torch.bincount(batch[1], minlength=10) + torch.bincount(history[1], minlength=10)
        assert torch.equal(counts, running[: len(counts)]) and int(running[len(counts):].sum()) == 0
        params = list(m.parameters())
        log_prior = class_log_prior(counts, 10)
        loss_t = logit_adjusted_cross_entropy(m(batch[0]), batch[1], log_prior, 1.0)
        out_h = m(history[0])
        stored, weight = history[2]
        loss_h = logit_adjusted_cross_entropy(out_h, history[1], log_prior, 1.0) + weight * logit_replay_loss(out_h, stored)
        g_t = flatten_grads(torch.autograd.grad(loss_t, params), params)
        g_h = flatten_grads(torch.autograd.grad(loss_h, params), params)
        expected = mix("similarity_der", g_h, g_t, loss_h, loss_t).grad
        assert torch.allclose(actual_gradient(m, grads), expected, atol=1e-6, rtol=0)
        differs += not torch.allclose(expected, independent_gradient(m, batch, history, "similarity_der"), atol=1e-4)
    assert mixed >= 10 and differs == mixed  # and the adjustment changed every step's gradient

@pytest.mark.parametrize("gradient_pass", ["two_pass", "ghost"])
def test_grad_is_exact_when_the_head_grows(digits, gradient_pass: str) -> None:
    # growing head: the parameters change between experiences (a new nn.Linear); the plugin must mix
    # the new ones (ghost: its hooks move to the new layer)
    torch.manual_seed(0)
    model = MLP(64, 32, 2)
    plugin = GradientMixingPlugin(gradient_pass=gradient_pass)
    probe = Probe(plugin)
    our_trainer(model, [probe, plugin]).train(digits.train_stream[:2])
    assert model.classifier.n_classes == 4
    stale, mixed = count_stale(probe, DEFAULT_RULE, atol=0.0 if gradient_pass == "two_pass" else 1e-6)
    assert mixed > 0 and stale == 0


def test_grad_is_exact_in_avalanche_naive_and_gss_greedy_is_not(digits) -> None:
    from avalanche.training import GSS_greedy

    plugin = GradientMixingPlugin(rule="similarity", mem_size=60)
    probe = train_in_avalanche_naive(plugin)
    stale, mixed = count_stale(probe, "similarity")
    assert mixed >= 10 and stale == 0
    assert len(plugin.library) == 60  # its own library, filled after the first experience

    # Positive control: the same probe on Avalanche's GSS_greedy (no mixing: expected = plain gradient of
    # the step's loss) finds gradients left over from its extra backward passes.
    gss_probe = Probe(None)
    train_in_avalanche(GSS_greedy, [gss_probe], 1, mem_size=60, mem_strength=5, input_size=[64])
    gss_stale, _ = count_stale(gss_probe, "sum")
    assert gss_stale >= len(gss_probe.records) // 2, (gss_stale, len(gss_probe.records))


def test_empty_library_leaves_the_loop_gradient_alone(digits) -> None:
    # first experience: no history yet -> the plugin must not touch .grad and records nothing
    torch.manual_seed(0)
    model = MLP(64, 32, 10)
    plugin = GradientMixingPlugin()
    probe = Probe(plugin)
    our_trainer(model, [plugin, probe]).train(digits.train_stream[0])
    assert count_stale(probe, DEFAULT_RULE) == (0, 0)
    assert plugin.stats == {}


class WithUnusedParameters(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = MLP(64, 32, 10)
        self.unused = nn.Parameter(torch.ones(3))
        self.frozen = nn.Parameter(torch.ones(2), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) + 0.0 * self.frozen.sum()


def test_parameters_without_gradient_stay_without_gradient(digits) -> None:
    # SGD with momentum and weight decay would move a parameter whose grad is zeros; None must stay None
    torch.manual_seed(0)
    model = WithUnusedParameters()
    plugin = GradientMixingPlugin()
    probe = Probe(plugin)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=0.1)
    our_trainer(model, [plugin, probe], optimizer=opt).train(digits.train_stream[:2])
    assert model.unused.grad is None and torch.equal(model.unused.detach(), torch.ones(3))
    assert model.frozen.grad is None
    stale, mixed = count_stale(probe, DEFAULT_RULE)
    assert mixed > 0 and stale == 0


# ---------------------------------------------------------------- statistics

def test_statistics_per_iteration_summary_and_plots(digits, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = MLP(64, 32, 10)
    plugin = GradientMixingPlugin(rule="similarity")
    our_trainer(model, [plugin]).train(digits.train_stream[:3])
    assert sorted(plugin.stats) == [1, 2]  # experience 0 had no history
    rows = plugin.stats[1]
    assert len(rows) == len(range(0, len(digits.train_stream[1].dataset), 16))
    for r in rows:
        assert set(r) == {"similarity", "w_h", "w_t", "norm_h", "norm_t", "loss_h", "loss_t", "conflict"}
        assert -1.0 <= r["similarity"] <= 1.0 and r["conflict"] == float(r["similarity"] < 0)
        assert r["w_t"] == 1.0 and r["w_h"] >= 1.0  # similarity rule
        # the rule's own formula, from the recorded numbers
        expected = 1.0 + max(0.0, -r["similarity"]) * r["norm_t"] / r["norm_h"]
        assert r["w_h"] == pytest.approx(expected, rel=1e-6)
    summary = plugin.summary()
    assert summary[1]["iterations"] == len(rows)
    assert summary[1]["conflict_fraction"] == pytest.approx(sum(r["conflict"] for r in rows) / len(rows))
    paths = plugin.plot_stats(tmp_path)
    assert [p.name for p in paths] == ["gradient_mixing_exp1.png", "gradient_mixing_exp2.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in paths)


def test_unknown_rule_names_the_choices() -> None:
    with pytest.raises(ValueError, match="unknown gradient mixing rule 'cosine'.*similarity"):
        GradientMixingPlugin(rule="cosine")


# ---------------------------------------------------------------- data parallel bookkeeping

def test_sharded_step_averages_both_gradients_before_mixing(digits, monkeypatch) -> None:
    # Two ranks simulated in one process: this rank's buffer is averaged with a fixed "other rank"
    # buffer; the mixed gradient must be the rule applied to the averaged g_h and g_t.
    import incremental.distributed as dist_utils

    captured: dict[str, torch.Tensor] = {}

    def fake_mean(buf: torch.Tensor) -> torch.Tensor:
        other = torch.full_like(buf, 0.5)
        captured["local"] = buf.clone()
        buf.add_(other).div_(2)
        return buf

    monkeypatch.setattr(dist_utils, "all_reduce_mean_", fake_mean)

    class Sharder:
        active, world = True, 2

    torch.manual_seed(0)
    model = MLP(64, 16, 10)
    trainer = our_trainer(model, [])
    trainer.sharder = Sharder()
    trainer._loss_weight = 1.0
    trainer.history.samples = digits.train_stream[0].dataset.subset(torch.arange(8))
    trainer.history.last_global_batch_size = 8
    data = digits.train_stream[1].dataset
    trainer.mbatch = data.batch(torch.arange(8))
    trainer.mb_history = trainer.history.samples.batch(torch.arange(4))  # this rank's half of 8
    trainer.experience = digits.train_stream[1]
    plugin = GradientMixingPlugin(rule="pcgrad", gradient_pass="two_pass")
    plugin.before_training_iteration(trainer)  # takes the step's history batch
    trainer.mb_output = trainer.forward()
    trainer.loss = trainer.criterion()
    trainer.loss.backward()
    plugin.after_backward(trainer)
    n = sum(p.numel() for p in model.parameters())
    local = captured["local"]
    g_h, g_t = (local[:n] + 0.5) / 2, (local[n : 2 * n] + 0.5) / 2
    loss_h, loss_t = (local[2 * n] + 0.5) / 2, (local[2 * n + 1] + 0.5) / 2
    expected = mix("pcgrad", g_h, g_t, loss_h, loss_t).grad
    assert torch.equal(flatten_grads([p.grad for p in model.parameters()], list(model.parameters())), expected)
    # this rank holds 4 of the 8 history samples: weight 4 * 2 / 8 = 1, so local g_h is the plain gradient
    ce = nn.CrossEntropyLoss()
    params = list(model.parameters())
    plain_h = flatten_grads(torch.autograd.grad(ce(model(trainer.mb_history[0]), trainer.mb_history[1]), params), params)
    assert torch.allclose(local[:n], plain_h, atol=1e-7)


def test_sharded_step_without_history_still_averages_the_loop_gradient(digits, monkeypatch) -> None:
    # With averages_gradients the loop does not wrap the model in DDP, so in the first experience (no
    # history yet) the plugin must average the plain gradient over ranks itself.
    import incremental.distributed as dist_utils

    monkeypatch.setattr(dist_utils, "all_reduce_mean_", lambda buf: buf.add_(torch.full_like(buf, 0.5)).div_(2))

    class Sharder:
        active, world = True, 2

    torch.manual_seed(0)
    model = MLP(64, 16, 10)
    trainer = our_trainer(model, [])
    trainer.sharder = Sharder()
    trainer.mbatch = digits.train_stream[0].dataset.batch(torch.arange(8))
    trainer.mb_history = None
    trainer.experience = digits.train_stream[0]
    trainer.mb_output = trainer.forward()
    trainer.loss = trainer.criterion()
    trainer.loss.backward()
    params = list(model.parameters())
    local = flatten_grads([p.grad for p in params], params).clone()
    GradientMixingPlugin().after_backward(trainer)
    assert torch.equal(flatten_grads([p.grad for p in params], params), (local + 0.5) / 2)
    assert GradientMixingPlugin.averages_gradients  # tells the loop not to add DDP on top


@pytest.mark.slow
@pytest.mark.parametrize("config", ["split_digits_gradient_mixing", "digits_transfer"])
def test_two_processes_match_one_process(tmp_path: Path, config: str) -> None:
    # Real torchrun (gloo, CPU): same numbers as one process (the fast tests above cover the averaging).
    import json
    import os
    import subprocess
    import sys

    small = ["--quiet", "--set", "train.epochs=2", "--set", "model.hidden_size=32"]
    if config == "digits_transfer":
        small += ["--set", "general.epochs=2", "--set", "train.epochs=10"]

    def run(out: Path, nproc: int) -> list:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] \
            if nproc > 1 else [sys.executable]
        done = subprocess.run([*launcher, "-m", "incremental", "run", f"configs/{config}.yaml", "--out", str(out),
                               *small], cwd=REPO, capture_output=True, text=True, timeout=600,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert done.returncode == 0, done.stderr[-2000:]
        return json.loads((out / "results.json").read_text())["accuracy_matrix"]

    one, two = run(tmp_path / "one", 1), run(tmp_path / "two", 2)
    assert torch.allclose(torch.tensor(two), torch.tensor(one), atol=0.01)


# ---------------------------------------------------------------- the Avalanche example

def test_avalanche_example_runs_quick(tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = load_example().main(["--quick", "--mem-size", "50", "--out", str(tmp_path)])
    assert len(out["accuracy_matrix"]) == 2
    assert out["library_size"] == 50
    assert out["gradient_stats"][1]["iterations"] > 0
    assert (tmp_path / "gradient_mixing_exp1.png").is_file()


# ---------------------------------------------------------------- options and the fused pass

@pytest.mark.parametrize("options,name", [
    ({"mem_size": -1}, "mem_size"), ({"mem_size": 2.5}, "mem_size"), ({"rule": "cosine"}, "rule"),
    ({"storage_policy": "newest"}, "storage_policy"), ({"history_batch_size": 0}, "history_batch_size"),
    ({"seed": "0"}, "seed"), ({"gradient_pass": "three"}, "gradient_pass"), ({"logit_weight": -0.1}, "logit_weight"),
    ({"logit_adjustment": -1.0}, "logit_adjustment"), ({"history_weight": 0.0}, "history_weight"),
    ({"history_weight": float("inf")}, "history_weight"), ({"logit_adjustment": 1.0, "rule": "similarity_ace_der"}, "logit_adjustment"),
])
def test_impossible_options_fail_at_once_naming_the_option(options: dict, name: str) -> None:
    from incremental.config import ConfigError

    with pytest.raises(ConfigError) as info:
        GradientMixingPlugin(**options)
    message = str(info.value)
    assert message.startswith(f"{name}: ") and "\n" not in message


def test_options_are_keyword_only() -> None:
    with pytest.raises(TypeError):
        GradientMixingPlugin("similarity", 200)  # type: ignore[misc]


class L2OnTheLoss(Plugin):
    """A regulariser added to strategy.loss in before_backward, after the mixing plugin's own callback."""

    def before_backward(self, strategy: Any, **kwargs: Any) -> None:
        strategy.loss = strategy.loss + 0.05 * sum((p ** 2).sum() for p in strategy.model.parameters())


class PenaltyOnTheOutputs(Plugin):
    """A term of the transfer outputs (as LwF's distillation is) added to strategy.loss in before_backward:
    its backward goes through the forward graph the one-pass gradients already walked."""

    def before_backward(self, strategy: Any, **kwargs: Any) -> None:
        strategy.loss = strategy.loss + 0.1 * strategy.mb_output.square().mean()


@pytest.mark.parametrize("rule", ["similarity", "pcgrad_der"])
@pytest.mark.parametrize("one_pass", ["fused", "ghost"])
@pytest.mark.parametrize("term, term_first", [(L2OnTheLoss, False), (L2OnTheLoss, True),
                                              (PenaltyOnTheOutputs, False), (PenaltyOnTheOutputs, True)])
def test_fused_and_two_pass_train_the_same_model(digits, rule: str, one_pass: str, term: type,
                                                 term_first: bool) -> None:
    # Same mixed gradient to 1e-6 at every step (here: same weights after two experiences), including a
    # term another plugin adds to the loss after the one-pass backward ran (it reaches g_t through the
    # loop's backward, through the kept graph when it is a term of the outputs) or before it (ghost then
    # takes the batched backward: the term need not be per sample).
    def train(gradient_pass: str) -> nn.Module:
        torch.manual_seed(0)
        model = MLP(64, 32, 10)
        plugin = GradientMixingPlugin(rule=rule, gradient_pass=gradient_pass)
        plugins = [term(), plugin] if term_first else [plugin, term()]
        our_trainer(model, plugins).train(digits.train_stream[:2])
        assert len(plugin.stats[1]) > 10
        return model

    two, one = train("two_pass"), train(one_pass)
    for a, b in zip(two.parameters(), one.parameters()):
        assert torch.allclose(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("gradient_pass", ["fused", "ghost"])
def test_the_kept_forward_graph_goes_with_the_step(digits, gradient_pass: str) -> None:
    # The one-pass paths keep the joint forward's graph through the loop's backward (a later plugin may
    # add a term of the outputs); after the step nothing may hold it, or the next forward would run with
    # two steps' activations alive.
    graphs: list[bool] = []

    class Holder(Plugin):
        def after_training_iteration(self, strategy: Any, **kwargs: Any) -> None:
            if plugin.last_history_batch is not None:
                graphs.append(strategy.mb_output.grad_fn is not None)  # (the loss is a stand-in, graph-free)

    torch.manual_seed(0)
    plugin = GradientMixingPlugin(gradient_pass=gradient_pass)
    our_trainer(MLP(64, 32, 10), [plugin, Holder()]).train(digits.train_stream[:2])
    assert graphs and not any(graphs)


def count_ghost_steps(monkeypatch: pytest.MonkeyPatch, min_parameters: int = 0) -> list[int]:
    """Counts the plugin's calls of output_gradients (one per ghost step, and one per check); ``auto``
    takes the ghost pass from ``min_parameters`` on (the test models are small)."""
    import strategies.gradient_mixing as module

    monkeypatch.setattr(module, "GHOST_MIN_PARAMETERS", min_parameters)
    calls: list[int] = []
    real = module.output_gradients

    def spy(loss: torch.Tensor, records: Any, **kwargs: Any) -> Any:
        calls.append(len(records))
        return real(loss, records, **kwargs)

    monkeypatch.setattr(module, "output_gradients", spy)
    return calls


def test_auto_takes_the_ghost_path_on_an_mlp_in_our_loop(digits, monkeypatch) -> None:
    calls = count_ghost_steps(monkeypatch)
    torch.manual_seed(0)
    model = MLP(64, 32, 10, hidden_layers=2)
    plugin = GradientMixingPlugin()  # auto
    our_trainer(model, [plugin]).train(digits.train_stream[:3])
    mixed = len(plugin.stats[1]) + len(plugin.stats[2])
    assert plugin._ghost_reason is None and len(calls) == mixed and set(calls) == {3}  # 3 linear layers
    assert not any(m._forward_hooks for m in model.modules())  # the hooks leave with the experience


def test_auto_takes_two_passes_on_a_model_too_small_for_the_ghost_pass(digits, monkeypatch) -> None:
    from strategies.gradient_mixing import GHOST_MIN_PARAMETERS

    calls = count_ghost_steps(monkeypatch, GHOST_MIN_PARAMETERS)
    torch.manual_seed(0)
    model = MLP(64, 32, 10, hidden_layers=2)
    assert sum(p.numel() for p in model.parameters()) < GHOST_MIN_PARAMETERS
    plugin = GradientMixingPlugin()
    our_trainer(model, [plugin]).train(digits.train_stream[:2])
    assert calls == [] and not plugin._fused and "fewer than" in plugin.ghost_unavailable


class BatchCentering(nn.Module):
    """Subtracts the batch mean: samples interact, and no structural check can see it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x - x.mean(0, keepdim=True)


def test_a_model_whose_samples_interact_leaves_the_ghost_path(digits, monkeypatch) -> None:
    calls = count_ghost_steps(monkeypatch)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), BatchCentering(), nn.Tanh(), nn.Linear(32, 10))
    plugin = GradientMixingPlugin(rule="similarity")
    with pytest.warns(UserWarning, match="ghost path is off"):
        our_trainer(model, [plugin]).train(digits.train_stream[:2])
    assert len(calls) == 1 and len(plugin.stats[1]) > 10  # checked once, then the batched backward
    from strategies.gradient_mixing import DISAGREED

    assert plugin._ghost_reason == DISAGREED


def test_ghost_asked_for_on_a_conv_net_is_a_config_error(digits) -> None:
    from incremental.config import ConfigError

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 8), nn.Unflatten(1, (2, 2, 2)), nn.Conv2d(2, 2, 1), nn.Flatten(), nn.Linear(8, 10))
    plugin = GradientMixingPlugin(gradient_pass="ghost")
    with pytest.raises(ConfigError, match="gradient_pass.*ghost cannot serve this run.*not in an nn.Linear"):
        our_trainer(model, [plugin]).train(digits.train_stream[:2])


def test_auto_leaves_the_joint_forward_when_another_plugin_adds_a_term_first(digits, monkeypatch) -> None:
    # A term added before gradient mixing's callback may not be per sample (an L2 penalty is not): that
    # step takes the batched backward, and the rest of the experience the two passes (faster on the CPU).
    calls = count_ghost_steps(monkeypatch)
    joint: list[bool] = []

    class Spy(Plugin):
        def after_training_iteration(self, strategy: Any, **kwargs: Any) -> None:
            joint.append(plugin._fused)

    torch.manual_seed(0)
    plugin = GradientMixingPlugin()
    our_trainer(MLP(64, 32, 10), [L2OnTheLoss(), plugin, Spy()]).train(digits.train_stream[:2])
    mixed = joint[-len(plugin.stats[1]):]
    assert calls == [] and mixed[0] and not any(mixed[1:])


def test_logit_adjustment_needs_class_index_labels() -> None:
    from incremental.config import ConfigError

    plugin = GradientMixingPlugin(logit_adjustment=1.0)
    with pytest.raises(ConfigError, match="logit_adjustment.*class-index labels"):
        plugin._count_labels(torch.tensor([0.5, 1.0]))
    plugin._count_labels(torch.tensor([2, 0]), torch.tensor([4]))  # a longer count vector grows the total
    assert plugin._label_counts.tolist() == [1, 0, 1, 0, 1]


class HistorySeen(Plugin):
    """Per mixing step: the history images as the loop drew them (None in a loop without a library, such as
    Avalanche's), the ones gradient mixing replayed, and what the library held."""

    def __init__(self, mixing: GradientMixingPlugin) -> None:
        super().__init__()
        self.mixing, self.steps = mixing, []

    def before_update(self, strategy: Any, **kwargs: Any) -> None:
        replayed = self.mixing.last_history_batch
        if replayed is not None:
            drawn = getattr(strategy, "mb_history", None)
            self.steps.append((None if drawn is None else drawn[0].clone(), replayed[0].clone(),
                               self.mixing._library(strategy).samples.x.clone()))


def one_pixel_shifts(images: torch.Tensor) -> list[torch.Tensor]:
    """The nine shifts of every image by at most one pixel (the identity among them)."""
    from incremental.transforms import shift_images

    return [shift_images(images, torch.tensor([[i], [j]]).expand(2, len(images)), 1) for i in range(3) for j in range(3)]


def image_experiences(seed: int = 0) -> list[Any]:
    from incremental.data import Experience, TensorSamples

    gen = torch.Generator().manual_seed(seed)
    out = []
    for k in range(2):
        y = torch.arange(2 * k, 2 * k + 2).repeat(24)
        x = torch.rand(len(y), 1, 6, 6, generator=gen) + y.view(-1, 1, 1, 1) / 4
        out.append(Experience(TensorSamples(x, y), k, [2 * k, 2 * k + 1]))
    return out


def train_with_shift(seed: int, shift: int = 1) -> tuple[Trainer, HistorySeen]:
    torch.manual_seed(0)
    model = MLP(36, 16, 4)
    plugin = GradientMixingPlugin(history_shift=shift)
    seen = HistorySeen(plugin)
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.05), nn.CrossEntropyLoss(), train_mb_size=8,
                      plugins=[plugin, seen], history=HistoryLibrary(20, "reservoir", seed=0), seed=seed)
    for exp in image_experiences():
        trainer.train(exp)
    return trainer, seen


def test_history_shift_replays_each_stored_image_shifted_and_leaves_the_library_alone() -> None:
    trainer, seen = train_with_shift(seed=0)
    assert len(seen.steps) >= 6
    moved = 0
    for drawn, replayed, _ in seen.steps:
        shifts = one_pixel_shifts(drawn)
        for n, (x, y) in enumerate(zip(drawn, replayed)):  # some shift within one pixel of the image as stored
            assert any(torch.equal(y, s[n]) for s in shifts)
            moved += not torch.equal(x, y)
    assert moved > len(seen.steps)  # most replays moved (1 in 9 is the identity)
    # the same seed replays the same shifts; the plugin's generator survives a checkpoint
    _, again = train_with_shift(seed=0)
    assert all(torch.equal(a[1], b[1]) for a, b in zip(seen.steps, again.steps))
    plugin = trainer.plugins[0]
    state = plugin.state_dict()
    other = GradientMixingPlugin(history_shift=1)
    other.load_state_dict(state)
    assert torch.equal(other._shift_generator.get_state(), plugin._shift_generator.get_state())
    assert all(torch.equal(library, seen.steps[0][2]) for _, _, library in seen.steps)  # the stored images never moved


def test_history_shift_needs_image_batches(digits) -> None:
    from incremental.config import ConfigError

    plugin = GradientMixingPlugin(history_shift=1)
    with pytest.raises(ConfigError, match="history_shift.*N, C, H, W"):
        our_trainer(MLP(64, 32, 10), [plugin]).train(digits.train_stream[:2])


def test_history_shift_inside_avalanche_naive_replays_its_own_library_shifted() -> None:
    from avalanche.benchmarks.scenarios.supervised import class_incremental_benchmark
    from avalanche.benchmarks.utils import _make_taskaware_tensor_classification_dataset as tensor_dataset
    from avalanche.training import Naive
    from avalanche.training.plugins import EvaluationPlugin

    ours = split_digits(5, seed=0)
    x = torch.cat([e.dataset.x for e in ours.train_stream[:2]]).view(-1, 1, 8, 8)
    y = torch.cat([e.dataset.y for e in ours.train_stream[:2]])
    bench = class_incremental_benchmark({"train": tensor_dataset(x, y), "test": tensor_dataset(x, y)},
                                        class_order=ours.class_order[:4], num_classes_per_exp=[2, 2])

    def run() -> list[torch.Tensor]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.manual_seed(0)
            model = MLP(64, 32, 4)
            plugin = GradientMixingPlugin(mem_size=30, history_shift=1)
            seen = HistorySeen(plugin)
            naive = Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
                          criterion=nn.CrossEntropyLoss(), train_mb_size=16, train_epochs=1,
                          plugins=[plugin, seen], evaluator=EvaluationPlugin(loggers=[]))
            for exp in bench.train_stream:
                naive.train(exp)
        assert all(drawn is None for drawn, _, _ in seen.steps)  # Avalanche's loop draws no history
        return [(replayed, library) for _, replayed, library in seen.steps]

    steps = run()
    batches, stored = [b for b, _ in steps], steps[-1][1]  # the library held the first experience's samples
    assert len(batches) >= 5 and all(b.shape[1:] == (1, 8, 8) for b in batches)
    assert all(torch.equal(library, stored) for _, library in steps)
    candidates = {tuple(s[i].flatten().tolist()) for s in one_pixel_shifts(stored) for i in range(len(stored))}
    assert all(tuple(img.flatten().tolist()) in candidates for b in batches for img in b)  # stored images, shifted
    assert any(not any(torch.equal(img, s) for s in stored) for b in batches for img in b)  # and some moved
    again = run()  # the generator comes from the experiment's torch seed: same seed, same shifts
    assert all(torch.equal(a, b) for a, (b, _) in zip(batches, again))
