"""The history library: the loop's replay buffer and the policies that decide what it keeps.

The library belongs to the loop (not to a plugin) so that every strategy sees the same history:
plain replay trains on it, gradient mixing takes its own gradient from it, and checkpoints save it.
A storage policy only decides *which* samples to keep; the library owns storage, sampling and state.
"""
from __future__ import annotations

import numbers
from typing import Any, Callable, Iterator, Protocol

import torch

from .config import check
from .data import (
    Batch, ListSamples, SampleSet, TensorSamples, as_batch, collate_triplets, concat_batches, dataset_labels,
    eval_view, samples_from_state, samples_nbytes, samples_to_state, stored_samples,
)


def _transform_each(transform: Callable | None, batch: Batch) -> Batch:
    """Apply a per-sample transform to every sample of a stacked minibatch (own random draw each)."""
    if transform is None or not isinstance(batch[0], torch.Tensor):
        return batch
    return [torch.stack([transform(x) for x in batch[0]]), *batch[1:]]


def _take(batch: Batch, order: torch.Tensor) -> Batch:
    out = []
    for field in batch:
        if isinstance(field, torch.Tensor):
            out.append(field[order])
        elif isinstance(field, dict):
            out.append({k: v[order] for k, v in field.items()})
        else:
            out.append([field[i] for i in order.tolist()])
    return out


class Pool:
    """The library's samples followed by the new samples offered to it: indices ``0..n_current-1`` are
    stored samples, ``n_current..`` the new dataset's. Labels are known up front; a sample is read only
    when a policy asks for it (:meth:`batch`) or keeps it (:meth:`compose`), so offering a data set
    larger than memory reads ``capacity`` samples, not the data set."""

    def __init__(self, library: "HistoryLibrary", new: Any) -> None:
        self.library = library
        self.current: SampleSet | None = library.samples if library.samples is not None and len(library.samples) else None
        self.n_current = 0 if self.current is None else len(self.current)
        self.new = new
        self.new_labels = dataset_labels(new)
        current_labels = self.current.labels if self.current is not None else torch.zeros(0, dtype=torch.long)
        self.labels = torch.cat([current_labels, self.new_labels])

    def __len__(self) -> int:
        return self.n_current + len(self.new)

    @property
    def is_tensor(self) -> bool:
        """True when model inputs are plain tensors (batched per-sample gradients apply)."""
        return not isinstance(self.current, ListSamples) and not isinstance(self.new, ListSamples)

    def batch(self, idx: torch.Tensor) -> Batch:
        """Model inputs (no random augmentation) of pool samples ``idx``, in that order."""
        idx = torch.as_tensor(idx, dtype=torch.long)
        is_current = idx < self.n_current
        parts: list[tuple[torch.Tensor, Batch]] = []
        if is_current.any():
            assert self.current is not None
            stored = self.current.batch(idx[is_current])
            parts.append((torch.nonzero(is_current).flatten(), _transform_each(self.library.eval_transform, stored)))
        if (~is_current).any():
            parts.append((torch.nonzero(~is_current).flatten(), self._new_inputs(idx[~is_current] - self.n_current)))
        if len(parts) == 1:
            return parts[0][1]
        positions = torch.cat([p for p, _ in parts])
        return _take(concat_batches(parts[0][1], parts[1][1]), torch.argsort(positions))

    def _new_inputs(self, idx: torch.Tensor) -> Batch:
        if isinstance(self.new, (TensorSamples, ListSamples)):
            return self.new.batch(idx)
        dataset = eval_view(self.new)
        items = [dataset[int(i)] for i in idx.tolist()]
        return as_batch((getattr(dataset, "collate_fn", None) or collate_triplets)(items))

    def compose(self, keep: torch.Tensor) -> SampleSet:
        """The stored form of pool samples ``keep``, in that order (reads only the kept new samples)."""
        keep = torch.as_tensor(keep, dtype=torch.long)
        is_new = keep >= self.n_current
        new_idx = torch.unique(keep[is_new] - self.n_current)  # sorted
        if self.current is None:
            pool: SampleSet = stored_samples(self.new, new_idx)
        elif len(new_idx):
            pool = self.current.concat(stored_samples(self.new, new_idx))
        else:
            pool = self.current
        remapped = keep.clone()
        remapped[is_new] = self.n_current + torch.searchsorted(new_idx, keep[is_new] - self.n_current)
        return pool.subset(remapped)


class StoragePolicy(Protocol):
    """Decides the library's contents after new samples were seen.

    ``select`` returns the indices into ``pool`` (stored samples then new ones) of the samples to keep,
    at most ``capacity``, in slot order. ``strategy`` gives gradient-based policies access to the model
    and loss; ``generator`` is the library's own RNG, so the choice is reproducible and checkpointed.
    """

    name: str

    def select(self, library: "HistoryLibrary", pool: Pool, generator: torch.Generator, strategy: Any = None
               ) -> torch.Tensor: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class ReservoirPolicy:
    """Reservoir sampling (Vitter's algorithm R): every sample seen so far is kept with equal
    probability ``capacity / seen``, whatever the experience it came from."""

    name = "reservoir"

    def __init__(self) -> None:
        self.seen = 0

    def select(self, library: "HistoryLibrary", pool: Pool, generator: torch.Generator, strategy: Any = None
               ) -> torch.Tensor:
        cap = library.capacity
        n_cur = pool.n_current
        # slot[i] = index (into the pool) of the sample held in buffer slot i
        slots = list(range(n_cur))
        n_new = len(pool) - n_cur
        draws = torch.rand(n_new, generator=generator, dtype=torch.float64).tolist()
        for k in range(n_new):
            self.seen += 1
            if len(slots) < cap:
                slots.append(n_cur + k)
            else:
                j = int(draws[k] * self.seen)  # uniform in [0, seen)
                if j < cap:
                    slots[j] = n_cur + k
        return torch.tensor(slots, dtype=torch.long)

    def state_dict(self) -> dict:
        return {"seen": self.seen}

    def load_state_dict(self, state: dict) -> None:
        self.seen = int(state["seen"])


class ClassBalancedPolicy:
    """Equal share of the capacity for every class seen so far (the remainder goes to the
    lowest class ids); within a class, a uniformly random subset of what is available is kept."""

    name = "class_balanced"

    def select(self, library: "HistoryLibrary", pool: Pool, generator: torch.Generator, strategy: Any = None
               ) -> torch.Tensor:
        labels = pool.labels
        classes = sorted(set(labels.tolist()))
        if not classes:
            return torch.arange(len(pool))
        quotas = class_quotas(library.capacity, len(classes))
        keep: list[torch.Tensor] = []
        for c, quota in zip(classes, quotas):
            idx = torch.nonzero(labels == c).flatten()
            if len(idx) > quota:
                idx = idx[torch.randperm(len(idx), generator=generator)[:quota]].sort().values
            keep.append(idx)
        return torch.cat(keep)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def class_quotas(capacity: int, n_classes: int) -> list[int]:
    """Split ``capacity`` into ``n_classes`` near-equal integer shares summing to ``capacity``."""
    base, extra = divmod(capacity, n_classes)
    return [base + (1 if i < extra else 0) for i in range(n_classes)]


STORAGE_POLICIES: dict[str, type] = {
    "reservoir": ReservoirPolicy,
    "class_balanced": ClassBalancedPolicy,
}


def make_policy(name: str, **kwargs: Any) -> StoragePolicy:
    """Storage policy by name; ``register_policy`` adds more (the gradient-based one does)."""
    if name not in STORAGE_POLICIES:
        raise ValueError(f"unknown storage policy {name!r}; known: {sorted(STORAGE_POLICIES)}")
    return STORAGE_POLICIES[name](**kwargs)


def register_policy(name: str, cls: type) -> None:
    STORAGE_POLICIES[name] = cls


class HistoryLibrary:
    """Fixed-capacity store of past samples with a pluggable storage policy and its own RNG.

    Samples are kept as the data set gives them before the training transform (raw images, not
    augmented copies) and pass through that transform each time they are replayed, as Mammoth's buffer
    does: a replayed image is cropped and flipped anew, like a new one.
    """

    def __init__(self, capacity: int, policy: StoragePolicy | str = "reservoir", seed: int = 0,
                 collate_fn: Callable[[list], Batch] | None = None) -> None:
        check(isinstance(capacity, numbers.Integral) and not isinstance(capacity, bool) and capacity >= 0,
              "mem_size", f"must be an integer >= 0, got {capacity!r}")
        check(not isinstance(policy, str) or policy in STORAGE_POLICIES, "policy",
              f"unknown storage policy {policy!r}; known: {', '.join(sorted(STORAGE_POLICIES))}")
        self.capacity = int(capacity)
        self.policy: StoragePolicy = make_policy(policy) if isinstance(policy, str) else policy
        self.samples: SampleSet | None = None
        self.generator = torch.Generator().manual_seed(int(seed))
        self.last_global_batch_size = 0  # size before data-parallel sharding of the last batch drawn
        # Which slots the last minibatch came from, and how the last update moved slots (pool indices
        # kept, slots before it): for plugins that keep per-sample data beside the library (DER logits).
        self.last_indices: torch.Tensor | None = None
        self.last_update: tuple[torch.Tensor, int] | None = None
        # Per-sample transforms of the data the stored samples came from (code, not state: set again
        # from the current experience's dataset after a resume).
        self.train_transform: Callable | None = None
        self.eval_transform: Callable | None = None
        self.collate_fn = collate_fn  # for list samples restored from a checkpoint (detection, panoptic)

    def __len__(self) -> int:
        return 0 if self.samples is None else len(self.samples)

    @property
    def nbytes(self) -> int:
        """Memory held by the stored samples, in bytes (reported in results.json)."""
        return samples_nbytes(self.samples)

    def adopt_transforms(self, dataset: Any) -> None:
        """Replay through ``dataset``'s transforms when it hands out raw samples (it has ``raw_samples``)."""
        if callable(getattr(dataset, "raw_samples", None)):
            self.train_transform = getattr(dataset, "train_transform", None)
            self.eval_transform = getattr(dataset, "eval_transform", None)

    def update(self, new: Any, strategy: Any = None) -> None:
        """Offer the samples of ``new`` (any map-style dataset); the policy decides what stays."""
        if self.capacity == 0 or len(new) == 0:
            return
        self.adopt_transforms(new)
        pool = Pool(self, new)
        keep = self.policy.select(self, pool, self.generator, strategy)
        self.samples = pool.compose(keep)
        self.last_update = (keep, pool.n_current)

    def _replay(self, batch: Batch) -> Batch:
        return _transform_each(self.train_transform, batch)

    def batches(self, batch_size: int, sharder: Any = None) -> Iterator[Batch]:
        """Endless history minibatches: one shuffled pass after another over the current contents.

        With a data-parallel ``sharder`` every rank draws the same global minibatch (identical
        libraries and RNGs on every rank) and keeps its share of it.
        """
        if not len(self):
            return
        samples = self.samples
        assert samples is not None
        n = len(samples)
        shard = sharder is not None and sharder.active
        min_size = sharder.world if shard else 1
        while True:
            order = torch.randperm(n, generator=self.generator)
            for start in range(0, n, batch_size):
                idx = order[start : start + batch_size]
                if len(idx) < min_size:
                    break
                self.last_global_batch_size = len(idx)
                self.last_indices = idx
                yield self._replay(samples.batch(sharder.shard(idx) if shard else idx))

    def sample(self, batch_size: int) -> Batch | None:
        """One random minibatch (without replacement inside it), or None when empty."""
        if not len(self):
            return None
        assert self.samples is not None
        idx = torch.randperm(len(self.samples), generator=self.generator)[:batch_size]
        self.last_indices = idx
        return self._replay(self.samples.batch(idx))

    def state_dict(self) -> dict:
        return {
            "capacity": self.capacity,
            "policy": self.policy.name,
            "policy_state": self.policy.state_dict(),
            "samples": samples_to_state(self.samples),
            "generator": self.generator.get_state(),
        }

    def export_state(self) -> dict:
        """:meth:`state_dict` with the samples as model inputs (evaluation transform applied), for a
        model package that must stand alone: whoever updates it later replays exemplars as they are."""
        state = self.state_dict()
        samples = state["samples"]
        if self.eval_transform is not None and samples is not None and samples["kind"] == "tensor":
            x = _transform_each(self.eval_transform, [samples["x"]])[0]
            state["samples"] = {**samples, "x": x}
        return state

    def load_state_dict(self, state: dict) -> None:
        if state["policy"] != self.policy.name:
            raise ValueError(f"checkpoint holds a {state['policy']!r} library, this run uses {self.policy.name!r}")
        self.capacity = int(state["capacity"])
        self.policy.load_state_dict(state["policy_state"])
        collate = self.samples.collate_fn if isinstance(self.samples, ListSamples) else self.collate_fn
        self.samples = samples_from_state(state["samples"], collate)
        self.generator.set_state(state["generator"])
