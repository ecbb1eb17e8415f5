"""Samples, experiences and streams.

Two paths feed the loop. Any map-style ``Dataset`` (ours, Avalanche's, a user's) goes through a real
``DataLoader``: samples are read and transformed one at a time when they are needed, in worker
processes, with random augmentation drawn anew every epoch (:class:`TransformedSubset`,
:class:`EpochBatchSampler`, :func:`make_loader`). Small data already in memory with no per-sample
transform takes the fast path: per-sample ``__getitem__`` plus collation is what makes Avalanche's loop
3-4x slower than a plain PyTorch loop on small data (``benchmarks/loop_overhead.py``), so
:class:`TensorSamples` holds stacked tensors and a minibatch is one fancy-index per tensor. Data that
is not tensor-shaped (detection images with target dicts, panoptic targets) lives in
:class:`ListSamples` and is collated with the data set's own ``collate_fn``.

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


def in_memory(dataset: Any) -> SampleSet | None:
    """The dataset itself when it is one of the in-memory sample sets (the fast path), else None."""
    return dataset if isinstance(dataset, (TensorSamples, ListSamples)) else None


def train_view(dataset: Any) -> Any:
    """The dataset with its training transforms (Avalanche datasets and ours have ``.train()``)."""
    view = getattr(dataset, "train", None)
    return view() if callable(view) and not isinstance(dataset, (TensorSamples, ListSamples)) else dataset


def eval_view(dataset: Any) -> Any:
    """The dataset with its evaluation transforms (no random augmentation)."""
    view = getattr(dataset, "eval", None)
    return view() if callable(view) and not isinstance(dataset, (TensorSamples, ListSamples)) else dataset


def dataset_labels(dataset: Any) -> torch.Tensor:
    """Class label of every sample, without reading the samples when the dataset knows them.

    Ours and Avalanche's datasets carry ``targets``; for any other dataset each sample is read once.
    """
    labels = getattr(dataset, "labels", None)
    if isinstance(labels, torch.Tensor):
        return labels.long()
    targets = getattr(dataset, "targets", None)
    if targets is not None:
        if isinstance(targets, LabelColumn):
            return targets.tensor.long()
        if isinstance(targets, torch.Tensor):
            return targets.long()
        try:
            return torch.as_tensor([int(v) for v in targets], dtype=torch.long)
        except (TypeError, ValueError):
            pass
    values = []
    for i in range(len(dataset)):
        y = dataset[i][1]
        values.append(int(y) if isinstance(y, (int, torch.Tensor)) and torch.as_tensor(y).numel() == 1 else 0)
    return torch.tensor(values, dtype=torch.long)


class TransformedSubset(Dataset):
    """Samples ``indices`` of a source, with a per-sample transform applied in ``__getitem__``.

    The source gives ``(raw sample, label)``; this view applies ``train_transform`` (random
    augmentation: different every epoch) or ``eval_transform``, and adds the task label. Nothing is
    read before a sample is asked for. ``raw_samples`` gives samples as the source has them, which is
    what the history library stores (it replays them through ``train_transform``).
    """

    def __init__(self, source: Any, indices: torch.Tensor, train_transform: Callable | None = None,
                 eval_transform: Callable | None = None, task_label: int = 0, training: bool = True) -> None:
        self.source = source
        self.indices = torch.as_tensor(indices, dtype=torch.long)
        self.train_transform = train_transform
        self.eval_transform = eval_transform
        self.task_label = int(task_label)
        self.training = training
        self.labels = dataset_labels(source)[self.indices]

    @property
    def transform(self) -> Callable | None:
        return self.train_transform if self.training else self.eval_transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[Any, Any, int]:
        raw, y = self.source[int(self.indices[i])]
        transform = self.transform
        return (transform(raw) if transform is not None else raw), y, self.task_label

    def _view(self, training: bool) -> "TransformedSubset":
        view = TransformedSubset.__new__(TransformedSubset)
        view.__dict__.update(self.__dict__)
        view.training = training
        return view

    def train(self) -> "TransformedSubset":
        return self if self.training else self._view(True)

    def eval(self) -> "TransformedSubset":
        return self._view(False) if self.training else self

    @property
    def targets(self) -> LabelColumn:
        return LabelColumn(self.labels)

    @property
    def targets_task_labels(self) -> LabelColumn:
        return LabelColumn(torch.full((len(self),), self.task_label, dtype=torch.long))

    @property
    def task_set(self) -> _TaskSet:
        return _TaskSet(self)

    def subset(self, idx: torch.Tensor) -> "TransformedSubset":
        view = self._view(self.training)
        view.indices = self.indices[idx]
        view.labels = self.labels[idx]
        return view

    def raw_samples(self, idx: torch.Tensor) -> TensorSamples:
        """Samples ``idx`` as the source has them (no transform), stacked: what the library keeps."""
        items = [self.source[int(self.indices[i])] for i in idx.tolist()]
        x = torch.stack([torch.as_tensor(raw) for raw, _ in items]) if items else torch.zeros(0)
        y = torch.tensor([int(label) for _, label in items], dtype=torch.long)
        return TensorSamples(x, y, torch.full((len(items),), self.task_label, dtype=torch.long))


def stored_samples(dataset: Any, idx: torch.Tensor) -> SampleSet:
    """Samples ``idx`` of ``dataset`` in the form the history library keeps them (reads only those).

    Untransformed when the dataset can give raw samples; otherwise as the dataset gives them (an
    Avalanche dataset applies its own transforms).
    """
    if isinstance(dataset, (TensorSamples, ListSamples)):
        return dataset.subset(idx)
    raw = getattr(dataset, "raw_samples", None)
    if callable(raw):
        return raw(idx)
    items = [tuple(dataset[int(i)]) for i in idx.tolist()]
    items = [(s[0], s[1], int(s[-1]) if len(s) > 2 else 0) for s in items]
    labels = dataset_labels(dataset)[idx] if len(idx) else torch.zeros(0, dtype=torch.long)
    if items and all(_is_tensor_like(s[0]) for s in items):
        try:
            x = torch.stack([torch.as_tensor(s[0]) for s in items])
            y = torch.stack([torch.as_tensor(s[1]) for s in items])
            return TensorSamples(x, y, torch.tensor([s[2] for s in items]), labels)
        except RuntimeError:  # per-sample shapes differ (detection targets): keep a list
            pass
    return ListSamples(items, labels, getattr(dataset, "collate_fn", None))


def samples_nbytes(samples: SampleSet | None) -> int:
    """Bytes held by a sample set's tensors (what the history library costs in memory)."""
    if samples is None:
        return 0

    def size(value: Any) -> int:
        if isinstance(value, torch.Tensor):
            return value.numel() * value.element_size()
        if isinstance(value, dict):
            return sum(size(v) for v in value.values())
        if isinstance(value, (list, tuple)):
            return sum(size(v) for v in value)
        return 0

    if isinstance(samples, TensorSamples):
        return size(samples.x) + size(samples.y) + size(samples.t) + size(samples.labels)
    return size(samples.samples) + size(samples.labels)


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


class EpochBatchSampler:
    """Index lists of one pass over ``n`` samples, drawn like :func:`batch_indices` (same generator,
    same order), as a ``DataLoader`` batch sampler. A fresh permutation is drawn at every ``iter``,
    in the main process, so the order depends only on the loop's seed whatever ``num_workers`` is.
    With a data-parallel ``sharder`` each rank gets its share of every global minibatch."""

    def __init__(self, n: int, batch_size: int, generator: torch.Generator | None, shuffle: bool,
                 drop_smaller_than: int = 1, sharder: Any = None) -> None:
        self.n, self.batch_size, self.generator, self.shuffle = n, batch_size, generator, shuffle
        self.drop_smaller_than = drop_smaller_than
        self.sharder = sharder if sharder is not None and sharder.active else None

    def __iter__(self) -> Iterator[list[int]]:
        for idx in batch_indices(self.n, self.batch_size, self.generator, self.shuffle, self.drop_smaller_than):
            share = (self.sharder.shard(idx) if self.sharder is not None else idx).tolist()
            if share:  # a rank's share of a small evaluation minibatch can be empty
                yield share

    def __len__(self) -> int:
        return len(global_batch_sizes(self.n, self.batch_size, self.drop_smaller_than))


def global_batch_sizes(n: int, batch_size: int, drop_smaller_than: int = 1) -> list[int]:
    """Sizes of the global minibatches of one pass (the last may be smaller, or dropped)."""
    sizes = [min(batch_size, n - start) for start in range(0, n, batch_size)]
    return [s for s in sizes if s >= drop_smaller_than]


def collate_triplets(items: list[Any]) -> Batch:
    """``[x, y, t]`` from ``(x, y[, t])`` items (torch's default collation, task label 0 when absent)."""
    from torch.utils.data import default_collate

    batch = list(default_collate(items))
    if len(batch) == 2:
        batch.append(torch.zeros(len(items), dtype=torch.long))
    return batch


def make_loader(dataset: Any, batch_sampler: EpochBatchSampler, *, num_workers: int = 0,
                pin_memory: bool = False, persistent_workers: bool = False, seed: int = 0) -> DataLoader:
    """A DataLoader over any map-style dataset: per-sample reads and transforms in ``num_workers``
    processes. ``seed`` seeds the workers' RNGs (random augmentation), so a run is reproducible."""
    collate = getattr(dataset, "collate_fn", None) or collate_triplets
    return DataLoader(
        dataset, batch_sampler=batch_sampler, num_workers=num_workers, collate_fn=collate,
        pin_memory=pin_memory, persistent_workers=persistent_workers and num_workers > 0,
        generator=torch.Generator().manual_seed(int(seed) % (2**63)),
    )


def as_batch(batch: Any) -> Batch:
    """A loader's minibatch as the loop's ``[x, y, t]`` list (Avalanche collates some into tuples)."""
    batch = list(batch)
    if len(batch) == 2:
        batch.append(torch.zeros(batch_size_of(batch), dtype=torch.long))
    return batch


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
