"""Two gradients for the price of one, on models made of ``nn.Linear`` layers ("ghost" gradients).

Gradient mixing needs the history gradient ``g_h`` and the transfer gradient ``g_t`` separately, to read
their geometry, and then steps with ``w_h g_h + w_t g_t``. Two backward passes (or one batched backward
over two losses) cost about twice a replay step on a small model. On a model whose trainable parameters
all live in ``nn.Linear`` layers and whose samples do not interact (no batch norm), one backward of
``loss_h + loss_t`` over the joint minibatch is enough:

- a linear layer ``z = x W^T + b`` has the gradient ``dW = sum_i dz_i x_i^T`` over the samples ``i`` and
  ``db = sum_i dz_i``, so the gradient of one group of samples is the same sum over that group's rows of
  the layer's input ``X`` and output gradient ``dZ``; and ``dZ`` of ``loss_h + loss_t`` holds, row by row,
  the output gradient of the loss the sample belongs to (samples do not interact);
- the dot product of two groups' gradients needs no gradient at all: per layer, the per-sample gradients
  ``dz_i x_i^T + dz_i`` have the inner products ``(dz_i . dz_j)(x_i . x_j + 1)``, so ``<g_A, g_B>`` is the sum of
  the ``A x B`` block of ``(dZ dZ^T) * (X X^T + 1)`` over layers (the "ghost norm" of Goodfellow, 2015,
  "Efficient per-example gradient computations", used for clipping by Li et al., 2022); an ``N x N``
  matrix per layer, a quarter of the weight gradient's work at N = 64 and 784 inputs;
- and the mixed gradient is one weighted sum: ``w_h g_h + w_t g_t = sum_i c_i dz_i x_i^T`` with ``c_i`` the
  weight of sample ``i``'s group, one matrix product per layer, written where ``.grad`` will point.

So the step costs one forward, one backward to the layer outputs (no weight gradients), the small Gram
matrices and one weight-gradient product per layer: what a replay step costs, plus the Gram matrices.
:func:`group_gradients_into` writes the two gradients explicitly, for checking and for steps the shortcut
does not cover. Why by hand: torch's per-sample machinery (``torch.func`` + ``vmap``, expanded weights)
materialises one gradient per sample (N times the parameters) or, with ``is_grads_batched``, runs the
backward once per loss; no library computes grouped gradients and their Gram matrix from ``(X, dZ)``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


@dataclass
class LinearRecord:
    """One call of a linear layer in the joint forward: its input (detached: only read, never
    differentiated) and output (in the graph: the backward is asked for its gradient)."""

    module: nn.Linear
    x: torch.Tensor
    z: torch.Tensor


@dataclass
class LinearCapture:
    """Forward hooks on every ``nn.Linear`` of a model, recording each call while ``active``.

    ``valid`` turns False when a step falls outside what the shortcut covers: a layer called twice, or an
    input that is not ``(samples, features)``; the caller then takes the general path for that step.
    """

    model: nn.Module
    records: list[LinearRecord] = field(default_factory=list)
    active: bool = False
    valid: bool = True

    def __post_init__(self) -> None:
        self._handles = [m.register_forward_hook(self._hook) for m in self.model.modules() if isinstance(m, nn.Linear)]

    def start(self) -> None:
        self.records, self.active, self.valid = [], True, True

    def stop(self) -> None:
        self.active = False

    def _hook(self, module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        if not self.active:
            return
        x = inputs[0]
        if x.dim() != 2 or output.dim() != 2 or any(r.module is module for r in self.records):
            self.valid = False
        self.records.append(LinearRecord(module, x.detach(), output))  # type: ignore[arg-type]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles, self.records = [], []


def ineligibility(model: nn.Module, params: Sequence[torch.Tensor]) -> str | None:
    """Why the shortcut cannot serve ``model`` (None when it can): every trainable parameter must be the
    weight or bias of an ``nn.Linear``, no layer may mix samples (batch norm), and no activation may
    overwrite a layer's output in place (the output gradient read would then be the activation's)."""
    owned: set[int] = set()
    for module in model.modules():
        if isinstance(module, _BatchNorm):
            return f"{type(module).__name__} mixes the samples of a batch"
        if getattr(module, "inplace", False):
            return f"{type(module).__name__}(inplace=True) overwrites a layer output"
        if isinstance(module, nn.Linear):
            owned.update(id(p) for p in module.parameters(recurse=False))
    for p in params:
        if id(p) not in owned:
            return f"a trainable parameter of shape {tuple(p.shape)} is not in an nn.Linear"
    return None


def output_gradients(loss: torch.Tensor, records: Sequence[LinearRecord],
                     retain_graph: bool = False) -> list[torch.Tensor]:
    """``dloss/dz`` of every recorded layer output, by one backward that computes no weight gradient
    (autograd skips the edges to the parameters, which were not asked for). Zeros for an unused output."""
    grads = torch.autograd.grad(loss, [r.z for r in records], allow_unused=True, retain_graph=retain_graph)
    return [torch.zeros_like(r.z) if g is None else g for r, g in zip(records, grads)]


def _trainable(module: nn.Linear) -> tuple[bool, bool]:
    bias = module.bias is not None and module.bias.requires_grad
    return module.weight.requires_grad, bias


def group_gram(records: Sequence[LinearRecord], grads: Sequence[torch.Tensor], n_first: int) -> torch.Tensor:
    """``[[|g_2|^2, g_2.g_1], [g_2.g_1, |g_1|^2]]`` for the gradients of the trainable linear parameters
    from rows ``:n_first`` (``g_1``) and rows ``n_first:`` (``g_2``), without forming them.

    The order matches gradient mixing's stack ``[g_h; g_t]`` with the transfer samples first in the joint
    minibatch. Per layer, the per-sample inner products are ``(dZ dZ^T) * (X X^T)`` for the weight, plus
    ``dZ dZ^T`` for the bias; summed over layers into one ``N x N`` matrix ``M``, whose blocks ``E^T M E``
    sums (``E``: the two groups' indicator columns).
    """
    total = None
    for r, dz in zip(records, grads):
        weight, bias = _trainable(r.module)
        if not (weight or bias):
            continue
        dz = dz.float()
        inner = dz @ dz.T
        if weight:
            x = r.x.float()
            xx = x @ x.T
            if bias:
                xx += 1.0
            inner *= xx
        total = inner if total is None else total.add_(inner)
    if total is None:
        raise ValueError("no trainable linear layer was recorded")
    groups = _indicator(len(total), n_first, total.device)
    return groups.T @ total @ groups


def _indicator(n: int, n_first: int, device: torch.device) -> torch.Tensor:
    """``(n, 2)`` float columns: rows ``n_first:`` (the second group) first, then rows ``:n_first``."""
    key = (n, n_first, device)
    cached = _INDICATORS.get(key)
    if cached is None:
        cached = torch.zeros(n, 2, device=device)
        cached[n_first:, 0] = 1.0
        cached[:n_first, 1] = 1.0
        if len(_INDICATORS) > 64:  # batch sizes vary little; keep the cache small anyway
            _INDICATORS.clear()
        _INDICATORS[key] = cached
    return cached


_INDICATORS: dict[tuple[int, int, torch.device], torch.Tensor] = {}


def weighted_gradients_into(views: dict[int, torch.Tensor], records: Sequence[LinearRecord],
                            grads: Sequence[torch.Tensor], weights: torch.Tensor) -> None:
    """The gradient of ``sum_i weights_i loss_i`` for every trainable linear parameter, written into
    ``views[id(param)]``: ``(weights * dZ)^T X`` and ``sum_i weights_i dz_i``, one product per layer."""
    column = weights.unsqueeze(1)
    for r, dz in zip(records, grads):
        weight, bias = _trainable(r.module)
        scaled = dz * column
        if weight:
            torch.mm(scaled.T, r.x, out=views[id(r.module.weight)])
        if bias:
            torch.sum(scaled, dim=0, out=views[id(r.module.bias)])


def group_gradients_into(first: dict[int, torch.Tensor], second: dict[int, torch.Tensor],
                         records: Sequence[LinearRecord], grads: Sequence[torch.Tensor], n_first: int) -> None:
    """The two groups' gradients explicitly: rows ``:n_first`` into ``first``, the rest into ``second``
    (views keyed by ``id(param)``)."""
    for r, dz in zip(records, grads):
        weight, bias = _trainable(r.module)
        x = r.x
        for views, rows in ((first, slice(0, n_first)), (second, slice(n_first, None))):
            if weight:
                torch.mm(dz[rows].T, x[rows], out=views[id(r.module.weight)])
            if bias:
                torch.sum(dz[rows], dim=0, out=views[id(r.module.bias)])


def views_by_param(params: Iterable[torch.Tensor], views: Iterable[torch.Tensor]) -> dict[int, torch.Tensor]:
    """``{id(param): view}``: where each parameter's share of a flat buffer lives."""
    return {id(p): v for p, v in zip(params, views)}
