import copy

import pytest
import torch
from torch import nn

from incremental import HistoryLibrary, Plugin, Trainer, seed_everything
from incremental.models import MLP, GrowingClassifier, outputs_kept


class BatchSizes(Plugin):
    def __init__(self, consumes=False):
        super().__init__()
        self.consumes_history = consumes
        self.sizes = []
        self.history_sizes = []

    def before_forward(self, strategy, **kwargs):
        self.sizes.append(len(strategy.mb_x))
        self.history_sizes.append(None if strategy.mb_history is None else len(strategy.mb_history_x))


def make_trainer(mem=0, plugins=(), seed=0, growing=False, n_out=10, epochs=1):
    seed_everything(seed)
    model = MLP(64, 32, n_out)
    return Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), nn.CrossEntropyLoss(),
                   train_mb_size=16, train_epochs=epochs, history=HistoryLibrary(mem, seed=seed) if mem else None,
                   plugins=list(plugins), seed=seed)


def test_replay_concatenates_history_into_the_minibatch(digits_tiny):
    rec = BatchSizes()
    trainer = make_trainer(mem=40, plugins=[rec])
    trainer.train(digits_tiny.train_stream[0])
    assert set(rec.history_sizes) == {None}  # nothing stored before the first experience ends
    assert len(trainer.history) == 40
    rec.sizes.clear(), rec.history_sizes.clear()
    trainer.train(digits_tiny.train_stream[1])
    assert rec.sizes[0] == 32 and rec.history_sizes[0] == 16


def test_history_consumer_gets_the_training_minibatch_alone(digits_tiny):
    rec = BatchSizes(consumes=True)
    trainer = make_trainer(mem=40, plugins=[rec])
    trainer.train(digits_tiny.train_stream[0])
    trainer.train(digits_tiny.train_stream[1])
    assert rec.sizes[-2] == 16 and rec.history_sizes[-2] == 16


def test_same_seed_same_numbers(digits_tiny):
    results = []
    for _ in range(2):
        trainer = make_trainer(mem=30, seed=7)
        for exp in digits_tiny.train_stream:
            trainer.train(exp)
        results.append(trainer.eval(digits_tiny.test_stream))
    assert results[0] == results[1]


def test_growing_head_keeps_old_rows_and_optimizer_follows(digits_tiny):
    seed_everything(0)
    model = MLP(64, 32, n_classes=4)
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), train_mb_size=16)
    trainer.train(digits_tiny.train_stream[0])  # classes 0-3
    old_w = model.classifier.linear.weight.detach().clone()
    trainer.train(digits_tiny.train_stream[1])  # classes 4-6: head grows to 7
    assert model.classifier.n_classes == 7
    opt_params = trainer.optimizer.param_groups[0]["params"]
    assert any(p is model.classifier.linear.weight for p in opt_params)
    # the grown head was trained, and its old rows were copied before training (they moved only by SGD)
    grown = GrowingClassifier(32, 4)
    grown.linear.weight.data.copy_(old_w)
    grown.grow_to(7)
    assert torch.equal(grown.linear.weight[:4], old_w)


def test_outputs_kept_allows_rounding_only():
    before = torch.tensor([[1.0, -2.0, 3.0e-3]])
    assert outputs_kept(before.clone(), before)
    assert outputs_kept(before + torch.tensor([[2.4e-7, -2.4e-7, 0.0]]), before)  # the last bits of a GEMM
    assert not outputs_kept(before + torch.tensor([[0.0, 0.0, 1e-4]]), before)  # a changed output
    assert not outputs_kept(before[:, :2], before)  # not the same outputs at all
    head = GrowingClassifier(8, 3)
    x = torch.randn(5, 8)
    reference = head(x).detach()
    head.grow_to(6)
    assert outputs_kept(head(x).detach()[:, :3], reference)


def test_grow_to_never_shrinks():
    head = GrowingClassifier(8, 5)
    assert head.grow_to(3) is False and head.n_classes == 5


def test_state_dict_resume_matches_uninterrupted_training(digits_tiny):
    full = make_trainer(mem=30, seed=3)
    for exp in digits_tiny.train_stream:
        full.train(exp)
    expected = full.eval(digits_tiny.test_stream)

    first = make_trainer(mem=30, seed=3)
    first.train(digits_tiny.train_stream[0])
    state = copy.deepcopy(first.state_dict())
    torch.manual_seed(12345)  # disturb the global RNG: the checkpoint must restore it
    resumed = make_trainer(mem=30, seed=99)
    resumed.load_state_dict(state)
    for exp in digits_tiny.train_stream[1:]:
        resumed.train(exp)
    assert resumed.eval(digits_tiny.test_stream) == expected


def test_stop_training_ends_the_epoch(digits_tiny):
    class StopAfterTwo(Plugin):
        def after_training_iteration(self, strategy, **kwargs):
            if strategy.clock.train_epoch_iterations == 1:
                strategy.stop_training()

    trainer = make_trainer(plugins=[StopAfterTwo()])
    trainer.train(digits_tiny.train_stream[0])
    assert trainer.clock.train_iterations == 2


class WritesGradients(Plugin):
    """Writes every gradient itself in before_backward (all ones) and leaves a loss without a graph."""

    def __init__(self, add_term_after=False):
        super().__init__()
        self.add_term_after = add_term_after

    def before_backward(self, strategy, **kwargs):
        for p in strategy.model.parameters():
            p.grad = torch.ones_like(p)
        strategy.gradients_written = True
        strategy.loss = strategy.loss.detach().clone()
        if self.add_term_after:  # what a later plugin's regulariser does: its gradient must still arrive
            strategy.loss += list(strategy.model.parameters())[-1].sum()


def test_a_plugin_that_wrote_the_gradients_skips_the_loops_backward(digits_tiny):
    trainer = make_trainer(plugins=[WritesGradients()])
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.optimizer.param_groups[0]["lr"] = 0.5
    trainer.train(digits_tiny.train_stream[0])  # a backward on the detached loss would raise
    steps = trainer.clock.train_iterations
    for b, p in zip(before, trainer.model.parameters()):
        assert torch.allclose(p.detach(), b - 0.5 * steps)  # the plugin's ones, nothing else
    assert trainer.gradients_written


def test_a_term_added_after_the_written_gradients_still_back_propagates(digits_tiny):
    trainer = make_trainer(plugins=[WritesGradients(add_term_after=True)])
    bias = list(trainer.model.parameters())[-1]
    before = bias.detach().clone()
    trainer.train(digits_tiny.train_stream[0])
    # ones from the plugin plus ones from d(sum bias)/d bias accumulated into .grad by the loop's backward
    assert torch.allclose(bias.detach(), before - 0.1 * 2 * trainer.clock.train_iterations)


def test_the_loop_backward_still_runs_when_no_plugin_wrote_gradients(digits_tiny):
    class DetachesOnly(Plugin):
        def before_backward(self, strategy, **kwargs):
            strategy.loss = strategy.loss.detach()

    with pytest.raises(RuntimeError, match="does not require grad"):
        make_trainer(plugins=[DetachesOnly()]).train(digits_tiny.train_stream[0])


class StepNorms(torch.optim.SGD):
    """SGD that records the gradient's total norm it steps with."""

    def __init__(self, params, lr):
        super().__init__(params, lr=lr)
        self.norms = []

    def step(self, closure=None):
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        self.norms.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))
        return super().step(closure)


def test_grad_clip_bounds_the_norm_the_optimizer_steps_with_after_every_plugin(digits_tiny):
    from strategies.gradient_mixing import GradientMixingPlugin

    def train(grad_clip):
        seed_everything(0)
        model = MLP(64, 32, 10)
        opt = StepNorms(model.parameters(), lr=0.1)
        plugin = GradientMixingPlugin(mem_size=40, seed=0)  # writes the mixed gradient in after_backward
        trainer = Trainer(model, opt, nn.CrossEntropyLoss(), train_mb_size=16, plugins=[plugin], grad_clip=grad_clip)
        trainer.train(digits_tiny.train_stream[:2])
        return opt.norms

    free, clipped = train(None), train(0.5)
    assert len(free) == len(clipped) and max(free) > 0.5
    assert max(clipped) <= 0.5 + 1e-5  # the mixed gradient was clipped, not the loop's own
    assert clipped[0] == pytest.approx(min(free[0], 0.5), rel=1e-5)


@pytest.mark.parametrize("value", [0.0, -1.0, float("inf"), float("nan")])
def test_grad_clip_must_be_a_positive_number(value):
    from incremental.config import ConfigError

    with pytest.raises(ConfigError, match="grad_clip"):
        Trainer(MLP(64, 8, 10), torch.optim.SGD(MLP(64, 8, 10).parameters(), lr=0.1), grad_clip=value)


def test_train_grad_clip_reaches_the_loop_from_a_config(tmp_path, capsys):
    from pathlib import Path

    from incremental.cli import main

    config = str(Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml")
    tiny = ["--quiet", "--set", "train.epochs=1", "--set", "scenario.n_experiences=2"]
    assert main(["run", config, "--out", str(tmp_path / "bad"), *tiny, "--set", "train.grad_clip=0"]) == 2
    assert "train.grad_clip: must be a number > 0 or null" in capsys.readouterr().err
    assert main(["run", config, "--out", str(tmp_path / "ok"), *tiny, "--set", "train.grad_clip=0.01"]) == 0


def test_collapsed_class_is_one_class_answered_for_a_test_set_of_several():
    from incremental.guards import collapsed_class

    assert collapsed_class(torch.tensor([0.0, 0.0, 7.0]), true_classes=2) == 2
    assert collapsed_class(torch.tensor([3.0, 0.0, 4.0]), true_classes=2) is None  # two classes answered
    assert collapsed_class(torch.tensor([0.0, 5.0]), true_classes=1) is None  # a one-class test set
    assert collapsed_class(torch.tensor([1.0, 0.0]), true_classes=2) is None  # one sample says nothing


def test_the_accumulator_counts_predicted_classes_as_the_head_grows():
    from incremental.trainer import ClassificationAccumulator

    acc = ClassificationAccumulator(nn.CrossEntropyLoss())
    acc.update(torch.tensor([[5.0, 0.0], [4.0, 1.0]]), torch.tensor([0, 1]))  # always class 0
    r = acc.result()
    assert (r["predicted_classes"], r["true_classes"], r["collapsed_to"]) == (1, 2, 0)
    acc.update(torch.tensor([[0.0, 0.0, 9.0]]), torch.tensor([2]))  # a grown head answers class 2
    r = acc.result()
    assert (r["predicted_classes"], r["true_classes"], r["collapsed_to"]) == (2, 3, -1)
    assert r["accuracy"] == pytest.approx(2 / 3)
