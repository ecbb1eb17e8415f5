"""Samples, experiences and streams.

The loop never indexes samples one at a time on the fast path: per-sample ``__getitem__`` plus
collation is what makes Avalanche's loop 3-4x slower than a plain PyTorch loop on small data (see
``benchmarks/loop_overhead.py``). Tensor-shaped data lives in :class:`TensorSamples` and a minibatch is
one fancy-index per tensor. Data that is not tensor-shaped (detection images with target dicts,
panoptic targets) lives in :class:`ListSamples` and is collated with the data set's own ``collate_fn``.

Both are real ``torch.utils.data.Dataset`` objects yielding ``(x, y, t)`` so that code written for
Avalanche (EWC's importance pass, LwF) can iterate them with a plain ``DataLoader``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

Batch = list  # [x, y, t]: what the loop calls ``mbatch``


class LabelColumn:
    """A label column with the ``uniques`` view Avalanche's plugins read (LwF reads
    ``dataset.targets_task_labels.uniques``); iterates and indexes like the tensor it wraps."""

    def __init__(self, values: torch.Tensor) -> None:
        self.tensor = values

    @property
    def uniques(self) -> set[int]:
        return set(self.tensor.unique().tolist())

    def __len__(self) -> int:
        return len(self.tensor)

    def __getitem__(self, i: Any) -> Any:
        return self.tensor[i]

    def __iter__(self) -> Iterator[int]:
        return iter(self.tensor.tolist())


class _TaskSet:
    """``dataset.task_set[task_id]``: the samples of one task label (Avalanche's API, read by LwF)."""

    def __init__(self, samples: "TensorSamples | ListSamples") -> None:
        self._samples = samples

    def __getitem__(self, task_id: int) -> "TensorSamples | ListSamples":
        idx = torch.nonzero(self._samples.targets_task_labels.tensor == int(task_id)).flatten()
        return self._samples.subset(idx)


def _index(value: Any, idx: torch.Tensor) -> Any:
    """Fancy-index a tensor or every tensor of a dict of tensors."""
    if isinstance(value, dict):
        return {k: v[idx] for k, v in value.items()}
    return value[idx]


def _cat(values: Sequence[Any]) -> Any:
    if isinstance(values[0], dict):
        return {k: torch.cat([v[k] for v in values]) for k in values[0]}
    return torch.cat(list(values))


def _length(value: Any) -> int:
    if isinstance(value, dict):
        return len(next(iter(value.values())))
    return len(value)


class TensorSamples(Dataset):
    """Samples held as stacked tensors: ``x`` (N, ...), ``y`` (N, ...) or a dict of such, ``t`` (N,).

    ``targets`` is the class label used by class-balanced storage and class bookkeeping; for
    multi-task ``y`` dicts it may be given explicitly (or is all zeros).
    """

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor | dict[str, torch.Tensor],
        t: torch.Tensor | None = None,
        targets: torch.Tensor | None = None,
    ) -> None:
        n = len(x)
        if _length(y) != n:
            raise ValueError(f"x has {n} samples but y has {_length(y)}")
        self.x = x
        self.y = y
        self.t = torch.zeros(n, dtype=torch.long) if t is None else t.long()
        if targets is None:
            targets = y if isinstance(y, torch.Tensor) and y.dim() == 1 else torch.zeros(n, dtype=torch.long)
        self.labels = targets.long()

    # torch Dataset protocol (used by Avalanche code and DataLoader-based callers)
    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[Any, Any, int]:
        y = {k: v[i] for k, v in self.y.items()} if isinstance(self.y, dict) else self.y[i]
        return self.x[i], y, int(self.t[i])

    @property
    def targets(self) -> LabelColumn:
        return LabelColumn(self.labels)

    @property
    def targets_task_labels(self) -> LabelColumn:
        return LabelColumn(self.t)

    @property
    def task_set(self) -> _TaskSet:
        return _TaskSet(self)

    # fast path used by the loop
    def batch(self, idx: torch.Tensor) -> Batch:
        return [self.x[idx], _index(self.y, idx), self.t[idx]]

    def subset(self, idx: torch.Tensor) -> "TensorSamples":
        return TensorSamples(self.x[idx], _index(self.y, idx), self.t[idx], self.labels[idx])

    def concat(self, other: "TensorSamples") -> "TensorSamples":
        return TensorSamples(
            torch.cat([self.x, other.x]),
            _cat([self.y, other.y]),
            torch.cat([self.t, other.t]),
            torch.cat([self.labels, other.labels]),
        )

    def empty_like(self) -> "TensorSamples":
        return self.subset(torch.zeros(0, dtype=torch.long))


def _default_list_collate(items: list[tuple[Any, Any, int]]) -> Batch:
    xs, ys, ts = zip(*items)
    return [list(xs), list(ys), torch.tensor(ts, dtype=torch.long)]


class ListSamples(Dataset):
    """Samples that cannot be stacked (variable-size images, target dicts): a list of ``(x, y, t)``.

    ``collate_fn`` turns a list of samples into ``[xs, ys, t]``; the default keeps lists, which is what
    torchvision's detection models take.
    """

    def __init__(
        self,
        samples: list[tuple[Any, Any, int]],
        targets: torch.Tensor | None = None,
        collate_fn: Callable[[list], Batch] | None = None,
    ) -> None:
        self.samples = list(samples)
        self.labels = (
            torch.zeros(len(self.samples), dtype=torch.long) if targets is None else targets.long()
        )
        self.collate_fn = collate_fn or _default_list_collate

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[Any, Any, int]:
        return self.samples[i]

    @property
    def targets(self) -> LabelColumn:
        return LabelColumn(self.labels)

    @property
    def targets_task_labels(self) -> LabelColumn:
        return LabelColumn(torch.tensor([int(s[2]) for s in self.samples], dtype=torch.long))

    @property
    def task_set(self) -> _TaskSet:
        return _TaskSet(self)

    def batch(self, idx: torch.Tensor) -> Batch:
        return self.collate_fn([self.samples[i] for i in idx.tolist()])

    def subset(self, idx: torch.Tensor) -> "ListSamples":
        return ListSamples([self.samples[i] for i in idx.tolist()], self.labels[idx], self.collate_fn)

    def concat(self, other: "ListSamples") -> "ListSamples":
        return ListSamples(self.samples + other.samples, torch.cat([self.labels, other.labels]), self.collate_fn)

    def empty_like(self) -> "ListSamples":
        return ListSamples([], torch.zeros(0, dtype=torch.long), self.collate_fn)


SampleSet = TensorSamples | ListSamples


@dataclass
class Experience:
    """One step of a stream, with the attributes Avalanche's experiences have and plugins read."""

    dataset: SampleSet
    current_experience: int
    classes_in_this_experience: list[int]
    task_label: int = 0
    origin_stream: Any = None
    previous_classes: list[int] = field(default_factory=list)
    classes_seen_so_far: list[int] = field(default_factory=list)

    @property
    def task_labels(self) -> list[int]:
        return [self.task_label]


def _is_tensor_like(value: Any) -> bool:
    return isinstance(value, torch.Tensor) or (
        isinstance(value, dict) and all(isinstance(v, torch.Tensor) for v in value.values())
    )


_materialized: dict[int, tuple[Any, SampleSet]] = {}


def as_samples(dataset: Any, batch_size: int = 1024) -> SampleSet:
    """Our sample set for any dataset: ours as is, anything else (an Avalanche dataset) read once.

    Reading an Avalanche dataset through a ``DataLoader`` once and stacking it keeps its transforms
    (they run in ``__getitem__``) and makes every later epoch a tensor slice. Results are cached per
    dataset object, so evaluating the same stream after every experience reads it only once.
    """
    if isinstance(dataset, (TensorSamples, ListSamples)):
        return dataset
    key = id(dataset)
    cached = _materialized.get(key)
    if cached is not None and cached[0] is dataset:
        return cached[1]
    first = dataset[0]
    result: SampleSet | None = None
    if _is_tensor_like(first[0]) and (_is_tensor_like(first[1]) or isinstance(first[1], int)):
        try:
            result = _stack_dataset(dataset, batch_size)
        except RuntimeError:  # per-sample shapes differ (detection boxes, panoptic masks): keep a list
            result = None
    if result is None:
        samples = [tuple(dataset[i]) for i in range(len(dataset))]
        samples = [(s[0], s[1], int(s[-1]) if len(s) > 2 else 0) for s in samples]
        targets = getattr(dataset, "targets", None)
        labels = None
        if targets is not None:
            values = list(targets)
            if all(isinstance(v, (int, torch.Tensor)) and torch.as_tensor(v).numel() == 1 for v in values):
                labels = torch.as_tensor([int(v) for v in values])
        # Avalanche's detection datasets collate into tuples; the loop's batches are [xs, ys, t] lists.
        result = ListSamples(samples, labels, None)
    _materialized[key] = (dataset, result)
    return result


def batch_indices(
    n: int, batch_size: int, generator: torch.Generator | None, shuffle: bool = True, drop_smaller_than: int = 1
) -> Iterator[torch.Tensor]:
    """Index tensors of one pass over ``n`` samples in minibatches (order from ``generator``).

    ``drop_smaller_than``: a trailing minibatch with fewer samples is dropped (with N data-parallel
    ranks every rank needs at least one sample of each minibatch).
    """
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    for start in range(0, n, batch_size):
        idx = order[start : start + batch_size]
        if len(idx) < drop_smaller_than:
            return
        yield idx


def _stack_dataset(dataset: Any, batch_size: int) -> TensorSamples:
    """Read a dataset of equal-shape tensors once through a DataLoader and stack it."""
    xs, ys, ts = [], [], []
    collate = getattr(dataset, "collate_fn", None)
    for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate):
        xs.append(batch[0])
        ys.append(torch.as_tensor(batch[1]) if not isinstance(batch[1], dict) else batch[1])
        ts.append(torch.as_tensor(batch[-1]) if len(batch) > 2 else torch.zeros(len(batch[0]), dtype=torch.long))
    return TensorSamples(torch.cat(xs), _cat(ys), torch.cat(ts))


def iterate_batches(
    samples: SampleSet, batch_size: int, generator: torch.Generator | None, shuffle: bool = True
) -> Iterator[Batch]:
    """One pass over ``samples`` in minibatches (order drawn from ``generator`` when shuffling)."""
    for idx in batch_indices(len(samples), batch_size, generator, shuffle):
        yield samples.batch(idx)


def concat_batches(a: Batch, b: Batch) -> Batch:
    """Concatenate two minibatches field by field (tensors on dim 0, lists appended, dicts per key)."""
    out = []
    for u, v in zip(a, b):
        if isinstance(u, torch.Tensor):
            out.append(torch.cat([u, v.to(u.device)]))
        elif isinstance(u, dict):
            out.append({k: torch.cat([u[k], v[k].to(u[k].device)]) for k in u})
        else:
            out.append(list(u) + list(v))
    return out


def move_to(value: Any, device: torch.device) -> Any:
    """Move tensors (also inside lists, tuples and dicts) to ``device``; leave the rest alone."""
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, dict):
        return {k: move_to(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(move_to(v, device) for v in value)
    return value


def batch_size_of(batch: Batch) -> int:
    x = batch[0]
    return _length(x) if not isinstance(x, list) else len(x)


def samples_to_state(samples: SampleSet | None) -> dict | None:
    """Plain tensors/lists/dicts only, so checkpoints load with ``torch.load(weights_only=True)``."""
    if samples is None:
        return None
    if isinstance(samples, TensorSamples):
        return {"kind": "tensor", "x": samples.x, "y": samples.y, "t": samples.t, "labels": samples.labels}
    return {"kind": "list", "samples": [list(s) for s in samples.samples], "labels": samples.labels}


def samples_from_state(state: dict | None, collate_fn: Callable[[list], Batch] | None = None) -> SampleSet | None:
    if state is None:
        return None
    if state["kind"] == "tensor":
        return TensorSamples(state["x"], state["y"], state["t"], state["labels"])
    return ListSamples([tuple(s) for s in state["samples"]], state["labels"], collate_fn)
