"""Non-finite guards: NaN / inf must stop a run where it starts, not surface later as a broken model.

One NaN in the data, or one step with a learning rate too large, makes every weight NaN a few
iterations later; saved as a package, such a model replaces a working one without a word. Two guards:

- data: :func:`first_non_finite` finds the first sample holding NaN or inf, so that a loader can
  refuse the file naming that index (``incremental.datasets`` does);
- loss: :class:`LossGuard` belongs to the training loop and checks the loss without a device sync
  per step. It keeps the detached losses of the last ``every`` iterations (``detach`` is a view: no
  kernel runs) and checks them together every ``every`` iterations and at the end of each experience,
  one device-to-host transfer per check. A non-finite loss raises :class:`NonFiniteLossError` naming
  the experience and the first bad iteration; the caller keeps its last good checkpoint and writes
  no model package.
"""
from __future__ import annotations

import numpy as np
import torch

from .config import check


class DivergedError(RuntimeError):
    """Training produced NaN / inf (the CLI exits with code 3 and writes no model package)."""


class NonFiniteLossError(DivergedError):
    """Training diverged: the loss of ``iteration`` (counted from 0 in ``experience``) was NaN or inf."""

    def __init__(self, experience: int, iteration: int, value: float) -> None:
        self.experience, self.iteration, self.value = experience, iteration, value
        super().__init__(f"training diverged: the loss is non-finite ({value}) at experience {experience}, iteration {iteration} "
                         "(lower the learning rate or check the data)")


class CollapsedModelError(DivergedError):
    """Training ended in a network that answers one class for every input (dead hidden units after a
    burst of large gradients): the loss stays finite, so :class:`LossGuard` cannot see it, but the
    model is as useless as a diverged one and must not replace a working one."""

    def __init__(self, experience: int, predicted: int, n_classes: int) -> None:
        self.experience, self.predicted, self.n_classes = experience, predicted, n_classes
        super().__init__(f"training collapsed: after experience {experience} the model predicts class {predicted} for "
                         f"every test sample of a test set of {n_classes} classes (dead units after a burst of "
                         "large gradients, or too little training: lower the learning rate, set train.grad_clip, "
                         "or train longer)")


def collapsed_class(predicted_counts: torch.Tensor, true_classes: int) -> int | None:
    """The one class a model predicted for a whole test set holding ``true_classes`` classes, or None.

    ``predicted_counts``: how often each class was predicted (a bincount). A test set of two or more
    classes answered by a single class means the network no longer looks at its input.
    """
    if true_classes < 2:
        return None
    used = predicted_counts > 0
    if int(used.sum()) != 1 or float(predicted_counts.sum()) < 2:
        return None
    return int(used.nonzero()[0, 0])


class LossGuard:
    """Checks the training loss for NaN / inf every ``every`` iterations and at each experience's end.

    The loop calls :meth:`start` before an experience, :meth:`observe` after every iteration and
    :meth:`check` when the experience ends (the loop in ``incremental/trainer.py`` does).
    """

    def __init__(self, every: int = 50) -> None:
        check(isinstance(every, int) and every >= 1, "every", f"must be an integer >= 1, got {every!r}")
        self.every = every
        self.experience = 0
        self._window: list[torch.Tensor] = []
        self._first_iteration = 0

    def start(self, experience: int) -> None:
        self.experience = int(experience)
        self._window = []

    def observe(self, loss: torch.Tensor | None, iteration: int) -> None:
        """Remember this iteration's loss (no sync); check when ``every`` losses are waiting."""
        if loss is None:
            return
        if not self._window:
            self._first_iteration = int(iteration)
        self._window.append(loss.detach())
        if len(self._window) >= self.every:
            self.check()

    def check(self) -> None:
        """Raise :class:`NonFiniteLossError` if a loss seen since the last check is NaN or inf."""
        window, self._window = self._window, []
        if not window:
            return
        try:  # one value per iteration (a loss may have shape () or (1,): Avalanche's zeros(1) + loss)
            values = torch.stack(window).reshape(len(window), -1).float().sum(dim=1)
        except RuntimeError:  # losses of different shapes
            values = torch.stack([v.float().sum() for v in window])
        finite = torch.isfinite(values)
        if bool(finite.all()):
            return
        k = int(torch.nonzero(~finite)[0])
        raise NonFiniteLossError(self.experience, self._first_iteration + k, float(values[k]))


class NonFiniteWeightsError(DivergedError):
    """A model about to be saved as a package holds NaN / inf weights."""


def first_non_finite_tensor(tensors: dict[str, torch.Tensor]) -> str | None:
    """Name of the first floating-point tensor of ``tensors`` holding NaN or inf, else None."""
    for name, value in tensors.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
            return name
    return None


def first_non_finite(x: np.ndarray | torch.Tensor) -> tuple[int, float] | None:
    """``(index, value)`` of the first sample (along the first axis) holding NaN or inf, else None."""
    array = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if array.dtype.kind != "f" or array.size == 0:
        return None
    rows = array.reshape(len(array), -1) if array.ndim else array.reshape(1, 1)
    bad = ~np.isfinite(rows)
    hits = np.flatnonzero(bad.any(axis=1))
    if not len(hits):
        return None
    row = int(hits[0])
    return row, float(rows[row][bad[row]][0])
