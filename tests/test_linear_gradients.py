"""The ghost construction (incremental.linear_gradients) against autograd and hand-computed numbers."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from incremental.flat_gradients import flatten_grads
from incremental.linear_gradients import (
    LinearCapture, group_gradients_into, group_gram, ineligibility, output_gradients, views_by_param,
    weighted_gradients_into,
)


def hand_layer() -> tuple[nn.Linear, torch.Tensor, torch.Tensor]:
    """One linear layer 2 -> 1 and three samples; loss_i = z_i, so dz_i = 1 for every sample."""
    layer = nn.Linear(2, 1)
    x = torch.tensor([[1.0, 2.0], [3.0, 0.0], [0.0, -1.0]])
    return layer, x, torch.ones(3, 1)


def test_group_gram_by_hand() -> None:
    # per-sample gradients [dW | db] = [x_i | 1]: (1, 2, 1), (3, 0, 1), (0, -1, 1)
    # group 1 = sample 0: g_1 = (1, 2, 1); group 2 = samples 1, 2: g_2 = (3, -1, 2)
    # |g_2|^2 = 9 + 1 + 4 = 14, g_2.g_1 = 3 - 2 + 2 = 3, |g_1|^2 = 1 + 4 + 1 = 6
    from incremental.linear_gradients import LinearRecord

    layer, x, dz = hand_layer()
    gram = group_gram([LinearRecord(layer, x, x @ layer.weight.T)], [dz], n_first=1)
    assert gram.tolist() == [[14.0, 3.0], [3.0, 6.0]]


def test_weighted_and_group_gradients_by_hand() -> None:
    from incremental.linear_gradients import LinearRecord

    layer, x, dz = hand_layer()
    record = [LinearRecord(layer, x, x @ layer.weight.T)]
    out = {id(layer.weight): torch.empty(1, 2), id(layer.bias): torch.empty(1)}
    weighted_gradients_into(out, record, [dz], torch.tensor([2.0, 1.0, 1.0]))  # 2 g_1 + g_2
    assert out[id(layer.weight)].tolist() == [[5.0, 3.0]] and out[id(layer.bias)].tolist() == [4.0]
    first = {id(layer.weight): torch.empty(1, 2), id(layer.bias): torch.empty(1)}
    second = {id(layer.weight): torch.empty(1, 2), id(layer.bias): torch.empty(1)}
    group_gradients_into(first, second, record, [dz], n_first=1)
    assert first[id(layer.weight)].tolist() == [[1.0, 2.0]] and first[id(layer.bias)].tolist() == [1.0]
    assert second[id(layer.weight)].tolist() == [[3.0, -1.0]] and second[id(layer.bias)].tolist() == [2.0]


def mlp(frozen_bias: bool = False) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 6), nn.ReLU(), nn.Dropout(0.3), nn.Linear(6, 3))
    if frozen_bias:
        model[2].bias.requires_grad_(False)
    return model


@pytest.mark.parametrize("frozen_bias", [False, True])
def test_against_autograd_on_two_groups(frozen_bias: bool) -> None:
    model = mlp(frozen_bias)
    params = [p for p in model.parameters() if p.requires_grad]
    x, y = torch.randn(10, 5, generator=torch.Generator().manual_seed(1)), torch.arange(10) % 3
    capture = LinearCapture(model)
    torch.manual_seed(2)
    capture.start()
    out = model(x)  # one forward with dropout: both groups see the same masks
    capture.stop()
    ce = nn.functional.cross_entropy
    loss_1, loss_2 = ce(out[:4], y[:4]), 0.5 * ce(out[4:], y[4:])
    g_1 = flatten_grads(torch.autograd.grad(loss_1, params, retain_graph=True), params)
    g_2 = flatten_grads(torch.autograd.grad(loss_2, params, retain_graph=True), params)
    dz = output_gradients(loss_1 + loss_2, capture.records)
    assert len(capture.records) == 3 and capture.valid

    gram = group_gram(capture.records, dz, n_first=4)
    stack = torch.stack([g_2, g_1])
    torch.testing.assert_close(gram, stack @ stack.T, rtol=1e-5, atol=1e-7)

    flat = torch.empty(sum(p.numel() for p in params))
    views = views_by_param(params, [c.view_as(p) for c, p in zip(flat.split([p.numel() for p in params]), params)])
    weights = torch.tensor([3.0] * 4 + [0.25] * 6)
    weighted_gradients_into(views, capture.records, dz, weights)
    torch.testing.assert_close(flat, 3.0 * g_1 + 0.25 * g_2, rtol=1e-5, atol=1e-7)

    first, second = torch.empty_like(flat), torch.empty_like(flat)
    split = [p.numel() for p in params]
    group_gradients_into(views_by_param(params, [c.view_as(p) for c, p in zip(first.split(split), params)]),
                         views_by_param(params, [c.view_as(p) for c, p in zip(second.split(split), params)]),
                         capture.records, dz, n_first=4)
    torch.testing.assert_close(first, g_1, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(second, g_2, rtol=1e-5, atol=1e-7)
    capture.remove()
    capture.start()
    model(x)
    assert capture.records == []  # hooks gone


def test_a_layer_called_twice_or_on_sequences_is_flagged() -> None:
    layer = nn.Linear(4, 4)
    capture = LinearCapture(layer)
    capture.start()
    layer(layer(torch.randn(3, 4)))
    assert not capture.valid
    capture.start()
    layer(torch.randn(3, 5, 4))  # (samples, time, features): the 2-D shortcut does not cover it
    assert not capture.valid
    capture.start()
    layer(torch.randn(3, 4))
    assert capture.valid and len(capture.records) == 1


@pytest.mark.parametrize("model, reason", [
    (nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4, affine=False), nn.Linear(4, 2)), "BatchNorm1d mixes the samples"),
    (nn.Sequential(nn.Linear(4, 4), nn.ReLU(inplace=True), nn.Linear(4, 2)), "ReLU(inplace=True)"),
    (nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(8, 2)), "shape (2, 1, 3, 3) is not in an nn.Linear"),
    (nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)), None),
])
def test_ineligibility_names_the_reason(model: nn.Module, reason: str | None) -> None:
    found = ineligibility(model, [p for p in model.parameters() if p.requires_grad])
    assert found == reason if reason is None else reason in found
