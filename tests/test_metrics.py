import pytest

from incremental.metrics import (average_accuracy, average_incremental_accuracy, backward_transfer,
                                 forgetting, summarize)

# R[i][j]: accuracy on experience j after training experience i.
R = [
    [0.9, 0.1, 0.0],
    [0.6, 0.8, 0.1],
    [0.5, 0.7, 0.9],
]


def test_average_accuracy_is_mean_of_last_row():
    # (0.5 + 0.7 + 0.9) / 3 = 0.7
    assert average_accuracy(R) == pytest.approx(0.7)


def test_average_incremental_accuracy():
    # step 0: 0.9; step 1: (0.6 + 0.8) / 2 = 0.7; step 2: 0.7 -> mean 2.3 / 3
    assert average_incremental_accuracy(R) == pytest.approx(2.3 / 3)


def test_forgetting_uses_best_earlier_accuracy():
    # exp 0: max(0.9, 0.6) - 0.5 = 0.4; exp 1: max(0.8) - 0.7 = 0.1 -> 0.25
    assert forgetting(R) == pytest.approx(0.25)


def test_forgetting_peak_after_learning():
    # exp 0 improves after exp 1 (backward transfer), then drops: best 0.8, final 0.4 -> 0.4
    R2 = [[0.6, 0.0], [0.8, 0.9], [0.4, 0.9]]
    R2 = [row + [0.0] for row in R2]
    # exp 0: max(0.6, 0.8) - 0.4 = 0.4; exp 1: max(0.9) - 0.9 = 0 -> 0.2
    assert forgetting(R2) == pytest.approx(0.2)


def test_backward_transfer():
    # exp 0: 0.5 - 0.9 = -0.4; exp 1: 0.7 - 0.8 = -0.1 -> -0.25
    assert backward_transfer(R) == pytest.approx(-0.25)


def test_single_experience_has_no_forgetting():
    assert forgetting([[0.8]]) == 0.0
    assert backward_transfer([[0.8]]) == 0.0
    assert summarize([[0.8]])["average_accuracy"] == pytest.approx(0.8)


def test_bad_matrix_is_rejected():
    with pytest.raises(ValueError):
        average_accuracy([])
