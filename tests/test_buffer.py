import pytest
import torch

from incremental.buffer import ClassBalancedPolicy, HistoryLibrary, ReservoirPolicy, class_quotas
from incremental.data import TensorSamples


def samples(labels, offset=0):
    y = torch.tensor(labels)
    x = torch.arange(offset, offset + len(labels), dtype=torch.float32)[:, None]
    return TensorSamples(x, y)


def test_class_quotas_hand_computed():
    assert class_quotas(10, 3) == [4, 3, 3]
    assert class_quotas(200, 10) == [20] * 10
    assert sum(class_quotas(7, 4)) == 7


def test_reservoir_keeps_everything_until_full_then_caps():
    lib = HistoryLibrary(5, "reservoir", seed=0)
    lib.update(samples([0, 1, 2]))
    assert len(lib) == 3
    assert lib.samples.x.flatten().tolist() == [0.0, 1.0, 2.0]
    lib.update(samples([3] * 20, offset=3))
    assert len(lib) == 5
    assert isinstance(lib.policy, ReservoirPolicy) and lib.policy.seen == 23


def test_reservoir_inclusion_is_uniform_over_the_stream():
    # 2 experiences of 50 samples into a library of 20: every sample is kept with p = 20/100.
    # Over 400 seeds each experience should hold ~half the library (expected 10 of 20).
    first_share = []
    for seed in range(400):
        lib = HistoryLibrary(20, "reservoir", seed=seed)
        lib.update(samples([0] * 50))
        lib.update(samples([1] * 50, offset=50))
        first_share.append(float((lib.samples.labels == 0).sum()))
    mean = sum(first_share) / len(first_share)
    assert 9.4 < mean < 10.6  # sd of the mean ~ 0.1; a recency-biased policy gives ~0-5


def test_class_balanced_equal_shares():
    lib = HistoryLibrary(10, "class_balanced", seed=0)
    lib.update(samples([0] * 30 + [1] * 30))
    assert sorted(lib.samples.labels.tolist()) == [0] * 5 + [1] * 5
    lib.update(samples([2] * 30 + [3] * 2, offset=60))
    counts = torch.bincount(lib.samples.labels, minlength=4).tolist()
    # quotas for 4 classes of 10: [3, 3, 2, 2]; class 3 only has 2 samples
    assert counts == [3, 3, 2, 2]
    assert isinstance(lib.policy, ClassBalancedPolicy)


def test_zero_capacity_stores_nothing():
    lib = HistoryLibrary(0)
    lib.update(samples([0, 1]))
    assert len(lib) == 0 and lib.sample(4) is None


def test_history_batches_cycle_through_all_samples():
    lib = HistoryLibrary(10, seed=1)
    lib.update(samples(list(range(10))))
    it = lib.batches(4)
    seen = [tuple(next(it)[0].flatten().tolist()) for _ in range(3)]
    assert [len(b) for b in seen] == [4, 4, 2]
    assert sorted(v for b in seen for v in b) == list(map(float, range(10)))


def test_state_dict_round_trip_continues_identically():
    a = HistoryLibrary(8, "reservoir", seed=3)
    a.update(samples(list(range(12))))
    state = a.state_dict()
    b = HistoryLibrary(8, "reservoir", seed=99)
    b.load_state_dict(state)
    a.update(samples(list(range(12, 30)), offset=12))
    b.update(samples(list(range(12, 30)), offset=12))
    assert torch.equal(a.samples.x, b.samples.x)
    assert torch.equal(a.sample(4)[0], b.sample(4)[0])


def test_unknown_policy_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown storage policy 'fifo'"):
        HistoryLibrary(5, "fifo")
