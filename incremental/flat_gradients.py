"""Flat gradients: the two gradients of gradient mixing gathered once, mixed once, written back once.

Gradient mixing needs ``g_h`` and ``g_t`` as flat vectors (for their dot product and norms) and hands the
optimizer one mixed vector. :class:`GradientBuffers` holds the persistent ``(2, P)`` stack ``[g_h; g_t]``
and the output vector with their per-parameter views made once, so a training step allocates nothing
P-sized and walks no parameter list in Python: one multi-tensor copy (or one batched backward) fills the
stack, one GEMM gives the geometry, one ``add`` mixes. The two ways of getting the pair:

- :func:`batched_gradients_into`: both gradients from one graph (the loop's forward over the joint
  minibatch) by one batched backward over the two losses (``is_grads_batched``);
- :func:`gather_into`: copy gradients a backward already produced (the loop's own ``.grad``, or
  ``autograd.grad`` of a separate history pass).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch


def flatten_grads(grads: Sequence[torch.Tensor | None], params: Sequence[torch.Tensor]) -> torch.Tensor:
    """One flat vector from per-parameter gradients (a ``None`` gradient counts as zeros).

    One ``torch.cat`` (a single copy); the list comprehension only collects views.
    """
    return torch.cat([g.reshape(-1) if g is not None else p.new_zeros(p.numel()) for g, p in zip(grads, params)])


def flatten_grads_into(out: torch.Tensor, grads: Sequence[torch.Tensor | None],
                       params: Sequence[torch.Tensor]) -> torch.Tensor:
    """:func:`flatten_grads` written into a preallocated ``out`` (no allocation on the hot path)."""
    return torch.cat([g.reshape(-1) if g is not None else p.new_zeros(p.numel()) for g, p in zip(grads, params)],
                     out=out)


def assign_flat_grad(params: Sequence[torch.Tensor], flat: torch.Tensor, present: Sequence[bool]) -> None:
    """Make every parameter's ``.grad`` a view into ``flat`` (no copy); ``present=False`` keeps ``None``.

    Why views: writing the mixed gradient back costs nothing (``vector_to_parameters`` would copy every
    slice, and it targets ``.data``, not ``.grad``). Why keep ``None``: optimizers skip parameters without
    a gradient; a zero gradient would still move them through momentum or weight decay.
    """
    sizes = [p.numel() for p in params]
    for p, chunk, keep in zip(params, flat.split(sizes), present):
        p.grad = chunk.view_as(p) if keep else None


@dataclass
class GradientBuffers:
    """Persistent flat buffers for one parameter list, and their per-parameter views.

    ``flat`` is ``2P + 2`` long: ``stacked = [g_h; g_t]`` is its ``(2, P)`` head and the last two slots
    carry the two losses, so a data-parallel run averages everything in one collective. ``out`` receives
    the mixed gradient; parameters' ``.grad`` become views of it. Why persistent: on a large model,
    allocating (and page-faulting) fresh P-sized buffers every step cost more than the arithmetic done in
    them; on a small one, every op saved counts, so the views are made once, not per step.
    """

    params: list[torch.Tensor]
    flat: torch.Tensor = field(init=False)
    out: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        ref = self.params[0]
        sizes = [p.numel() for p in self.params]
        n = sum(sizes)
        self.flat = ref.new_empty(2 * n + 2)
        self.out = ref.new_empty(n)
        self.stacked = self.flat[: 2 * n].view(2, n)
        self.losses = self.flat[2 * n:]

        def views(vector: torch.Tensor) -> list[torch.Tensor]:
            return [chunk.view_as(p) for chunk, p in zip(vector.split(sizes), self.params)]

        self.views_h, self.views_t, self.views_out = views(self.stacked[0]), views(self.stacked[1]), views(self.out)
        # (2, *shape) views over both rows: where a batched backward's per-parameter results go
        self.views_pair = [chunk.view(2, *p.shape) for chunk, p in zip(self.stacked.split(sizes, dim=1), self.params)]
        self.eye = torch.eye(2, dtype=ref.dtype, device=ref.device)
        self.all_present = [True] * len(self.params)

    def fits(self, params: list[torch.Tensor]) -> bool:
        return len(params) == len(self.params) and all(a is b for a, b in zip(params, self.params))


def gather_into(dest: torch.Tensor, dest_views: list[torch.Tensor], grads: Sequence[torch.Tensor | None],
                params: Sequence[torch.Tensor]) -> None:
    """Copy per-parameter gradients into the flat ``dest``: one ``_foreach_copy_`` into its cached views
    (what torch.optim uses for multi-tensor updates), or a ``cat`` when some gradient is None."""
    if all(g is not None for g in grads):
        torch._foreach_copy_(dest_views, list(grads))
    else:
        flatten_grads_into(dest, grads, params)


def batched_gradients_into(bufs: GradientBuffers, loss_h: torch.Tensor, loss_t: torch.Tensor,
                           retain_graph: bool = False) -> list[bool]:
    """``g_h`` and ``g_t`` of two losses of one graph, by one batched backward, into ``bufs.stacked``.

    ``autograd.grad`` over the stacked losses with the 2x2 identity as batched ``grad_outputs``: autograd
    vmaps the backward over the two rows, so the graph is walked once and each parameter's result is a
    ``(2, *shape)`` tensor, copied into the stack's paired views by one multi-tensor copy. A parameter the
    losses do not reach gets zeros; the returned flags say which parameters were reached (a caller keeps
    the others' ``.grad`` None).
    """
    losses = torch.stack([loss_h.reshape(()), loss_t.reshape(())]).to(bufs.eye.dtype)
    grads = torch.autograd.grad(losses, bufs.params, grad_outputs=bufs.eye, is_grads_batched=True,
                                allow_unused=True, retain_graph=retain_graph)
    if all(g is not None for g in grads):
        torch._foreach_copy_(bufs.views_pair, list(grads))
        return bufs.all_present
    for view, g in zip(bufs.views_pair, grads):
        view.copy_(g) if g is not None else view.zero_()
    return [g is not None for g in grads]
