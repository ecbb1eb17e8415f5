"""Build Avalanche's own benchmark objects from the same digits split, for side-by-side tests."""
from __future__ import annotations

import torch

from incremental.scenarios.digits import load_digits_arrays, stratified_split


def avalanche_split_digits(n_experiences: int, seed: int = 0, test_fraction: float = 0.3):
    from avalanche.benchmarks.scenarios.supervised import class_incremental_benchmark
    from avalanche.benchmarks.utils.classification_dataset import (
        _make_taskaware_tensor_classification_dataset as tensor_dataset,
    )

    x, y = load_digits_arrays()
    train_idx, test_idx = stratified_split(y, test_fraction, seed)
    X, Y = torch.from_numpy(x), torch.from_numpy(y)

    def make(idx):
        return tensor_dataset(X[idx], Y[idx], task_labels=0, targets=Y[idx])

    return class_incremental_benchmark({"train": make(train_idx), "test": make(test_idx)},
                                       class_order=list(range(10)), num_experiences=n_experiences)


def quiet_evaluator():
    from avalanche.training.plugins import EvaluationPlugin

    return EvaluationPlugin(loggers=[])
