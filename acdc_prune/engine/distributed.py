"""Multi-process training under torchrun: joining the process group, rank roles, batch shards, collectives.

``torchrun --nproc_per_node=N -m acdc_prune train ...`` starts N processes whose environment holds
``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``. :func:`join` makes them one process group (gloo on the
CPU, NCCL on CUDA with one GPU per process). In a single process every helper here is a no-op, so
the trainer has one code path.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Sampler

from acdc_prune.errors import ConfigError

T = TypeVar("T")


@dataclass(frozen=True)
class Ranks:
    """Where this process stands in the process group.

    Attributes:
        rank: global rank, 0 to ``world_size - 1``; rank 0 writes files and shows progress.
        world_size: number of training processes (1 without torchrun).
        local_rank: rank on this machine, the index of this process's GPU.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Whether this process is rank 0."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """Whether more than one process trains."""
        return self.world_size > 1


def _active() -> bool:
    """A process group of more than one process is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def current_ranks() -> Ranks:
    """This process's ranks: from the initialised process group, else from torchrun's environment
    variables (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``), else a single process."""
    if dist.is_available() and dist.is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()
    else:
        rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    return Ranks(rank, world_size, int(os.environ.get("LOCAL_RANK", rank)))


def join(device: torch.device) -> tuple[Ranks, torch.device]:
    """Join torchrun's process group (once per process) and return this process's ranks and device.

    With one process nothing happens and ``device`` is returned as it is. With several, a CUDA
    device becomes ``cuda:LOCAL_RANK`` (one GPU per process; an index in ``training.device`` is
    ignored) and the backend is NCCL; on the CPU the backend is gloo. A process group initialised
    before (by the caller's own script) is used as it is.

    Args:
        device: the device resolved from ``training.device``.

    Raises:
        ConfigError: torch.distributed is not available, or there are fewer GPUs than local ranks.
    """
    ranks = current_ranks()
    if not ranks.distributed:
        return ranks, device
    if not dist.is_available():
        raise ConfigError("WORLD_SIZE > 1 (torchrun) but this torch build has no torch.distributed")
    if device.type == "cuda":
        if ranks.local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"local rank {ranks.local_rank} has no GPU: this machine has {torch.cuda.device_count()}; "
                f"start at most that many processes per node"
            )
        device = torch.device("cuda", ranks.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return current_ranks(), device


@contextlib.contextmanager
def owned_process_group() -> Iterator[None]:
    """Destroy, when the block exits (also on errors), a process group that was created inside it."""
    existed = dist.is_available() and dist.is_initialized()
    try:
        yield
    finally:
        if not existed and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def check_global_batch(batch_size: int, world_size: int) -> None:
    """Refuse a global batch that does not split evenly over the processes.

    Raises:
        ConfigError: ``batch_size`` is not a multiple of ``world_size``.
    """
    if batch_size % world_size:
        raise ConfigError(
            f"training.batch_size {batch_size} is the global batch and must be a multiple of the "
            f"{world_size} processes (WORLD_SIZE)"
        )


def wrap_model(model: nn.Module, device: torch.device) -> nn.Module:
    """``DistributedDataParallel`` around ``model`` (already on ``device``); the identity in one process.

    Checkpoints keep saving ``model`` itself, so their keys have no ``module.`` prefix.
    """
    if not _active():
        return model
    device_ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def broadcast_from_main(obj: T) -> T:
    """Rank 0's ``obj`` (any picklable object) on every rank; ``obj`` itself in one process."""
    if not _active():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def mean_over_ranks(value: float, device: torch.device) -> float:
    """The mean of ``value`` over all ranks (``device``: where the collective runs, CUDA for NCCL)."""
    if not _active():
        return value
    total = torch.tensor(value, dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return total.item() / dist.get_world_size()


def barrier() -> None:
    """Wait until every rank gets here; nothing in one process."""
    if _active():
        dist.barrier()


class ShardSampler(Sampler[int]):
    """This rank's share of every global batch that ``sampler`` draws.

    ``sampler`` must yield the same indices on every rank (the same seed). Its sequence is cut into
    global batches of ``batch_size``; rank ``r`` keeps positions ``r * b`` to ``(r + 1) * b - 1`` of
    each, with ``b = batch_size // world_size``, so the shares are disjoint and together form exactly
    the batches one process would draw. An incomplete last batch is dropped.

    Args:
        sampler: the global index sampler (e.g. a seeded ``RandomSampler``).
        batch_size: global batch size, a multiple of ``world_size``.
        rank: this process's rank.
        world_size: number of processes.
    """

    def __init__(self, sampler: Sampler[int], batch_size: int, rank: int, world_size: int) -> None:
        check_global_batch(batch_size, world_size)
        self.sampler, self.batch_size = sampler, batch_size
        self.share = batch_size // world_size
        self.offset = rank * self.share

    def __iter__(self) -> Iterator[int]:
        indices = list(self.sampler)
        for start in range(0, len(indices) - self.batch_size + 1, self.batch_size):
            yield from indices[start + self.offset : start + self.offset + self.share]

    def __len__(self) -> int:
        return len(self.sampler) // self.batch_size * self.share
