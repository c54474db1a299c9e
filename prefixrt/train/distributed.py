"""Multi-process training (``torchrun``): the process group, and the few collectives the training loop needs.

Only the trained parameters are synchronized -- the prefixes of a :class:`~prefixrt.train.PrefixTuner` (or, for
the fine-tuning baseline, the model's parameters) -- so the frozen model is never wrapped in
``DistributedDataParallel``: every process holds the same frozen copy, runs its shard of the global batch, and
the gradients are summed with one ``all_reduce`` per step. What the loop decides from the batch (the loss
normalization, which tasks have rows and so get an update) is decided from the *global* batch, so a run on
``world_size`` processes takes the steps one process takes on the whole batch, up to summation order.

Launch with ``torchrun --nproc_per_node N -m prefixrt train ...`` (gloo on CPU, NCCL on GPU); without the
``torchrun`` environment (``WORLD_SIZE`` unset or 1) everything here is a no-op.

>>> dist = Dist.current()            # world_size 1 unless a process group is initialized
>>> dist.world_size, dist.is_main
(1, True)
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["Dist", "all_reduce_grads", "init_from_env"]

# Gradients are summed in flat buckets of at most this many elements (one collective per bucket).
_BUCKET_NUMEL = 32 * 1024 * 1024


@dataclass(frozen=True)
class Dist:
    """This process's place in the process group (rank 0 of 1 when there is none)."""

    rank: int = 0
    world_size: int = 1

    @classmethod
    def current(cls) -> Dist:
        """The default process group's rank and size, or a single process when none is initialized."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes files and shows progress."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def all_reduce_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over all processes, in place (a no-op for one process); returns it."""
        if self.enabled:
            import torch.distributed as dist

            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            dist.barrier()


def init_from_env(device: torch.device | str | None = None) -> Dist:
    """Join the process group that ``torchrun`` describes in the environment; a single process otherwise.

    Parameters
    ----------
    device : torch.device or str, optional
        Where this process computes: a CUDA device uses NCCL (and becomes the current device), anything else gloo.

    Returns
    -------
    Dist
        The rank and world size (``Dist()`` without ``torchrun``).
    """
    import torch.distributed as dist

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Dist()
    if not dist.is_initialized():
        device = torch.device(device) if device is not None else torch.device("cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Dist.current()


def all_reduce_grads(params: Sequence[nn.Parameter], dist: Dist) -> None:
    """Sum the gradients of ``params`` over all processes, in place.

    A parameter without a gradient (``grad is None``: it took no part in this process's forward, e.g. the prefix
    of a task that has no rows in the local shard) contributes zeros and gets the summed gradient. Gradients are
    packed into flat buckets (one collective each) and written back.
    """
    if not dist.enabled or not params:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    bucket: list[nn.Parameter] = []
    numel = 0
    for p in params:
        bucket.append(p)
        numel += p.numel()
        if numel >= _BUCKET_NUMEL:
            _reduce_bucket(bucket, dist)
            bucket, numel = [], 0
    if bucket:
        _reduce_bucket(bucket, dist)


def _reduce_bucket(bucket: list[nn.Parameter], dist: Dist) -> None:
    flat = torch.cat([p.grad.reshape(-1) for p in bucket])  # [sum numel]
    dist.all_reduce_(flat)
    offset = 0
    for p in bucket:
        n = p.numel()
        p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
        offset += n
