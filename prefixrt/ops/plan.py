"""Plan once per step, run once per layer: a bank layer's view and a step's plan (FlashInfer's plan/run split).

A step (one forward of a batch, one decode step of the engine) reads, at every layer of one attention site, the
same rows' prefixes from a bank packed the same way. What depends only on *which row reads which entry* is
computed once, when the step starts, by :meth:`StepPlan.build`, and every layer reuses it:

* the ids are validated there (range, integer dtype, shape), so every backend accepts and refuses the same
  calls, and no per-layer call syncs with the device to check them;
* the rows are sorted by id (stable), the entries the step uses are listed, and the rows of each used entry are
  cut into groups for the grouped decode kernel: all sized by the ids the step uses, not by the bank's size.

The plan's tables travel through ``torch.library`` as one int64 tensor and a tuple of ints (see
:meth:`StepPlan.op_inputs`), so a compiled graph or a captured CUDA graph holds the very plan it was built with:
nothing is cached behind the caller's back.

>>> import torch
>>> plan = StepPlan.build(torch.tensor([3, 0, 3, 1, 3]), lengths=[2, 2, 0, 5])
>>> plan.order.tolist(), plan.used.tolist(), plan.group_size
([1, 3, 0, 2, 4], [0, 1, 3], 16)
>>> plan.group_entry.tolist(), plan.group_rows.tolist()
([0, 1, 3], [1, 1, 3])
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["BankLayer", "StepPlan", "default_group_size"]

MIN_GROUP, MAX_GROUP = 16, 64


@dataclass(frozen=True)
class BankLayer:
    """The packed bank of one (site, layer), read in place.

    Attributes
    ----------
    k, v : Tensor ``[H, S, D]`` (any strides)
        Entry ``e`` owns rows ``offsets[e]:offsets[e + 1]`` along ``S``.
    offsets : LongTensor ``[N + 1]``
        Non-decreasing, ``offsets[0] == 0``, ``offsets[-1] <= S`` (checked by :meth:`StepPlan.build`).
    """

    k: torch.Tensor
    v: torch.Tensor
    offsets: torch.Tensor

    @property
    def n_entries(self) -> int:
        return self.offsets.shape[0] - 1

    def to(self, dtype: torch.dtype) -> BankLayer:
        """The same layer in ``dtype`` (itself when it already is)."""
        if self.k.dtype == dtype and self.v.dtype == dtype:
            return self
        return BankLayer(self.k.to(dtype), self.v.to(dtype), self.offsets)


def default_group_size(rows: int, used_entries: int) -> int:
    """Rows per decode group: the mean rows per used entry as a power of two in ``[16, 64]`` (the grouped
    kernel's ``tl.dot`` M)."""
    mean_rows = -(-rows // max(1, used_entries))
    return max(MIN_GROUP, min(MAX_GROUP, 1 << max(mean_rows - 1, 0).bit_length()))


class StepPlan:
    """Which bank entry each row reads in one step, and the tables the kernels need; see the module docstring.

    Attributes
    ----------
    prefix_ids : LongTensor ``[B]`` on the device (``-1`` = no prefix; validated)
    n_entries : int
        ``N``, the number of entries of the bank layers this plan serves (``offsets`` has ``N + 1`` values).
    group_size : int
        Rows per decode group (a power of two in ``[16, 64]``).
    order : LongTensor ``[B]``
        Row indices sorted by id (stable; rows without prefix first).
    seg_offsets : LongTensor ``[N + 1]``
        Entry ``e``'s rows are ``order[seg_offsets[e]:seg_offsets[e + 1]]``.
    used : LongTensor ``[U]``
        The entries some row reads (ascending); ``-1`` pads the slots of a plan built without reading the ids.
    max_used_length : int
        Longest prefix among the used entries (an upper bound when the ids were not read).
    bank_rows : int
        The sum of the entry lengths (every bank layer of this plan holds at least this many rows).
    group_entry, group_start, group_rows : LongTensor ``[G]``
        Group ``g`` holds rows ``order[group_start[g] : group_start[g] + group_rows[g]]``, all reading entry
        ``group_entry[g]`` (``-1``: an idle slot, ``group_rows[g] == 0``).
    """

    def __init__(self, prefix_ids: torch.Tensor, table: torch.Tensor, dims: Sequence[int]):
        batch, n_entries, n_used, max_used_length, group_size, n_groups, bank_rows = (int(d) for d in dims)
        self.prefix_ids, self.table, self.dims = prefix_ids, table, tuple(int(d) for d in dims)
        self.batch, self.n_entries, self.max_used_length, self.group_size = (
            batch,
            n_entries,
            max_used_length,
            group_size,
        )
        self.bank_rows = bank_rows  # sum of the entry lengths: the bank layers must hold at least this many
        cuts = [batch, n_entries + 1, n_used, n_groups, n_groups, n_groups]
        (self.order, self.seg_offsets, self.used, self.group_entry, self.group_start, self.group_rows) = (
            table.split(cuts)
        )

    # -- construction -------------------------------------------------------------------------------------------
    @staticmethod
    def build(
        prefix_ids: torch.Tensor,
        lengths: Sequence[int] | torch.Tensor,
        *,
        group_size: int | None = None,
        read_ids: bool = True,
        device: torch.device | str | None = None,
        argument: str = "prefix_ids",
    ) -> StepPlan:
        """Plan a step whose rows read the entries ``prefix_ids`` of a bank with these entry ``lengths``.

        Parameters
        ----------
        prefix_ids : integer Tensor ``[B]`` (any integer dtype, any device; the plan's copy is int64 on the
            same device)
        lengths : the ``N`` entry lengths (``offsets.diff()``), a sequence of ints or a tensor
        group_size : rows per decode group (default :func:`default_group_size` over the used entries)
        read_ids : read the ids on the host (one sync per step): validates them and sizes every table exactly.
            ``False`` plans on the device without a sync, with tables at their upper bounds (for traced code); an
            id outside ``[-1, N)`` then reads no prefix (the plan's ``prefix_ids`` hold -1 there).
        device : where the plan lives (default: ``prefix_ids``' device). Ids given on the host with a device
            cost one small copy, never a sync.
        argument : the name to use in error messages.

        Raises
        ------
        ValueError : ``prefix_ids`` is not a 1-D integer tensor, or an id is outside ``[-1, N)``; ``lengths``
            holds a negative value.
        """
        if not isinstance(prefix_ids, torch.Tensor) or prefix_ids.dim() != 1:
            raise ValueError(f"{argument} must be an integer tensor [batch], got {_describe(prefix_ids)}")
        if prefix_ids.is_floating_point() or prefix_ids.is_complex() or prefix_ids.dtype == torch.bool:
            raise ValueError(f"{argument} must be an integer tensor [batch], got dtype {prefix_ids.dtype}")
        lengths = [int(n) for n in (lengths.tolist() if isinstance(lengths, torch.Tensor) else lengths)]
        if any(n < 0 for n in lengths):
            raise ValueError(f"bank offsets must be non-decreasing, got entry lengths {lengths}")
        if group_size is not None and (group_size < MIN_GROUP or group_size & (group_size - 1)):
            raise ValueError(f"group_size must be a power of two >= {MIN_GROUP}, got {group_size}")
        device = torch.device(device) if device is not None else prefix_ids.device
        if read_ids:
            return _plan_on_host(prefix_ids.long(), lengths, group_size, device, argument)
        return _plan_on_device(prefix_ids.to(device, torch.long), lengths, group_size)

    @staticmethod
    def from_op_inputs(prefix_ids: torch.Tensor, table: torch.Tensor, dims: Sequence[int]) -> StepPlan:
        """The plan :meth:`op_inputs` packed (views of ``table``, nothing computed)."""
        return StepPlan(prefix_ids, table, dims)

    def op_inputs(self) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """``(prefix_ids, table, dims)``: the plan as ``torch.library`` arguments."""
        return self.prefix_ids, self.table, list(self.dims)

    def with_group_size(self, group_size: int) -> StepPlan:
        """The same plan with decode groups of ``group_size`` rows (computed on the device, no sync)."""
        if group_size == self.group_size:
            return self
        counts = self.seg_offsets.diff()
        entry, start, rows = _groups(counts, self.seg_offsets, group_size, self._group_bound(group_size))
        return self._with_groups(group_size, entry, start, rows)

    # -- what the kernels need ----------------------------------------------------------------------------------
    @property
    def n_used(self) -> int:
        return self.used.shape[0]

    @property
    def n_groups(self) -> int:
        return self.group_entry.shape[0]

    def counts(self) -> torch.Tensor:
        """LongTensor ``[N]``: rows per entry."""
        return self.seg_offsets.diff()

    def bank_tiles(self, lengths: torch.Tensor, block_n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(entry, block)`` LongTensors ``[T]``: slot ``t`` is key block ``block[t]`` of entry ``entry[t]`` of
        a used entry (``-1``: idle). ``T = U * cdiv(max_used_length, block_n)``, sized by the used entries.

        ``lengths`` is LongTensor ``[N]`` (the bank offsets' ``diff()``, on the device)."""
        blocks = max(1, -(-self.max_used_length // block_n))
        used = self.used.repeat_interleave(blocks)  # [U * blocks]
        if used.numel() == 0:
            return used, used
        block = torch.arange(used.numel(), device=used.device) % blocks
        live = (used >= 0) & (block * block_n < lengths[used.clamp(min=0)])
        return torch.where(live, used, -1), torch.where(live, block, 0)

    # -- internals ----------------------------------------------------------------------------------------------
    def _group_bound(self, group_size: int) -> int:
        return max(1, self.n_used + -(-self.batch // group_size)) if self.n_used else 1

    def _with_groups(self, group_size, entry, start, rows) -> StepPlan:
        head = self.table[: self.batch + self.n_entries + 1 + self.n_used]
        table = torch.cat([head, entry, start, rows])
        dims = (*self.dims[:4], group_size, entry.shape[0], self.bank_rows)
        return StepPlan(self.prefix_ids, table, dims)

    def __repr__(self) -> str:
        return (
            f"StepPlan(rows={self.batch}, entries={self.n_entries}, used={self.n_used}, "
            f"group_size={self.group_size}, groups={self.n_groups})"
        )


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"{value.dtype} tensor of shape {tuple(value.shape)}"
    return type(value).__name__


def _plan_on_host(
    ids: torch.Tensor, lengths: list[int], group_size: int | None, device: torch.device, argument: str
) -> StepPlan:
    """Exact tables from the ids read on the host (one device sync), uploaded as one tensor."""
    n_entries, batch = len(lengths), ids.shape[0]
    host = ids.cpu()
    bad = (host < -1) | (host >= n_entries)
    if bool(bad.any()):
        valid = f"-1 (no prefix) or 0..{n_entries - 1}" if n_entries else "-1 (the bank is empty)"
        raise ValueError(f"{argument} holds ids {sorted(set(host[bad].tolist()))}; valid ids are {valid}")
    order = torch.argsort(host, stable=True)
    per_entry = torch.bincount(host + 1, minlength=n_entries + 1)  # slot 0: rows without prefix
    seg_offsets = torch.cumsum(per_entry, 0)
    counts = per_entry[1:]
    used = torch.nonzero(counts > 0).flatten()
    size = group_size or default_group_size(batch, used.numel())
    chunks = (counts[used] + size - 1) // size
    entry = used.repeat_interleave(chunks)
    local = torch.arange(entry.numel()) - torch.repeat_interleave(torch.cumsum(chunks, 0) - chunks, chunks)
    start = seg_offsets[entry] + local * size if entry.numel() else entry
    rows = (counts[entry] - local * size).clamp(max=size) if entry.numel() else entry
    max_used = max((lengths[e] for e in used.tolist()), default=0)
    table = torch.cat([order, seg_offsets, used, entry, start, rows]).to(device, non_blocking=True)
    dims = (batch, n_entries, used.numel(), max_used, size, entry.numel(), sum(lengths))
    return StepPlan(ids.to(device, non_blocking=True), table, dims)


def _plan_on_device(ids: torch.Tensor, lengths: list[int], group_size: int | None) -> StepPlan:
    """Tables built with device ops only (no sync), at their upper bounds: ``U = min(B, N)`` used slots."""
    n_entries, batch, device = len(lengths), ids.shape[0], ids.device
    # an id outside [0, N) reads no prefix: the plan's ids hold -1 there (so every backend reads no prefix for it)
    key = torch.where((ids >= 0) & (ids < n_entries), ids, -1)
    order = torch.argsort(key, stable=True)
    per_entry = torch.zeros(n_entries + 1, dtype=torch.long, device=device)
    per_entry.scatter_add_(0, key + 1, torch.ones_like(key))
    seg_offsets = torch.cumsum(per_entry, 0)
    counts = per_entry[1:]
    bound_used = min(batch, n_entries)
    used, _ = _slots((counts > 0).long(), bound_used)
    size = group_size or default_group_size(batch, bound_used)
    bound_groups = max(1, bound_used + -(-batch // size)) if bound_used else 1
    entry, start, rows = _groups(counts, seg_offsets, size, bound_groups)
    table = torch.cat([order, seg_offsets, used, entry, start, rows])
    dims = (batch, n_entries, bound_used, max(lengths, default=0), size, bound_groups, sum(lengths))
    return StepPlan(key, table, dims)


def _slots(per_entry: torch.Tensor, bound: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Enumerate ``per_entry[e]`` slots of each entry ``e`` into ``bound`` slots: ``(entry, local index)``,
    entry ``-1`` for the unused ones (device ops only)."""
    n = per_entry.shape[0]
    cum = torch.cumsum(per_entry, 0)
    t = torch.arange(bound, device=per_entry.device)
    entry = torch.searchsorted(cum, t, right=True)  # first e with cum[e] > t
    live = entry < n
    safe = entry.clamp(max=max(n - 1, 0))
    local = t - (cum[safe] - per_entry[safe]) if n > 0 else torch.zeros_like(t)
    return torch.where(live, entry, -1), torch.where(live, local, 0)


def _groups(counts: torch.Tensor, seg_offsets: torch.Tensor, size: int, bound: int):
    """Cut every entry's rows into groups of at most ``size`` (device ops, ``bound`` slots):
    ``(entry, start, rows)`` LongTensors ``[bound]``."""
    chunks = (counts + size - 1) // size
    entry, local = _slots(chunks, bound)
    safe = entry.clamp(min=0)
    if counts.numel() == 0:
        return entry, torch.zeros_like(entry), torch.zeros_like(entry)
    start = seg_offsets[safe] + local * size
    rows = torch.where(entry >= 0, (counts[safe] - local * size).clamp(max=size), 0)
    return entry, torch.where(entry >= 0, start, 0), rows
