"""Preallocated K/V storage for decoding: one dense slab per kind of sequence part, compacted in place.

Layout
------
A :class:`KVStore` holds ``k`` and ``v`` of shape ``[layers, rows, H, capacity, D]``, allocated once. Row ``r``
holds one sequence part (a prompt, a source, or the tokens generated so far); ``lengths[r]`` slots are filled
from position 0 on and ``valid [rows, capacity]`` says which of them are real tokens (a left-padded prompt keeps
its padding slots, marked invalid, so its K/V are bitwise the ones Hugging Face computes).

The live rows are always ``0 .. n-1``. Attention reads ``k[layer, :n, :, :T]`` -- a strided view, no copy -- and
when rows leave, :meth:`KVStore.keep` moves the survivors down with one ``index_select`` per store (a copy of the
surviving rows' filled slots, once per change of the batch, never per step). Beam search reorders the generated
part with the same call (repeated indices); prompts live in a separate store with one row per *item*, so the K/V
of a prompt is written once and shared by all of its beams.
"""

from __future__ import annotations

import torch

__all__ = ["KVStore"]


class KVStore:
    """Dense K/V slab ``[layers, rows, H, capacity, D]`` with per-row lengths and a validity mask.

    Attributes
    ----------
    k, v : Tensor ``[layers, rows, H, capacity, D]``
    valid : BoolTensor ``[rows, capacity]``
    lengths : list[int]
        Filled slots per live row (kept on the host: planning a step never syncs with the device).
    holes : list[bool]
        Whether a live row has invalid (padding) slots among its filled ones.
    """

    def __init__(self, layers: int, rows: int, heads: int, capacity: int, head_dim: int, dtype, device):
        self.layers, self.rows, self.capacity = layers, rows, capacity
        shape = (layers, rows, heads, capacity, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.valid = torch.zeros(rows, capacity, dtype=torch.bool, device=device)
        self.lengths: list[int] = []
        self.holes: list[bool] = []

    @property
    def n(self) -> int:
        """Number of live rows."""
        return len(self.lengths)

    @property
    def nbytes(self) -> int:
        """Bytes held by the slab (K, V and the mask)."""
        return 2 * self.k.numel() * self.k.element_size() + self.valid.numel()

    def max_length(self) -> int:
        return max(self.lengths, default=0)

    def uniform(self) -> bool:
        """All live rows have the same length (one slot index per step, plain slicing)."""
        return len(set(self.lengths)) <= 1

    # -- writing ------------------------------------------------------------------------------------------------
    def append_rows(self, lengths: list[int], valid: torch.Tensor | None = None) -> slice:
        """Reserve rows ``n .. n+m-1`` holding ``lengths[i]`` tokens each (``m = len(lengths)``).

        ``valid [m, T]`` marks the real tokens (default: every filled slot). Fill the rows with
        :meth:`write_block`. Returns the row slice.
        """
        start, count = self.n, len(lengths)
        if start + count > self.rows:
            raise RuntimeError(f"KV store full: {start} + {count} rows > {self.rows}")
        if max(lengths, default=0) > self.capacity:
            raise RuntimeError(f"KV store rows hold {self.capacity} tokens, asked for {max(lengths)}")
        rows = slice(start, start + count)
        self.valid[rows] = False
        if valid is None:
            for i, length in enumerate(lengths):
                self.valid[start + i, :length] = True
            self.holes.extend([False] * count)
        else:
            valid = valid.to(self.valid.device, torch.bool)
            self.valid[rows, : valid.shape[1]] = valid
            filled = valid.sum(1).tolist()
            self.holes.extend(f != length for f, length in zip(filled, lengths, strict=True))
        self.lengths.extend(lengths)
        return rows

    def write_block(self, layer: int, rows: slice, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write ``k, v [m, H, T, D]`` into slots ``0 .. T-1`` of ``rows``."""
        t = k.shape[2]
        self.k[layer, rows, :, :t] = k
        self.v[layer, rows, :, :t] = v

    def grow(self) -> torch.Tensor | int:
        """Add one slot to every live row; returns where it is: an int when all rows share it, else a LongTensor
        ``[n]`` of slot indices on the device. Call once per step, then :meth:`write_token` per layer."""
        if self.max_length() + 1 > self.capacity:
            raise RuntimeError(f"KV store rows hold {self.capacity} tokens; a row would exceed it")
        if self.uniform():
            slot = self.lengths[0] if self.lengths else 0
            self.valid[: self.n, slot] = True
        else:
            slot = torch.tensor(self.lengths, dtype=torch.long).to(self.k.device, non_blocking=True)
            self.valid[torch.arange(self.n, device=self.k.device), slot] = True
        self.lengths = [length + 1 for length in self.lengths]
        return slot

    def write_token(self, layer: int, slot: torch.Tensor | int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write one token per live row: ``k, v [n, H, D]`` at ``slot`` (from :meth:`grow`)."""
        n = k.shape[0]
        if isinstance(slot, int):
            self.k[layer, :n, :, slot] = k
            self.v[layer, :n, :, slot] = v
        else:
            rows = torch.arange(n, device=k.device)
            self.k[layer, rows, :, slot] = k
            self.v[layer, rows, :, slot] = v

    # -- reading ------------------------------------------------------------------------------------------------
    def view(self, layer: int, full: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(k, v [n, H, T, D], key_padding_mask [n, T] or None)`` of the live rows.

        ``T`` is the longest row, or ``capacity`` when ``full`` (shape-static, for CUDA graphs). The mask is
        None when every slot in range is a real token.
        """
        n = self.n
        t = self.capacity if full else self.max_length()
        mask = self.valid[:n, :t]
        if not full and self.uniform() and not any(self.holes):
            mask = None
        return self.k[layer, :n, :, :t], self.v[layer, :n, :, :t], mask

    # -- moving rows --------------------------------------------------------------------------------------------
    def keep(self, index: list[int]) -> None:
        """The live rows become ``index`` (old row numbers in their new order; repeats allowed, for beams).

        Only the filled slots of the kept rows move; a prefix of the current rows moves nothing.
        """
        if index == list(range(len(index))):
            self.lengths, self.holes = self.lengths[: len(index)], self.holes[: len(index)]
            return
        t = max((self.lengths[i] for i in index), default=0)
        idx = torch.tensor(index, dtype=torch.long).to(self.k.device, non_blocking=True)
        m = len(index)
        if t > 0:
            self.k[:, :m, :, :t] = self.k[:, idx, :, :t]
            self.v[:, :m, :, :t] = self.v[:, idx, :, :t]
        self.valid[:m] = self.valid[idx]
        self.lengths = [self.lengths[i] for i in index]
        self.holes = [self.holes[i] for i in index]
