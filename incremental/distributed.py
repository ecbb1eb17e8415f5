"""Data-parallel training on torch.distributed (torchrun, gloo on CPU, NCCL on GPU).

Nothing here replaces PyTorch's engine: processes are started by ``torchrun``, gradients are averaged
by ``DistributedDataParallel`` (or, for plugins that mix gradients themselves, by one flat
``all_reduce`` per gradient), and the process group is PyTorch's. What this module adds is the
continual-learning bookkeeping around it:

- :class:`GlobalBatchSharder`: every rank draws the same global permutation from the seed and takes
  its interleaved share of each *global* minibatch. The union of the ranks' minibatches is then exactly
  the minibatch a single process with the same global batch size would see, which is what makes a
  1-process and an N-process run comparable number for number. torch's ``DistributedSampler`` shards
  at the sample level and pads the data set, so its per-rank batches do not add up to the
  single-process ones; that is why this one is written here.
- helpers that are no-ops when no process group is running, so the same code runs in one process.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def is_main_process() -> bool:
    return rank() == 0


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


@dataclass
class DistributedContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str


def resolve_device(requested: str = "auto") -> torch.device:
    """``auto``: this rank's GPU when CUDA is there (LOCAL_RANK picks it), else the CPU."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if requested == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(requested)
    if device.type == "cuda" and device.index is None:
        device = torch.device(f"cuda:{local_rank}")
    return device


def init_distributed(device: str = "auto", backend: str = "auto") -> DistributedContext:
    """Join the process group torchrun set up (env:// rendezvous); gloo for CPU, NCCL for GPU."""
    dev = resolve_device(device)
    if backend == "auto":
        backend = "nccl" if dev.type == "cuda" else "gloo"
    if not is_distributed():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend=backend)
    return DistributedContext(rank(), world_size(), int(os.environ.get("LOCAL_RANK", "0")), dev, backend)


def shutdown() -> None:
    if is_distributed():
        dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_mean_(tensor: torch.Tensor) -> torch.Tensor:
    """In-place mean over ranks (one collective for the whole tensor); identity in one process."""
    if is_distributed() and world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor.div_(world_size())
    return tensor


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    if is_distributed() and world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    if is_distributed() and world_size() > 1:
        dist.broadcast(tensor, src=src)
    return tensor


@contextmanager
def main_process_first() -> Iterator[None]:
    """Rank 0 runs the block first (e.g. writes generated data), the others after it finished."""
    if not is_main_process():
        barrier()
    yield
    if is_main_process():
        barrier()


class GlobalBatchSharder:
    """Splits each global minibatch of a shared permutation into this rank's interleaved share.

    ``shard(global_idx)`` returns ``global_idx[rank::world]``. ``weight(global_idx)`` is the factor that
    makes the DDP average of per-rank mean losses equal the mean over the global minibatch when the
    shares are uneven (the last minibatch of an epoch): ``n_rank * world / n_global``.
    """

    def __init__(self, rank_: int | None = None, world: int | None = None) -> None:
        self.rank = rank() if rank_ is None else rank_
        self.world = world_size() if world is None else world

    @property
    def active(self) -> bool:
        return self.world > 1

    def shard(self, global_idx: torch.Tensor) -> torch.Tensor:
        return global_idx[self.rank :: self.world]

    def weight(self, global_idx: torch.Tensor) -> float:
        n_global = len(global_idx)
        n_rank = len(range(self.rank, n_global, self.world))
        return n_rank * self.world / n_global if n_global else 0.0
