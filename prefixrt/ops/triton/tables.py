"""Sort-by-id plans for the Triton kernels: which rows use which bank entry, computed on the device, no sync.

Rows are sorted by prefix id once (stable, so rows that share an id keep their order and every reduction over
them runs in the same order each time); entry ``e``'s rows are ``order[seg_offsets[e]:seg_offsets[e + 1]]``
(rows with id ``-1`` sort first and belong to no entry). From that:

* :func:`bank_tiles` cuts every *used* entry into key blocks, one program each in the bank-gradient kernel;
* :class:`DecodePlan` cuts every used entry's rows into groups of at most ``group_size`` rows, one program
  each in the grouped decode kernel (Hydragen / FlashInfer-cascade: the prefix is read once per group).

Grids must be sized without reading device memory, so both tables have a static upper bound of slots and the
unused slots hold entry ``-1`` (their programs do nothing). A plan depends only on ``prefix_ids`` and
``bank_offsets``; :func:`segments_for` and :func:`decode_plan_for` cache the last few plans keyed on those
tensors' identity *and* version counter, so one plan serves every layer of a step and an in-place change
of the ids is never missed (inference-mode tensors have no version counter: they are planned every call).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

__all__ = [
    "Segments",
    "BankTiles",
    "DecodePlan",
    "build_segments",
    "segments_for",
    "bank_tiles",
    "decode_plan_for",
]


@dataclass(frozen=True)
class Segments:
    """Rows grouped by bank entry.

    Attributes
    ----------
    order : LongTensor ``[B]``
        Row indices sorted by prefix id (stable; ``-1`` first).
    seg_offsets : LongTensor ``[N + 1]``
        Entry ``e``'s rows are ``order[seg_offsets[e]:seg_offsets[e + 1]]``.
    counts : LongTensor ``[N]``
        Rows per entry.
    lengths : LongTensor ``[N]``
        Prefix length per entry (``bank_offsets[e + 1] - bank_offsets[e]``).
    batch, n_entries : int
    """

    order: torch.Tensor
    seg_offsets: torch.Tensor
    counts: torch.Tensor
    lengths: torch.Tensor
    batch: int
    n_entries: int


def build_segments(prefix_ids: torch.Tensor, bank_offsets: torch.Tensor) -> Segments:
    """Sort rows by id and count rows per entry (device ops only: argsort, scatter_add, cumsum)."""
    ids = prefix_ids.long()
    offsets = bank_offsets.long()
    n_entries = offsets.shape[0] - 1
    # an id outside [0, N) reads no prefix in the kernels (they clamp it to an empty span): sort it with the -1s
    key = torch.where((ids >= 0) & (ids < n_entries), ids, -1)
    order = torch.argsort(key, stable=True)
    # slot 0 counts the rows without prefix, slot e + 1 those with id e
    counts_full = torch.zeros(n_entries + 1, dtype=torch.long, device=ids.device)
    counts_full.scatter_add_(0, key + 1, torch.ones_like(key))
    seg_offsets = torch.cumsum(counts_full, 0)  # [N + 1]: rows with id < e (the -1 rows included)
    return Segments(
        order=order,
        seg_offsets=seg_offsets,
        counts=counts_full[1:],
        lengths=offsets[1:] - offsets[:-1],
        batch=ids.shape[0],
        n_entries=n_entries,
    )


@dataclass(frozen=True)
class _SlotTable:
    """Entry ``entry[t]`` (``-1`` for an unused slot) and its local index ``local[t]`` for ``t < bound``."""

    entry: torch.Tensor
    local: torch.Tensor
    bound: int


def _slots(per_entry: torch.Tensor, bound: int) -> _SlotTable:
    """Enumerate ``per_entry[e]`` slots for each entry ``e`` into a table of static size ``bound``."""
    n = per_entry.shape[0]
    cum = torch.cumsum(per_entry, 0)  # [N]
    t = torch.arange(bound, device=per_entry.device)
    entry = torch.searchsorted(cum, t, right=True)  # first e with cum[e] > t
    used = entry < n
    safe = entry.clamp(max=max(n - 1, 0))
    local = t - (cum[safe] - per_entry[safe]) if n > 0 else torch.zeros_like(t)
    return _SlotTable(entry=torch.where(used, entry, -1), local=torch.where(used, local, 0), bound=bound)


@dataclass(frozen=True)
class BankTiles:
    """Key blocks of the used bank entries: slot ``t`` is block ``block[t]`` of entry ``entry[t]`` (or idle)."""

    entry: torch.Tensor
    block: torch.Tensor
    bound: int


def bank_tiles(segments: Segments, bank_rows: int, block_n: int) -> BankTiles:
    """One slot per ``block_n`` keys of every entry some row uses.

    ``sum_e cdiv(len_e, block_n)`` over used entries is at most ``cdiv(S, block_n) + min(B, N)``, the grid.
    """
    tiles = torch.where(segments.counts > 0, (segments.lengths + block_n - 1) // block_n, 0)
    bound = max(1, (bank_rows + block_n - 1) // block_n + min(segments.batch, segments.n_entries))
    table = _slots(tiles, bound)
    return BankTiles(entry=table.entry, block=table.local, bound=bound)


@dataclass(frozen=True)
class DecodePlan:
    """Which rows decode together: computed once per generation step, reused by every layer.

    Group ``g`` holds rows ``segments.order[group_start[g] : group_start[g] + group_rows[g]]``, which all use
    entry ``group_entry[g]`` (``-1``: an idle slot). A group has at most ``group_size`` rows (the grouped
    kernel's tl.dot M, a power of two >= 16).

    Build it with :meth:`build` (or let the Triton backend build and cache it from ``prefix_ids``).

    >>> import torch
    >>> plan = DecodePlan.build(torch.tensor([3, 0, 3, 1, 3]), torch.tensor([0, 2, 4, 4, 9]))
    >>> plan.segments.order.tolist(), plan.group_entry[:3].tolist(), plan.group_rows[:3].tolist()
    ([1, 3, 0, 2, 4], [0, 1, 3], [1, 1, 3])
    """

    segments: Segments
    group_entry: torch.Tensor
    group_start: torch.Tensor
    group_rows: torch.Tensor
    group_size: int
    bound: int

    @staticmethod
    def build(
        prefix_ids: torch.Tensor, bank_offsets: torch.Tensor, group_size: int | None = None
    ) -> DecodePlan:
        """Plan from ``prefix_ids [B]`` and ``bank_offsets [N + 1]``.

        ``group_size`` defaults to the mean rows per used entry (as bounded by ``min(B, N)``), as a power of
        two in ``[16, 64]``.
        """
        return _build_decode_plan(build_segments(prefix_ids, bank_offsets), group_size)


def _build_decode_plan(segments: Segments, group_size: int | None) -> DecodePlan:
    batch, n_entries = segments.batch, segments.n_entries
    if group_size is None:
        mean_rows = -(-batch // max(1, min(batch, n_entries)))
        group_size = max(16, min(64, 1 << max(mean_rows - 1, 0).bit_length()))
    if group_size < 16 or group_size & (group_size - 1):
        raise ValueError(f"group_size must be a power of two >= 16, got {group_size}")
    groups = (segments.counts + group_size - 1) // group_size  # [N]
    bound = max(1, min(batch, n_entries) + -(-batch // group_size))
    table = _slots(groups, bound)
    safe = table.entry.clamp(min=0)
    start = segments.seg_offsets[safe] + table.local * group_size if n_entries else table.local
    left = segments.counts[safe] - table.local * group_size if n_entries else table.local
    rows = torch.where(table.entry >= 0, left.clamp(max=group_size), 0)
    return DecodePlan(segments, table.entry, start, rows, group_size, bound)


class _PlanCache:
    """The last few values computed from ``(prefix_ids, bank_offsets)``, valid while both tensors are the same
    live objects with unchanged version counters (an in-place write bumps the version)."""

    def __init__(self, size: int = 4) -> None:
        self.size = size
        self.entries: list[tuple[tuple, object]] = []

    @staticmethod
    def _key(*tensors: torch.Tensor) -> tuple:
        return tuple((weakref.ref(t), t._version) for t in tensors)

    @staticmethod
    def _matches(key: tuple, tensors: tuple[torch.Tensor, ...]) -> bool:
        return all(
            ref() is t and version == t._version for (ref, version), t in zip(key, tensors, strict=True)
        )

    def get(self, tensors: tuple[torch.Tensor, ...], extra, make):
        if any(t.is_inference() for t in tensors):
            return make()  # inference tensors have no version counter: an in-place change would go unseen
        for key, value in self.entries:
            if key[1] == extra and self._matches(key[0], tensors):
                return value
        value = make()
        self.entries = [((self._key(*tensors), extra), value)] + self.entries[: self.size - 1]
        return value


_SEGMENTS = _PlanCache()
_DECODE = _PlanCache()


def segments_for(prefix_ids: torch.Tensor, bank_offsets: torch.Tensor) -> Segments:
    """:func:`build_segments`, cached on the two tensors (see the module docstring)."""
    return _SEGMENTS.get((prefix_ids, bank_offsets), None, lambda: build_segments(prefix_ids, bank_offsets))


def decode_plan_for(
    prefix_ids: torch.Tensor, bank_offsets: torch.Tensor, group_size: int | None = None
) -> DecodePlan:
    """:meth:`DecodePlan.build`, cached on the two tensors (see the module docstring)."""
    return _DECODE.get(
        (prefix_ids, bank_offsets),
        group_size,
        lambda: _build_decode_plan(segments_for(prefix_ids, bank_offsets), group_size),
    )
