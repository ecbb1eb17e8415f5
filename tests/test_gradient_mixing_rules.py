"""The mixing rules and the gradient-diversity formulas against numbers computed by hand.

Every expected value is worked out in the comment above it; the code under test is
strategies/mixing_rules.py, incremental/flat_gradients.py and incremental/selection.py (pure functions
only, no model, no loop).
"""
from __future__ import annotations

import math

import pytest
import torch

from incremental.flat_gradients import GradientBuffers, assign_flat_grad, batched_gradients_into, flatten_grads
from incremental.selection import herding_order, stratified_ranks
from strategies.mixing_rules import (
    LogitAdjustedCrossEntropy, class_log_prior, logit_adjusted_cross_entropy,
    HISTORY_LOSSES,
    RULES,
    TRANSFER_LOSSES,
    WEIGHTS,
    asymmetric_cross_entropy,
    logit_replay_loss,
    Geometry,
    gradient_geometry,
    mix,
    mix_agem,
    mix_mega,
    mix_pcgrad,
    mix_similarity,
    mix_sum,
    weights_agem,
    weights_similarity,
    with_history_weight,
)

T = lambda *v: torch.tensor(v, dtype=torch.float64)  # noqa: E731


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.allclose(a, b, atol=1e-12, rtol=0)


# ---------------------------------------------------------------- geometry

def test_geometry_2d_conflict() -> None:
    # g_h = (1, 0), g_t = (-1, 1): dot = -1, |g_h|^2 = 1, |g_t|^2 = 2, s = -1 / (1 * sqrt 2) = -0.7071...
    geo = gradient_geometry(T(1, 0), T(-1, 1))
    assert (geo.dot, geo.sq_h, geo.sq_t) == (-1.0, 1.0, 2.0)
    assert geo.similarity == pytest.approx(-1 / math.sqrt(2), abs=1e-15)


def test_geometry_zero_gradient_has_similarity_zero_not_nan() -> None:
    # |g_h| = 0: s would be 0/0; defined as 0 (no direction, no conflict).
    assert gradient_geometry(T(0, 0, 0), T(1, 2, 3)).similarity == 0.0
    assert gradient_geometry(T(0, 0), T(0, 0)).similarity == 0.0


def test_geometry_identical_and_opposite_are_clamped_to_plus_minus_one() -> None:
    # (1/3, 1/7, 1/9) with itself: s = 1 exactly even if rounding gives 1 + 1e-16.
    g = torch.tensor([1 / 3, 1 / 7, 1 / 9], dtype=torch.float32)
    assert gradient_geometry(g, g).similarity == 1.0
    assert gradient_geometry(g, -g).similarity == -1.0


def test_geometry_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="flat vectors"):
        gradient_geometry(T(1, 2), T(1, 2, 3))


# ---------------------------------------------------------------- 2-D conflicting case, every rule
# g_h = (1, 0), g_t = (-1, 1); dot = -1, |g_h| = 1, |g_t| = sqrt 2, s = -1/sqrt 2.
G_H, G_T = T(1, 0), T(-1, 1)


def test_sum_2d() -> None:
    # w_h = w_t = 1: g = (1, 0) + (-1, 1) = (0, 1)
    m = mix_sum(G_H, G_T)
    assert (m.w_h, m.w_t) == (1.0, 1.0)
    assert close(m.grad, T(0, 1))


def test_similarity_2d() -> None:
    # w_h = 1 + max(0, -s)|g_t|/|g_h| = 1 + (1/sqrt 2)(sqrt 2)/1 = 2, w_t = 1
    # g = 2 (1, 0) + (-1, 1) = (1, 1); g . g_h = 1 = |g_h|^2 > 0 (history loss does not rise)
    m = mix_similarity(G_H, G_T)
    assert m.w_h == pytest.approx(2.0, abs=1e-15) and m.w_t == 1.0
    assert close(m.grad, T(1, 1))
    assert float(m.grad @ G_H) == pytest.approx(1.0)


def test_history_weight_scales_the_history_gradient_2d() -> None:
    # lam = 3 on the similarity rule: the rule sees 3 g_h = (3, 0) and g_t = (-1, 1): dot -3, |3 g_h|^2 9,
    # its weight 1 + 3/9 = 4/3 on 3 g_h, i.e. 4 on g_h = lam + max(0, -dot)/|g_h|^2 = 3 + 1; w_t stays 1
    geo = Geometry(dot=-1.0, sq_h=1.0, sq_t=2.0)
    w_h, w_t = with_history_weight(weights_similarity, 3.0)(geo)
    assert w_h == pytest.approx(4.0, abs=1e-15) and w_t == 1.0
    g = w_h * G_H + w_t * G_T  # (3, 1): g . g_h = 3 = lam |g_h|^2
    assert float(g @ G_H) == pytest.approx(3.0)
    # no conflict: w_h = lam exactly (the plain sum with the history counted lam times)
    assert with_history_weight(weights_similarity, 0.5)(Geometry(dot=2.0, sq_h=1.0, sq_t=4.0)) == (0.5, 1.0)
    # A-GEM's projection does not depend on the history gradient's length: unchanged by lam
    assert with_history_weight(weights_agem, 7.0)(geo) == pytest.approx(weights_agem(geo))
    # lam = 1 is the rule itself; lam <= 0 or not finite is refused
    assert with_history_weight(weights_similarity, 1.0) is weights_similarity
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="history_weight"):
            with_history_weight(weights_similarity, bad)


def test_agem_2d() -> None:
    # w_h = max(0, -dot)/|g_h|^2 = 1, w_t = 1: g = (1, 0) + (-1, 1) = (0, 1), g . g_h = 0 (projected)
    m = mix_agem(G_H, G_T)
    assert (m.w_h, m.w_t) == (1.0, 1.0)
    assert close(m.grad, T(0, 1))
    assert float(m.grad @ G_H) == 0.0


def test_pcgrad_2d() -> None:
    # w_h = 1 + 1/|g_h|^2 = 2, w_t = 1 + 1/|g_t|^2 = 1.5
    # g = 2 (1, 0) + 1.5 (-1, 1) = (0.5, 1.5); g . g_h = 0.5 > 0 and g . g_t = -0.5 + 1.5 = 1 > 0
    m = mix_pcgrad(G_H, G_T)
    assert (m.w_h, m.w_t) == (2.0, 1.5)
    assert close(m.grad, T(0.5, 1.5))


def test_mega_2d() -> None:
    # loss_h = 2, loss_t = 0.5: w_h = 2 / 0.5 = 4, w_t = 1; g = (4, 0) + (-1, 1) = (3, 1)
    m = mix_mega(G_H, G_T, torch.tensor(2.0), torch.tensor(0.5))
    assert (m.w_h, m.w_t) == (4.0, 1.0)
    assert close(m.grad, T(3, 1))


def test_mega_with_learned_transfer_batch_steps_on_history_alone() -> None:
    # loss_t = 1e-4 <= eps = 1e-3: MEGA-I uses w_t = 0, w_h = 1: g = g_h = (1, 0)
    m = mix_mega(G_H, G_T, 2.0, 1e-4)
    assert (m.w_h, m.w_t) == (1.0, 0.0)
    assert close(m.grad, T(1, 0))


def test_mega_needs_losses() -> None:
    with pytest.raises(ValueError, match="mega"):
        mix_mega(G_H, G_T)


# ---------------------------------------------------------------- 3-D conflicting case
# g_h = (1, 2, 2): |g_h| = 3; g_t = (0, 0, -3): |g_t| = 3; dot = -6; s = -6/9 = -2/3
G3_H, G3_T = T(1, 2, 2), T(0, 0, -3)


def test_similarity_3d() -> None:
    # w_h = 1 + (2/3)(3/3) = 5/3 -> g = (5/3, 10/3, 10/3) + (0, 0, -3) = (5/3, 10/3, 1/3)
    # g . g_h = 5/3 + 20/3 + 2/3 = 9 = |g_h|^2
    m = mix_similarity(G3_H, G3_T)
    assert m.w_h == pytest.approx(5 / 3, abs=1e-15)
    assert m.similarity == pytest.approx(-2 / 3, abs=1e-15)
    assert close(m.grad, T(5 / 3, 10 / 3, 1 / 3))
    assert float(m.grad @ G3_H) == pytest.approx(9.0)


def test_agem_3d() -> None:
    # w_h = 6/9 = 2/3 -> g = (2/3, 4/3, 4/3) + (0, 0, -3) = (2/3, 4/3, -5/3); g . g_h = 2/3 + 8/3 - 10/3 = 0
    m = mix_agem(G3_H, G3_T)
    assert close(m.grad, T(2 / 3, 4 / 3, -5 / 3))
    assert float(m.grad @ G3_H) == pytest.approx(0.0, abs=1e-12)


def test_pcgrad_3d() -> None:
    # w_h = 1 + 6/9 = 5/3, w_t = 1 + 6/9 = 5/3 -> g = (5/3, 10/3, 10/3) + (0, 0, -5) = (5/3, 10/3, -5/3)
    m = mix_pcgrad(G3_H, G3_T)
    assert m.w_h == pytest.approx(5 / 3) and m.w_t == pytest.approx(5 / 3)
    assert close(m.grad, T(5 / 3, 10 / 3, -5 / 3))


def test_agreeing_gradients_3d() -> None:
    # g_h = (1, 2, 2), g_t = (2, 0, 1): dot = 4 > 0, no conflict.
    # sum, similarity, pcgrad: g = (3, 2, 3); agem: w_h = 0 -> g = g_t = (2, 0, 1)
    g_h, g_t = T(1, 2, 2), T(2, 0, 1)
    for rule in (mix_sum, mix_similarity, mix_pcgrad):
        assert close(rule(g_h, g_t).grad, T(3, 2, 3)), rule.__name__
    assert close(mix_agem(g_h, g_t).grad, T(2, 0, 1))


# ---------------------------------------------------------------- identical, opposite, zero

def test_identical_gradients() -> None:
    # g_h = g_t = (1, 1): s = 1, every rule but agem sums: (2, 2); agem: (1, 1)
    g = T(1, 1)
    for name in ("sum", "similarity", "pcgrad"):
        assert close(mix(name, g, g).grad, T(2, 2)), name
    assert close(mix("agem", g, g).grad, T(1, 1))


def test_opposite_gradients() -> None:
    # g_h = (1, 1), g_t = (-1, -1): dot = -2, |g_h|^2 = |g_t|^2 = 2, s = -1
    # sum: (0, 0); similarity: w_h = 1 + 2/2 = 2 -> (2, 2) - (1, 1) = (1, 1)
    # agem: w_h = 1 -> (0, 0); pcgrad: w_h = w_t = 2 -> (0, 0)
    g_h, g_t = T(1, 1), T(-1, -1)
    assert close(mix_sum(g_h, g_t).grad, T(0, 0))
    assert close(mix_similarity(g_h, g_t).grad, T(1, 1))
    assert close(mix_agem(g_h, g_t).grad, T(0, 0))
    assert close(mix_pcgrad(g_h, g_t).grad, T(0, 0))


@pytest.mark.parametrize("name", sorted(WEIGHTS))
def test_zero_gradients_give_finite_results(name: str) -> None:
    # g_h = 0: every rule must return finite weights and g in span(g_t) (no 0/0 anywhere).
    zero, g_t = T(0, 0, 0), T(1, -2, 3)
    for g_h, g_tt in ((zero, g_t), (g_t, zero), (zero, zero)):
        m = mix(name, g_h, g_tt, 1.0, 0.5)
        assert math.isfinite(m.w_h) and math.isfinite(m.w_t)
        assert torch.isfinite(m.grad).all()
    # similarity with g_h = 0: w_h = 1 + 0 = 1, g = g_t exactly
    if name == "similarity":
        assert close(mix(name, zero, g_t).grad, g_t)


def test_similarity_weights_only_need_the_geometry() -> None:
    # Geometry(dot=-3, |g_h|^2=2, |g_t|^2=8): w_h = 1 + 3/2 = 2.5 (same as 1 + max(0,-s)|g_t|/|g_h|:
    # s = -3/4, |g_t|/|g_h| = 2, 1 + 0.75 * 2 = 2.5)
    assert weights_similarity(Geometry(-3.0, 2.0, 8.0)) == (2.5, 1.0)


def test_float32_rules_match_float64() -> None:
    g = torch.Generator().manual_seed(0)
    g_h, g_t = torch.randn(1000, generator=g, dtype=torch.float64), torch.randn(1000, generator=g, dtype=torch.float64)
    for name in WEIGHTS:
        exact = mix(name, g_h, g_t, 1.3, 0.7).grad
        single = mix(name, g_h.float(), g_t.float(), 1.3, 0.7).grad
        assert torch.allclose(single.double(), exact, atol=1e-5), name


def test_unknown_rule_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="unknown gradient mixing rule 'nope'"):
        mix("nope", G_H, G_T)


# ---------------------------------------------------------------- flat gradients

def test_flatten_and_assign_round_trip_with_none() -> None:
    # params of shapes (2, 2) and (3,) and (1,): grads [[1,2],[3,4]], None, [9] -> (1,2,3,4,0,0,0,9)
    params = [torch.zeros(2, 2, dtype=torch.float64), torch.zeros(3, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)]
    flat = flatten_grads([T(1, 2, 3, 4).view(2, 2), None, T(9)], params)
    assert close(flat, T(1, 2, 3, 4, 0, 0, 0, 9))
    assign_flat_grad(params, flat, [True, False, True])
    assert close(params[0].grad, T(1, 2, 3, 4).view(2, 2))
    assert params[1].grad is None
    assert close(params[2].grad, T(9))
    # views, not copies: one buffer behind every gradient
    assert params[0].grad.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr()


# ---------------------------------------------------------------- combined rules: the losses


def test_class_log_prior_by_hand() -> None:
    # counts [3, 1] over a head of 3 classes: one pseudo-count each -> [4, 2, 1] / 7
    prior = class_log_prior(torch.tensor([3, 1]), 3)
    assert torch.allclose(prior, torch.tensor([math.log(4 / 7), math.log(2 / 7), math.log(1 / 7)]))
    # more counted classes than the head has: the head's columns only, normalised over them
    assert torch.allclose(class_log_prior(torch.tensor([1, 1, 6]), 2), torch.tensor([math.log(0.5)] * 2))
    with pytest.raises(ValueError, match="1-d"):
        class_log_prior(torch.ones(2, 2), 2)


def test_logit_adjusted_cross_entropy_by_hand() -> None:
    # logits [0, 0], target 0, prior [0.75, 0.25]: adjusted logits [log .75, log .25] -> -log(0.75) = 0.287682;
    # the frequent class must win by more on its own samples, the rare one by less
    log_prior = torch.tensor([math.log(0.75), math.log(0.25)], dtype=torch.float64)
    z = torch.zeros(1, 2, dtype=torch.float64)
    assert float(logit_adjusted_cross_entropy(z, torch.tensor([0]), log_prior, 1.0)) == pytest.approx(-math.log(0.75))
    assert float(logit_adjusted_cross_entropy(z, torch.tensor([1]), log_prior, 1.0)) == pytest.approx(-math.log(0.25))
    # tau scales the shift: tau 2 -> [2 log .75, 2 log .25] -> -log(.5625 / (.5625 + .0625)) = -log(0.9)
    assert float(logit_adjusted_cross_entropy(z, torch.tensor([0]), log_prior, 2.0)) == pytest.approx(-math.log(0.9))
    # tau 0 is the plain cross-entropy
    logits, y = torch.randn(4, 2, dtype=torch.float64), torch.tensor([0, 1, 1, 0])
    assert float(logit_adjusted_cross_entropy(logits, y, log_prior, 0.0)) == pytest.approx(
        float(torch.nn.functional.cross_entropy(logits, y)))
    with pytest.raises(ValueError, match="prior"):
        logit_adjusted_cross_entropy(logits, y, log_prior[:1], 1.0)
    with pytest.raises(ValueError, match="covers 1 classes"):
        LogitAdjustedCrossEntropy(log_prior[:1], 1.0)(logits, y)

def test_asymmetric_cross_entropy_by_hand() -> None:
    # logits [[1, 2, 0], [0, 1, 3]], targets [0, 2]: present classes {0, 2}, so class 1 is left out.
    # row 1: -log(e^1 / (e^1 + e^0)) = log(1 + e^-1) = 0.313262; row 2: -log(e^3 / (e^0 + e^3)) = log(1 + e^-3)
    # = 0.048587; mean 0.180925. The gradient never reaches class 1's logit.
    logits = torch.tensor([[1.0, 2.0, 0.0], [0.0, 1.0, 3.0]], dtype=torch.float64, requires_grad=True)
    loss = asymmetric_cross_entropy(logits, torch.tensor([0, 2]))
    expected = (math.log(1 + math.exp(-1)) + math.log(1 + math.exp(-3))) / 2
    assert float(loss) == pytest.approx(expected, abs=1e-12)
    (grad,) = torch.autograd.grad(loss, logits)
    assert torch.equal(grad[:, 1], torch.zeros(2, dtype=torch.float64))
    # with every class present it is the plain cross-entropy
    y = torch.tensor([0, 1, 2])
    z = torch.randn(3, 3, dtype=torch.float64)
    assert float(asymmetric_cross_entropy(z, y)) == pytest.approx(float(torch.nn.functional.cross_entropy(z, y)))


def test_logit_replay_loss_by_hand_over_the_stored_columns() -> None:
    # logits (1, 2, 3) against stored (1, 0): the third column (a class added later) is not compared;
    # mean of (1-1)^2 and (2-0)^2 = 2.
    assert float(logit_replay_loss(T(1, 2, 3)[None], T(1, 0)[None])) == 2.0
    with pytest.raises(ValueError, match="stored logits"):
        logit_replay_loss(T(1, 2)[None], T(1, 2))


def test_rule_names_combine_weights_and_losses() -> None:
    assert set(WEIGHTS) == {"sum", "similarity", "agem", "pcgrad", "mega"}
    assert len(RULES) == 4 * len(WEIGHTS)
    assert RULES["pcgrad_ace_der"] is RULES["pcgrad"]
    assert (TRANSFER_LOSSES["similarity_ace_der"], HISTORY_LOSSES["similarity_ace_der"]) == ("ace", "der")
    assert (TRANSFER_LOSSES["similarity_der"], HISTORY_LOSSES["similarity_der"]) == ("criterion", "der")
    assert (TRANSFER_LOSSES["sum"], HISTORY_LOSSES["sum"]) == ("criterion", "criterion")


# ---------------------------------------------------------------- library selection: pure functions

def test_herding_order_by_hand() -> None:
    # unit rows a = (1, 0), b = (0, 1), c = (1, 1)/sqrt 2; mean mu = (0.569, 0.569).
    # step 0: argmax f . mu -> c (0.805 against 0.569); step 1: f . (2 mu - c) = f . (0.431, 0.431): a and b
    # tie, the first wins -> a; step 2: 3 mu - c - a = (0, 1) -> b.
    f = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    assert herding_order(f, 3).tolist() == [2, 0, 1]
    assert herding_order(f, 1).tolist() == [2]
    assert herding_order(f * 7.0, 5).tolist() == [2, 0, 1]  # rows are normalised; k is capped at n


def test_stratified_ranks_by_hand() -> None:
    # values 5 1 4 2 3: ascending order of positions 1 3 4 2 0. k = 2 takes ranks floor(0.5 * 5/2) = 1 and
    # floor(1.5 * 5/2) = 3, i.e. positions 3 and 2 (values 2 and 4); k = 5 takes every rank.
    v = torch.tensor([5.0, 1.0, 4.0, 2.0, 3.0])
    assert stratified_ranks(v, 2).tolist() == [3, 2]
    assert stratified_ranks(v, 5).tolist() == [1, 3, 4, 2, 0]
    assert stratified_ranks(v, 0).tolist() == []


# ---------------------------------------------------------------- flat buffers

def test_batched_gradients_equal_two_separate_backward_passes() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3))
    params = list(model.parameters())
    x, y = torch.randn(6, 5), torch.tensor([0, 1, 2, 0, 1, 2])
    out = model(x)
    ce = torch.nn.functional.cross_entropy
    loss_h, loss_t = ce(out[:2], y[:2]), ce(out[2:], y[2:])
    g_h = flatten_grads(torch.autograd.grad(loss_h, params, retain_graph=True), params)
    g_t = flatten_grads(torch.autograd.grad(loss_t, params, retain_graph=True), params)
    bufs = GradientBuffers(params)
    assert batched_gradients_into(bufs, loss_h, loss_t) == [True] * 4
    assert torch.allclose(bufs.stacked[0], g_h, atol=1e-7) and torch.allclose(bufs.stacked[1], g_t, atol=1e-7)
