"""What gradient mixing's history library keeps and remembers: the model-aware storage policies
(incremental/selection.py), the DER logits beside the library (strategies/logit_memory.py) and the seed of
the plugin's own library."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from incremental.buffer import HistoryLibrary, make_policy
from incremental.data import TensorSamples
from incremental.models import MLP
from incremental.scenarios.digits import split_digits
from incremental.selection import HerdingPolicy, LossStratifiedPolicy, herding_order, pool_features
from incremental.trainer import Trainer
from strategies.gradient_mixing import GradientMixingPlugin
from strategies.logit_memory import LogitMemory


class _Strategy:
    def __init__(self, model: nn.Module) -> None:
        self.model, self.device, self._criterion = model, torch.device("cpu"), nn.CrossEntropyLoss()


@pytest.fixture(scope="module")
def digits():
    return split_digits(5, seed=0)


@pytest.mark.parametrize("name", ["herding", "loss_stratified"])
def test_model_aware_policies_are_class_balanced_and_ignore_the_draw(digits, name: str) -> None:
    torch.manual_seed(0)
    strategy = _Strategy(MLP(64, 16, 10))
    libraries = [HistoryLibrary(30, make_policy(name), seed=seed) for seed in (0, 1)]
    for library in libraries:
        for exp in digits.train_stream[:2]:
            library.update(exp.dataset, strategy=strategy)
    labels = libraries[0].samples.labels
    assert torch.bincount(labels).tolist() == [8, 8, 7, 7]  # 30 split over 4 classes, remainder first
    # no random draw: another library seed keeps the same samples
    assert torch.equal(libraries[0].samples.x, libraries[1].samples.x)


def test_herding_keeps_its_order_and_a_shrinking_class_keeps_its_prefix(digits) -> None:
    torch.manual_seed(0)
    strategy = _Strategy(MLP(64, 16, 10))
    library = HistoryLibrary(40, HerdingPolicy(), seed=0)
    first = digits.train_stream[0].dataset
    library.update(first, strategy=strategy)
    # class 0 got 20 slots, in herding order on the model's features
    idx0 = torch.nonzero(first.labels == 0).flatten()
    from incremental.buffer import Pool

    pool = Pool(HistoryLibrary(40, "reservoir"), first)
    expected = idx0[herding_order(pool_features(strategy, pool, idx0), 20)]
    assert torch.equal(library.samples.x[:20], first.x[expected])
    # the next experience halves class 0's share: it keeps the first 10 of that order
    library.update(digits.train_stream[1].dataset, strategy=strategy)
    assert torch.equal(library.samples.x[:10], first.x[expected[:10]])


def test_loss_stratified_spreads_over_the_loss_ranking(digits) -> None:
    torch.manual_seed(0)
    model = MLP(64, 16, 10)
    strategy = _Strategy(model)
    data = digits.train_stream[0].dataset
    library = HistoryLibrary(4, LossStratifiedPolicy(), seed=0)
    library.update(data, strategy=strategy)
    with torch.no_grad():
        losses = nn.functional.cross_entropy(model(data.x), data.y, reduction="none")
    kept = nn.functional.cross_entropy(model(library.samples.x), library.samples.y, reduction="none").detach()
    for c in (0, 1):  # 2 per class, one from the easier half of the class and one from the harder half
        median = losses[data.y == c].median()
        pair = kept[library.samples.y == c]
        assert len(pair) == 2 and float(pair.min()) <= float(median) <= float(pair.max())


def test_model_aware_policies_need_the_strategy(digits) -> None:
    with pytest.raises(ValueError, match="herding.*strategy"):
        HistoryLibrary(10, "herding").update(digits.train_stream[0].dataset)


# ---------------------------------------------------------------- DER logits beside the library

def test_logit_memory_follows_the_library_slots(digits) -> None:
    torch.manual_seed(0)
    model = MLP(64, 16, 10)
    library = HistoryLibrary(30, "reservoir", seed=0)
    memory = LogitMemory()
    library.update(digits.train_stream[0].dataset)
    memory.refresh(library, model, "cpu")
    with torch.no_grad():
        assert torch.allclose(memory.table, model(library.samples.x))  # stored by the model of that time
    before = {tuple(x.tolist()): row.clone() for x, row in zip(library.samples.x, memory.table)}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5)  # the model moves on
    library.update(digits.train_stream[1].dataset)
    memory.refresh(library, model, "cpu")
    with torch.no_grad():
        now = model(library.samples.x)
    stayed = 0
    for x, row, fresh in zip(library.samples.x, memory.table, now):
        key = tuple(x.tolist())
        if key in before:  # a sample that stayed keeps the logits it was stored with
            assert torch.equal(row, before[key])
            stayed += 1
        else:  # a sample that came in gets the current model's
            assert torch.allclose(row, fresh)
    assert 0 < stayed < 30
    # a minibatch's targets are the rows of the slots it came from
    batch = next(library.batches(8))
    assert torch.equal(memory.targets(library.last_indices, "cpu"), memory.table[library.last_indices])
    assert torch.equal(batch[0], library.samples.x[library.last_indices])


def test_logit_memory_follows_an_update_that_keeps_only_old_samples(digits) -> None:
    # herding on a network whose features are all equal (here: dead, all weights zero) keeps the samples
    # it held; the table must keep their rows (this raised a shape error at the end of a collapsed
    # transfer adaptation instead of reaching the collapse guard)
    torch.manual_seed(0)
    model = MLP(64, 16, 10)
    library = HistoryLibrary(30, HerdingPolicy(), seed=0)
    memory = LogitMemory()
    library.update(digits.train_stream[0].dataset, strategy=_Strategy(model))
    memory.refresh(library, model, "cpu")
    before = memory.table.clone()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    library.update(digits.train_stream[0].dataset, strategy=_Strategy(model))
    keep, n_before = library.last_update
    assert n_before == 30 and bool((keep < n_before).all())  # nothing new came in
    memory.refresh(library, model, "cpu")
    assert torch.equal(memory.table, before[keep])


def test_logit_memory_is_rebuilt_after_a_resume(digits) -> None:
    torch.manual_seed(0)
    model = MLP(64, 16, 10)
    library = HistoryLibrary(20, "reservoir", seed=0)
    library.update(digits.train_stream[0].dataset)
    restored = HistoryLibrary(20, "reservoir", seed=0)
    restored.load_state_dict(library.state_dict())  # a checkpoint holds the library, not the logits
    memory = LogitMemory()
    memory.ensure(restored, model, "cpu")
    with torch.no_grad():
        assert torch.allclose(memory.table, model(restored.samples.x))


# ---------------------------------------------------------------- the plugin's own library

def test_own_library_takes_the_seed_given_or_the_loops_or_the_torch_generators() -> None:
    assert GradientMixingPlugin(seed=7)._library_seed(None) == 7

    class Loop:
        seed = 3

    assert GradientMixingPlugin()._library_seed(Loop()) == 3
    avalanche_like = object()  # no seed attribute: a draw from the generator the experiment seeded
    torch.manual_seed(11)
    a = GradientMixingPlugin()._library_seed(avalanche_like)
    torch.manual_seed(11)
    b = GradientMixingPlugin()._library_seed(avalanche_like)
    torch.manual_seed(12)
    c = GradientMixingPlugin()._library_seed(avalanche_like)
    assert a == b != c


def test_own_library_draw_follows_the_run_seed(digits) -> None:
    def kept(seed: int) -> torch.Tensor:
        torch.manual_seed(0)
        model = MLP(64, 16, 10)
        plugin = GradientMixingPlugin(mem_size=20, storage_policy="reservoir")
        trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.05), nn.CrossEntropyLoss(),
                          train_mb_size=16, plugins=[plugin], seed=seed)  # no loop library: the plugin keeps one
        trainer.train(digits.train_stream[0])
        return plugin.library.samples.x

    assert torch.equal(kept(1), kept(1))
    assert not torch.equal(kept(1), kept(2))


def test_der_rule_trains_with_its_own_library_too(digits) -> None:
    torch.manual_seed(0)
    model = MLP(64, 16, 10)
    plugin = GradientMixingPlugin("similarity_der", mem_size=20, storage_policy="herding")
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.05), nn.CrossEntropyLoss(),
                      train_mb_size=16, plugins=[plugin], seed=0)
    trainer.train(digits.train_stream[:2])
    assert plugin.logits is not None and plugin.logits.table.shape == (20, 10)
    assert plugin.stats[1] and all(r["loss_h"] > 0 for r in plugin.stats[1])


def test_tensor_samples_rows_match_what_the_policy_read(digits) -> None:
    # the library stores exactly the samples the policy chose (no transform on in-memory samples)
    torch.manual_seed(0)
    data = TensorSamples(torch.randn(12, 64), torch.tensor([0, 1] * 6))
    library = HistoryLibrary(4, "herding")
    library.update(data, strategy=_Strategy(MLP(64, 8, 10)))
    rows = {tuple(r.tolist()) for r in data.x}
    assert all(tuple(r.tolist()) in rows for r in library.samples.x)
