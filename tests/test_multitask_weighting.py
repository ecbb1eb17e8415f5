"""Weighting formulas and the loss mask (METHODS section 1) against numbers computed by hand."""
from __future__ import annotations

import math

import pytest
import torch

from incremental.multitask.weighting import (
    dynamic_weights,
    ema_speed,
    fixed_weight_vector,
    gradnorm_loss,
    gradnorm_targets,
    inverse_loss_weights,
    marker_mask,
    masked_task_mean,
    ratio_weights,
    renormalize,
    softmax_weights,
    training_speed,
    uncertainty_loss,
    uncertainty_weights,
    weighted_sum,
)
from strategies.dynamic_loss_weighting import PeriodSchedule

T = torch.tensor


def close(a: torch.Tensor, b: list[float], tol: float = 1e-5) -> bool:
    return torch.allclose(a.double(), torch.tensor(b, dtype=torch.float64), atol=tol, rtol=0)


# ------------------------------------------------------------------ formula 10: the loss mask
def test_methods_mask_example():
    # METHODS: labels (-1,-1,-1,2,1,66,3,-1,-1) give mask (0,0,0,1,1,1,1,0,0)
    mask = marker_mask(T([-1, -1, -1, 2, 1, 66, 3, -1, -1]))
    assert mask.tolist() == [[0, 0, 0, 1, 1, 1, 1, 0, 0]]


def test_mask_per_task_markers_and_nan():
    # task 0 marker -1 (its -1 is missing), task 1 marker -999 (its -1 is a real value), task 2 marker nan
    labels = T([[-1.0, -1.0, float("nan")], [3.0, -999.0, 0.5]])
    assert marker_mask(labels, [-1.0, -999.0, float("nan")]).tolist() == [[0, 1, 0], [1, 0, 1]]
    with pytest.raises(ValueError, match="2 markers for 3 tasks"):
        marker_mask(labels, [-1.0, -1.0])


def test_masked_mean_skips_unlabelled_and_never_nans():
    # labelled losses 1, 2, 4 -> 7/3; the nan of the unlabelled sample must not leak in
    per = T([1.0, 2.0, float("nan"), 4.0], requires_grad=True)
    mean = masked_task_mean(per, T([True, True, False, True]))
    assert mean.item() == pytest.approx(7 / 3)
    mean.backward()
    assert torch.isfinite(per.grad).all() and per.grad[2] == 0
    # a batch with no label for the task adds exactly 0
    assert masked_task_mean(T([5.0, float("inf")]), T([False, False])).item() == 0.0


def test_weighted_sum_drops_absent_tasks():
    # 2*1 + 0.5*4 + (task 3 absent) = 4
    assert weighted_sum(T([1.0, 4.0, float("nan")]), T([2.0, 0.5, 1.0]), T([True, True, False])).item() == 4.0


# ------------------------------------------------------------------ formulas 3-8
def test_training_speed():
    # r = L(t-1)/L(t-2) = (2/4, 3/3, 1/0.5); a task with no measurement (nan) or a 0 denominator gets 1
    assert close(training_speed(T([2.0, 3.0, 1.0]), T([4.0, 3.0, 0.5])), [0.5, 1.0, 2.0])
    assert close(training_speed(T([float("nan"), 1.0, 1.0]), T([1.0, 0.0, float("nan")])), [1.0, 1.0, 1.0])


def test_ratio_weights_formula_4():
    # K=3, r=(0.5,1,2), sum 3.5 -> 3*(0.5,1,2)/3.5 = (0.428571, 0.857143, 1.714286)
    assert close(ratio_weights(T([0.5, 1.0, 2.0])), [0.428571, 0.857143, 1.714286])


def test_softmax_weights_formulas_7_8():
    # T=1: exp(0.5)=1.648721, exp(1)=2.718282, exp(2)=7.389056, sum 11.756059 -> 3*e/sum
    assert close(softmax_weights(T([0.5, 1.0, 2.0]), 1.0), [0.420733, 0.693672, 1.885595])
    # T=2 (DWA): exp(.25)=1.284025, exp(.5)=1.648721, exp(1)=2.718282, sum 5.651028
    assert close(softmax_weights(T([0.5, 1.0, 2.0]), 2.0), [0.681659, 0.875268, 1.443073])
    # large speeds must not overflow
    assert torch.isfinite(softmax_weights(T([1000.0, 0.0]), 1.0)).all()
    with pytest.raises(ValueError, match="temperature"):
        softmax_weights(T([1.0]), 0.0)


def test_ema_speed_formula_5():
    # v = 0.9*(1,1,1) + 0.1*(0.5,1,2) = (0.95, 1.0, 1.1); with no previous v it starts at r
    assert close(ema_speed(T([1.0, 1.0, 1.0]), T([0.5, 1.0, 2.0]), 0.9), [0.95, 1.0, 1.1])
    assert close(ema_speed(None, T([0.5, 2.0]), 0.9), [0.5, 2.0])
    with pytest.raises(ValueError, match="beta"):
        ema_speed(None, T([1.0]), 1.0)


def test_dynamic_weights_by_method():
    lp, lp2 = T([2.0, 3.0, 1.0]), T([4.0, 3.0, 0.5])  # r = (0.5, 1, 2)
    assert close(dynamic_weights("dwa_ratio", lp, lp2)[0], [0.428571, 0.857143, 1.714286])
    assert close(dynamic_weights("dwa", lp, lp2)[0], [0.681659, 0.875268, 1.443073])  # T = 2
    # dwa_ema with v_prev=(1,1,1): v=(0.95,1.0,1.1), sum 3.05 -> 3v/3.05 = (0.934426, 0.983607, 1.081967)
    w, v = dynamic_weights("dwa_ema", lp, lp2, T([1.0, 1.0, 1.0]))
    assert close(v, [0.95, 1.0, 1.1]) and close(w, [0.934426, 0.983607, 1.081967])
    with pytest.raises(ValueError, match="not a period-based"):
        dynamic_weights("gradnorm", lp, lp2)


def test_worked_example_three_periods_k3():
    """dwa_ema_exp (3, 5, 8), beta 0.9, T 1, K 3.

    L(1) = (10, 1, 0.5), L(2) = (5, 0.9, 0.5), L(3) = (4, 0.45, 0.5)
    periods 1, 2: fixed weights (1, 1, 1)
    end of 2: r(2) = (5/10, 0.9/1, 0.5/0.5) = (0.5, 0.9, 1.0); v(2) = r(2) (first speed)
              w(3) = 3 exp(v)/sum: exp = (1.648721, 2.459603, 2.718282), sum 6.826606
                   = (0.724542, 1.080890, 1.194568)
    end of 3: r(3) = (4/5, 0.45/0.9, 0.5/0.5) = (0.8, 0.5, 1.0)
              v(3) = 0.9 v(2) + 0.1 r(3) = (0.45+0.08, 0.81+0.05, 0.9+0.1) = (0.53, 0.86, 1.0)
              w(4) = 3 exp(v)/sum: exp = (1.698932, 2.363161, 2.718282), sum 6.780375
                   = (0.751698, 1.045588, 1.202713)
    """
    schedule = PeriodSchedule("dwa_ema_exp", torch.ones(3), beta=0.9)
    assert schedule.period == 1 and close(schedule.weights, [1, 1, 1])
    assert close(schedule.close(T([10.0, 1.0, 0.5])), [1, 1, 1])  # weights of period 2: still fixed
    w3 = schedule.close(T([5.0, 0.9, 0.5]))
    assert close(w3, [0.724542, 1.080890, 1.194568])
    assert close(schedule.ema, [0.5, 0.9, 1.0])
    w4 = schedule.close(T([4.0, 0.45, 0.5]))
    assert close(schedule.ema, [0.53, 0.86, 1.0])
    assert close(w4, [0.751698, 1.045588, 1.202713])
    assert schedule.period == 4


def test_fixed_and_equal_schedules_never_move():
    fixed = PeriodSchedule("fixed", T([2.0, 0.5]))
    equal = PeriodSchedule("equal", T([2.0, 0.5]))
    for losses in ([4.0, 1.0], [1.0, 1.0], [0.1, 2.0]):
        assert close(fixed.close(T(losses)), [2.0, 0.5])
        assert close(equal.close(T(losses)), [1.0, 1.0])


def test_fixed_weight_vector():
    assert close(fixed_weight_vector(["a", "b", "c"], {"b": 3.0}), [1.0, 3.0, 1.0])
    assert close(fixed_weight_vector(["a", "b"], [0.5, 2.0]), [0.5, 2.0])
    with pytest.raises(ValueError, match="unknown tasks"):
        fixed_weight_vector(["a"], {"z": 1.0})


# ------------------------------------------------------------------ uncertainty weighting
def test_uncertainty_loss_kendall():
    # regression task: L=2, s=0 -> 0.5*exp(0)*2 + 0/2 = 1.0
    # classification task: L=0.5, s=ln 2 -> 1*exp(-ln 2)*0.5 + ln(2)/2 = 0.25 + 0.346574
    # total 1.596574
    log_vars = T([0.0, math.log(2.0)])
    is_reg = T([True, False])
    assert uncertainty_loss(T([2.0, 0.5]), log_vars, is_reg).item() == pytest.approx(1.596574, abs=1e-6)
    # effective weights: 0.5*exp(0) = 0.5, 1*exp(-ln 2) = 0.5
    assert close(uncertainty_weights(log_vars, is_reg), [0.5, 0.5])
    # an absent task contributes nothing, not even its s/2
    assert uncertainty_loss(T([2.0, 0.5]), log_vars, is_reg, T([True, False])).item() == pytest.approx(1.0)


def test_uncertainty_optimum_is_one_over_two_l():
    # d/ds [0.5 e^{-s} L + s/2] = 0  ->  e^{s} = L: for L=8 the optimum is s = ln 8, weight 0.5/8
    s = torch.tensor([0.0], requires_grad=True)
    opt = torch.optim.Adam([s], lr=0.05)
    for _ in range(600):
        opt.zero_grad()
        uncertainty_loss(T([8.0]), s, T([True])).backward()
        opt.step()
    assert s.item() == pytest.approx(math.log(8.0), abs=0.02)


# ------------------------------------------------------------------ GradNorm
def test_gradnorm_targets_and_loss():
    # G=(1,3), L=(1,2), L0=(2,2): ratios (0.5,1), mean 0.75 -> r=(2/3, 4/3); mean G = 2
    # targets = 2 * r^1.5 = (1.088662, 3.079201); L_grad = |1-1.088662| + |3-3.079201| = 0.167863
    G = T([1.0, 3.0])
    targets = gradnorm_targets(G, T([1.0, 2.0]), T([2.0, 2.0]), alpha=1.5)
    assert close(targets, [1.088662, 3.079201])
    assert gradnorm_loss(G, targets).item() == pytest.approx(0.167863, abs=1e-6)
    # alpha 0: every target is the mean norm
    assert close(gradnorm_targets(G, T([1.0, 2.0]), T([2.0, 2.0]), alpha=0.0), [2.0, 2.0])


def test_gradnorm_loss_moves_weights_towards_targets():
    # G_i = w_i * g_i with g=(1,3): dL/dw = sign(G - target) * g = (-1, -3): both weights go up, w0's
    # target is above its norm; the gradient flows to the weights only
    w = torch.ones(2, requires_grad=True)
    G = w * T([1.0, 3.0])
    loss = gradnorm_loss(G, gradnorm_targets(G, T([1.0, 2.0]), T([2.0, 2.0])))
    (grad,) = torch.autograd.grad(loss, w)
    assert grad.tolist() == [-1.0, -3.0]


def test_renormalize():
    # (1, 3) -> sum 2: (0.5, 1.5); a negative weight is floored first
    assert close(renormalize(T([1.0, 3.0])), [0.5, 1.5])
    out = renormalize(T([-1.0, 1.0]), floor=1e-3)
    assert (out > 0).all() and out.sum().item() == pytest.approx(2.0)


# ------------------------------------------------------------------ fixed weights from label scales
def test_inverse_loss_weights():
    # scales (1, 4): 1/s = (1, 0.25), sum 1.25 -> 2 * (0.8, 0.2) = (1.6, 0.4)
    assert close(inverse_loss_weights(T([1.0, 4.0])), [1.6, 0.4])
    with pytest.raises(ValueError, match="> 0"):
        inverse_loss_weights(T([1.0, 0.0]))


def test_constant_predictor_loss():
    from incremental.multitask.tasks import TaskSpec, constant_predictor_loss

    # labels 2, 4, 6 (and a marker): mean 4; MSE (4 + 0 + 4)/3 = 8/3; L1 (2 + 0 + 2)/3 = 4/3
    y = T([2.0, 4.0, 6.0, -1.0])
    assert constant_predictor_loss(TaskSpec("a", "regression"), y) == pytest.approx(8 / 3)
    assert constant_predictor_loss(TaskSpec("a", "regression", loss="l1"), y) == pytest.approx(4 / 3)
    # binary, p = 1/4: -(0.25 ln 0.25 + 0.75 ln 0.75) = 0.346574 + 0.215762 = 0.562335
    assert constant_predictor_loss(TaskSpec("b", "binary"), T([1.0, 0.0, 0.0, 0.0])) == pytest.approx(0.562335, abs=1e-6)
    # multi-class frequencies (0.5, 0.5, 0): entropy ln 2
    assert constant_predictor_loss(TaskSpec("c", "multiclass", dim=3), T([0, 1, 0, 1])) == pytest.approx(math.log(2))


# ------------------------------------------------------------------ scale-invariant variants
def test_split_method_names():
    from incremental.multitask.weighting import split_method

    assert split_method("dwa_ema_exp_log") == ("dwa_ema_exp", "log")
    assert split_method("dwa_ema_exp_init") == ("dwa_ema_exp", "initial")
    assert split_method("equal_log") == ("equal", "log")
    assert split_method("dwa_ema_exp") == ("dwa_ema_exp", "none")  # the METHODS formula, unchanged
    with pytest.raises(ValueError, match="unknown weighting method"):
        split_method("dwa_log")


def test_scale_normalised_and_period_scales():
    from incremental.multitask.weighting import period_scales, scale_normalised

    # (4, 0.5, 3) / (2, 0.25, [not measured -> 1]) = (2, 2, 3)
    assert close(scale_normalised(T([4.0, 0.5, 3.0]), T([2.0, 0.25, float("nan")])), [2.0, 2.0, 3.0])
    # previous period's means where measured, else the initial loss
    assert close(period_scales(T([2.0, 4.0]), T([1.0, float("nan")])), [1.0, 4.0])
    assert close(period_scales(T([2.0, 4.0]), None), [2.0, 4.0])


def test_log_losses_and_transform():
    from incremental.multitask.weighting import log_losses, transform_losses

    # log(1) = 0, log(e) = 1, log(e^2) = 2 (eps 1e-8 moves them by < 1e-8)
    assert close(log_losses(T([1.0, math.e, math.e**2])), [0.0, 1.0, 2.0])
    assert torch.isfinite(log_losses(T([0.0]))).all()  # log(eps), not -inf
    # the gradient of log L is 1 / L: a loss of 200 and one of 0.02 push equally per relative change
    x = T([200.0, 0.02], requires_grad=True)
    log_losses(x).sum().backward()
    assert close(x.grad, [1 / 200.0, 1 / 0.02], tol=1e-3)
    assert close(transform_losses(T([2.0, 3.0]), "none"), [2.0, 3.0])
    assert close(transform_losses(T([2.0, 3.0]), "initial", T([4.0, 3.0])), [0.5, 1.0])
    with pytest.raises(ValueError, match="needs the task scales"):
        transform_losses(T([2.0]), "previous_period")
    with pytest.raises(ValueError, match="eps"):
        log_losses(T([1.0]), 0.0)
