"""Several tasks in one shuffled stream of batches: every batch mixes the tasks' rows, each row keeps its task.

:class:`MixedTaskDataset` concatenates the tasks' encoded rows (stamping each with its task name) and
:class:`MixedTaskBatchSampler` draws seeded, shuffled batches of global indices from it, so a batch holds rows of
all tasks in proportion to their sizes. With ``world_size > 1`` each process takes an interleaved slice of the
same global batch: the rows the processes see at step k together are exactly the rows one process sees at
step k with ``batch_size * world_size`` -- the property that lets distributed training match a single process.

>>> ds = MixedTaskDataset({"e2e": e2e_rows, "dart": dart_rows})                                  # doctest: +SKIP
>>> loader = DataLoader(ds, batch_sampler=MixedTaskBatchSampler(len(ds), 8, seed=0),
...                     collate_fn=Collator(pad_id, task_ids={"e2e": 0, "dart": 1}))           # doctest: +SKIP
"""

from __future__ import annotations

import bisect
import dataclasses
from collections.abc import Iterator, Mapping, Sequence

import torch
from torch.utils.data import Dataset, Sampler

from prefixrt.tasks.encode import Encoded

__all__ = ["MixedTaskBatchSampler", "MixedTaskDataset"]


class MixedTaskDataset(Dataset):
    """The rows of several tasks as one indexable dataset; item ``i`` is an :class:`Encoded` with its ``task`` set.

    Parameters
    ----------
    tasks : mapping of str to sequence of Encoded
        Task name -> that task's rows (in the mapping's order; a row's own ``task`` is replaced by the name).
    """

    def __init__(self, tasks: Mapping[str, Sequence[Encoded]]):
        if not tasks:
            raise ValueError("MixedTaskDataset needs at least one task")
        self.names = list(tasks)
        self._rows = [tasks[n] for n in self.names]
        self.sizes = {n: len(r) for n, r in zip(self.names, self._rows, strict=True)}
        self._starts = []
        total = 0
        for r in self._rows:
            self._starts.append(total)
            total += len(r)
        self._len = total

    def __len__(self) -> int:
        return self._len

    def locate(self, index: int) -> tuple[str, int]:
        """(task name, index within that task) of global ``index``."""
        if not 0 <= index < self._len:
            raise IndexError(f"index {index} out of range for {self._len} rows")
        t = bisect.bisect_right(self._starts, index) - 1
        return self.names[t], index - self._starts[t]

    def __getitem__(self, index: int) -> Encoded:
        name, j = self.locate(index)
        row = self._rows[self.names.index(name)][j]
        return row if row.task == name else dataclasses.replace(row, task=name)


class MixedTaskBatchSampler(Sampler):
    """Seeded shuffled batches of indices into a dataset of ``num_rows`` rows, sharded over processes.

    Parameters
    ----------
    num_rows : int
        Length of the dataset (e.g. ``len(MixedTaskDataset(...))``).
    batch_size : int
        Rows per batch *per process*.
    shuffle : bool
        Shuffle every epoch (order depends only on ``seed`` and the epoch set by :meth:`set_epoch`).
    seed : int
        Base seed; every process must use the same one.
    drop_last : bool
        Drop the last incomplete global batch. Otherwise it is kept, and when sharded the epoch's order is padded
        by repeating its first rows so every process gets the same number of rows per step.
    rank, world_size : int
        This process's rank and the number of processes.
    """

    def __init__(
        self,
        num_rows: int,
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ):
        if num_rows < 1 or batch_size < 1:
            raise ValueError(f"num_rows ({num_rows}) and batch_size ({batch_size}) must be >= 1")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} must be in [0, world_size={world_size})")
        self.num_rows, self.batch_size = num_rows, batch_size
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.rank, self.world_size = rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Use the order of ``epoch`` for the next iteration (call it at the start of every epoch)."""
        self.epoch = epoch

    def _order(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.num_rows, generator=g).tolist()
        else:
            order = list(range(self.num_rows))
        if not self.drop_last and len(order) % self.world_size:
            extra = self.world_size - len(order) % self.world_size
            order += (order * (extra // len(order) + 1))[:extra]
        return order

    def __iter__(self) -> Iterator[list[int]]:
        order = self._order()
        step = self.batch_size * self.world_size
        for start in range(0, len(order), step):
            chunk = order[start : start + step]
            if len(chunk) < step and self.drop_last:
                return
            yield chunk[self.rank :: self.world_size]

    def __len__(self) -> int:
        step = self.batch_size * self.world_size
        if self.drop_last:
            return self.num_rows // step
        padded = -(-self.num_rows // self.world_size) * self.world_size
        return -(-padded // step)
