import numpy as np
import pytest
import torch

from incremental.scenarios.digits import resolve_class_order, split_by_classes, split_digits


def test_experiences_partition_the_classes_and_samples():
    bench = split_digits(n_experiences=5, seed=0)
    classes = [c for e in bench.train_stream for c in e.classes_in_this_experience]
    assert sorted(classes) == list(range(10))
    n_train = sum(len(e.dataset) for e in bench.train_stream)
    n_test = sum(len(e.dataset) for e in bench.test_stream)
    assert n_train + n_test == 1797
    assert abs(n_test / 1797 - 0.3) < 0.01
    for tr, te in zip(bench.train_stream, bench.test_stream):
        assert set(tr.dataset.labels.tolist()) == set(tr.classes_in_this_experience)
        assert set(te.dataset.labels.tolist()) == set(tr.classes_in_this_experience)


def test_split_is_stratified():
    bench = split_digits(n_experiences=1, seed=0)
    ytr = bench.train_stream[0].dataset.labels.numpy()
    yte = bench.test_stream[0].dataset.labels.numpy()
    share = np.bincount(yte, minlength=10) / (np.bincount(ytr, minlength=10) + np.bincount(yte, minlength=10))
    assert np.all(np.abs(share - 0.3) < 0.02)


def test_class_order_and_seeded_shuffle():
    bench = split_digits(n_experiences=2, class_order=[9, 8, 7, 6, 5, 4, 3, 2, 1, 0])
    assert bench.train_stream[0].classes_in_this_experience == [5, 6, 7, 8, 9]
    a = resolve_class_order(range(10), None, True, seed=1)
    assert a == resolve_class_order(range(10), None, True, seed=1) and a != list(range(10))
    with pytest.raises(ValueError, match="not a permutation"):
        resolve_class_order(range(4), [3, 1, 2, 2], False, 0)


def test_uneven_split_and_impossible_counts():
    assert split_by_classes(10, 3) == [4, 3, 3]
    with pytest.raises(ValueError, match="n_experiences"):
        split_by_classes(10, 11)


def test_same_seed_same_data():
    a, b = split_digits(5, seed=4), split_digits(5, seed=4)
    assert torch.equal(a.train_stream[2].dataset.x, b.train_stream[2].dataset.x)
