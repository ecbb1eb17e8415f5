import warnings

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread_and_quiet():
    """Small models time and behave erratically with many threads on 2 cores; Avalanche warns a lot."""
    torch.set_num_threads(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@pytest.fixture(scope="session")
def digits_tiny():
    """Split Digits, 3 experiences (4-3-3 classes), built once per session."""
    from incremental.scenarios.digits import split_digits

    return split_digits(n_experiences=3, seed=0)
