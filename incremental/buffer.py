"""The history library: the loop's replay buffer and the policies that decide what it keeps.

The library belongs to the loop (not to a plugin) so that every strategy sees the same history:
plain replay trains on it, gradient mixing takes its own gradient from it, and checkpoints save it.
A storage policy only decides *which* samples to keep; the library owns storage, sampling and state.
"""
from __future__ import annotations

from typing import Any, Iterator, Protocol

import torch

from .config import check
from .data import Batch, ListSamples, SampleSet, samples_from_state, samples_to_state


class StoragePolicy(Protocol):
    """Decides the library's contents after new samples were seen.

    ``select`` returns the samples to keep (at most ``capacity``) from the current contents and the
    new samples. ``strategy`` gives gradient-based policies access to the model and loss; ``generator``
    is the library's own RNG, so that the choice is reproducible and checkpointed.
    """

    name: str

    def select(
        self, library: "HistoryLibrary", new: SampleSet, generator: torch.Generator, strategy: Any = None
    ) -> SampleSet: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class ReservoirPolicy:
    """Reservoir sampling (Vitter's algorithm R): every sample seen so far is kept with equal
    probability ``capacity / seen``, whatever the experience it came from."""

    name = "reservoir"

    def __init__(self) -> None:
        self.seen = 0

    def select(self, library: "HistoryLibrary", new: SampleSet, generator: torch.Generator, strategy: Any = None) -> SampleSet:
        cap = library.capacity
        current = library.samples if library.samples is not None else new.empty_like()
        n_cur = len(current)
        # slot[i] = index (into current ++ new) of the sample held in buffer slot i
        slots = list(range(n_cur))
        n_new = len(new)
        draws = torch.rand(n_new, generator=generator, dtype=torch.float64).tolist()
        for k in range(n_new):
            self.seen += 1
            if len(slots) < cap:
                slots.append(n_cur + k)
            else:
                j = int(draws[k] * self.seen)  # uniform in [0, seen)
                if j < cap:
                    slots[j] = n_cur + k
        pool = current.concat(new) if n_cur else new
        return pool.subset(torch.tensor(slots, dtype=torch.long))

    def state_dict(self) -> dict:
        return {"seen": self.seen}

    def load_state_dict(self, state: dict) -> None:
        self.seen = int(state["seen"])


class ClassBalancedPolicy:
    """Equal share of the capacity for every class seen so far (the remainder goes to the
    lowest class ids); within a class, a uniformly random subset of what is available is kept."""

    name = "class_balanced"

    def select(self, library: "HistoryLibrary", new: SampleSet, generator: torch.Generator, strategy: Any = None) -> SampleSet:
        pool = library.samples.concat(new) if library.samples is not None and len(library.samples) else new
        labels = pool.labels
        classes = sorted(set(labels.tolist()))
        if not classes:
            return pool
        quotas = class_quotas(library.capacity, len(classes))
        keep: list[torch.Tensor] = []
        for c, quota in zip(classes, quotas):
            idx = torch.nonzero(labels == c).flatten()
            if len(idx) > quota:
                idx = idx[torch.randperm(len(idx), generator=generator)[:quota]].sort().values
            keep.append(idx)
        return pool.subset(torch.cat(keep))

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
    """Fixed-capacity store of past samples with a pluggable storage policy and its own RNG."""

    def __init__(self, capacity: int, policy: StoragePolicy | str = "reservoir", seed: int = 0) -> None:
        check(isinstance(capacity, int) and not isinstance(capacity, bool) and capacity >= 0, "capacity",
              f"must be an integer >= 0, got {capacity!r}")
        check(not isinstance(policy, str) or policy in STORAGE_POLICIES, "policy",
              f"unknown storage policy {policy!r}; known: {', '.join(sorted(STORAGE_POLICIES))}")
        self.capacity = int(capacity)
        self.policy: StoragePolicy = make_policy(policy) if isinstance(policy, str) else policy
        self.samples: SampleSet | None = None
        self.generator = torch.Generator().manual_seed(int(seed))
        self.last_global_batch_size = 0  # size before data-parallel sharding of the last batch drawn

    def __len__(self) -> int:
        return 0 if self.samples is None else len(self.samples)

    def update(self, new: SampleSet, strategy: Any = None) -> None:
        """Offer ``new`` samples to the library; the policy decides what stays."""
        if self.capacity == 0 or len(new) == 0:
            return
        self.samples = self.policy.select(self, new, self.generator, strategy)

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
                yield samples.batch(sharder.shard(idx) if shard else idx)

    def sample(self, batch_size: int) -> Batch | None:
        """One random minibatch (without replacement inside it), or None when empty."""
        if not len(self):
            return None
        assert self.samples is not None
        idx = torch.randperm(len(self.samples), generator=self.generator)[:batch_size]
        return self.samples.batch(idx)

    def state_dict(self) -> dict:
        return {
            "capacity": self.capacity,
            "policy": self.policy.name,
            "policy_state": self.policy.state_dict(),
            "samples": samples_to_state(self.samples),
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        if state["policy"] != self.policy.name:
            raise ValueError(f"checkpoint holds a {state['policy']!r} library, this run uses {self.policy.name!r}")
        self.capacity = int(state["capacity"])
        self.policy.load_state_dict(state["policy_state"])
        collate = self.samples.collate_fn if isinstance(self.samples, ListSamples) else None
        self.samples = samples_from_state(state["samples"], collate)
        self.generator.set_state(state["generator"])
