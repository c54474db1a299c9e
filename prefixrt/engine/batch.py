"""The rows decoded together: their K/V stores, per-row state, bank views and the decode plan.

Vocabulary
----------
* An **item** is one input sequence (a prompt, or a BART source). Its K/V (the prompt's, or the source's
  cross-attention K/V and the decoder-start token's) are written once into the per-item stores.
* A **row** is one sequence being extended: the beams of an item in beam search, the samples of an item with
  ``num_return_sequences``, or just the item itself. Rows are kept item-major (the rows of item ``i`` are
  contiguous and items appear in order), so "rows of an item" is a slice and the per-item K/V are shared by
  index, never copied per row.

The plan (which rows share a prefix, which rows share an item) is built on the host from these lists whenever
the composition of the batch changes, and reused by every layer of every step until then.
"""

from __future__ import annotations

import torch

from prefixrt.engine.attention import OwnPart, PrefixPart, SharedPart
from prefixrt.engine.bankview import BankView
from prefixrt.engine.kv import KVStore
from prefixrt.engine.plan import Grouping, PrefixGroups

__all__ = ["Batch"]


class Batch:
    """Rows being decoded together over one model (see the module docstring).

    Parameters
    ----------
    runner : GPT2Runner or BartRunner
    stores : dict name -> KVStore
        Per-item stores (``runner.item_stores``) and the per-row store ``"gen"``.
    backend : str
        The op backend for every attention call.
    """

    def __init__(self, runner, stores: dict, backend: str):
        self.runner = runner
        self.stores = stores
        self.backend = backend
        self.item_prefix: list[int] = []
        self.item_view: list[int] = []
        self.row_item: list[int] = []
        self.row_pos: list[int] = []  # position id of the next token each row feeds (prefix shift included)
        self.views: dict[int, BankView] = {}
        self._plan: dict | None = None

    # -- composition --------------------------------------------------------------------------------------------
    @property
    def n_items(self) -> int:
        return len(self.item_prefix)

    @property
    def n_rows(self) -> int:
        return len(self.row_item)

    def add_view(self, view: BankView) -> int:
        """Register a bank view (kept by reference while any item uses it); returns its key."""
        for key, known in self.views.items():
            if known is view:
                return key
        key = max(self.views, default=-1) + 1
        self.views[key] = view
        return key

    def add_items(self, prefix_ids: list[int], view_key: int, widths: list[int], next_pos: list[int]) -> None:
        """Record items whose per-item K/V were just written: ``widths[i]`` rows each, all feeding position
        ``next_pos[i]`` next. Their rows start with no generated tokens."""
        first = self.n_items
        for i, (pid, width) in enumerate(zip(prefix_ids, widths, strict=True)):
            self.item_prefix.append(pid)
            self.item_view.append(view_key)
            self.row_item.extend([first + i] * width)
            self.row_pos.extend([next_pos[i]] * width)
            self.stores["gen"].append_rows([0] * width)
        self._plan = None

    def keep(self, rows: list[int]) -> None:
        """Keep these rows (old indices; item-major order; repeats within an item allowed, for beams).
        Items left without rows are dropped; the stores are compacted."""
        items = sorted({self.row_item[r] for r in rows})
        remap = {old: new for new, old in enumerate(items)}
        for name, store in self.stores.items():
            store.keep(rows if name == "gen" else items)
        new_row_item = [remap[self.row_item[r]] for r in rows]
        composition_changed = new_row_item != self.row_item or len(items) != self.n_items
        self.row_item = new_row_item
        self.row_pos = [self.row_pos[r] for r in rows]
        self.item_prefix = [self.item_prefix[i] for i in items]
        self.item_view = [self.item_view[i] for i in items]
        self.drop_unused_views()
        if composition_changed:
            self._plan = None

    def set_item_view(self, item: int, view_key: int) -> None:
        if self.item_view[item] != view_key:
            self.item_view[item] = view_key
            self._plan = None

    def drop_unused_views(self) -> None:
        used = set(self.item_view)
        for key in [k for k in self.views if k not in used]:
            del self.views[key]

    # -- planning -----------------------------------------------------------------------------------------------
    def plan(self) -> dict:
        """``{"prefix": {site: PrefixGroups or None}, "items": Grouping or None}``, cached until the batch
        changes."""
        if self._plan is None:
            device = self.runner.device
            row_prefix = [self.item_prefix[i] for i in self.row_item]
            row_view = [self.item_view[i] for i in self.row_item]
            prefix = {}
            for site in self.runner.decode_sites:
                ids = [
                    pid if pid >= 0 and self.views[v].length(site, pid) > 0 else -1
                    for pid, v in zip(row_prefix, row_view, strict=True)
                ]
                prefix[site] = PrefixGroups.of(ids, row_view, device)
            one_row_per_item = self.row_item == list(range(self.n_items))
            items = None if one_row_per_item else Grouping.of(self.row_item, self.n_items, device)
            self._plan = {"prefix": prefix, "items": items}
        return self._plan

    def prefix_part(self, site: str, layer: int) -> PrefixPart | None:
        plan = self.plan()["prefix"][site]
        if plan is None:
            return None
        return PrefixPart(plan, {key: self.views[key].layer(site, layer) for key, _ in plan.views})

    def shared_part(self, store: str, layer: int, full: bool = False) -> SharedPart:
        k, v, mask = self.stores[store].view(layer, full)
        return SharedPart(k, v, mask, self.plan()["items"])

    def own_part(self, layer: int, full: bool = False) -> OwnPart:
        k, v, mask = self.stores["gen"].view(layer, full)
        return OwnPart(k, v, mask)

    def any_bank(self, site: str, layer: int) -> tuple:
        """Some view's bank tensors for ``(site, layer)``, for the calls that read no prefix (ids ``-1``)."""
        return next(iter(self.views.values())).layer(site, layer)

    # -- stepping -----------------------------------------------------------------------------------------------
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row (``tokens [n]``); returns the next-token logits ``[n, V]``."""
        positions = torch.tensor(self.row_pos, dtype=torch.long).to(self.runner.device, non_blocking=True)
        slot = self.stores["gen"].grow()
        logits = self.runner.decode(self, tokens, positions, slot)
        self.row_pos = [p + 1 for p in self.row_pos]
        return logits

    @property
    def kv_bytes(self) -> int:
        """Bytes held by this batch's preallocated K/V stores."""
        return sum(store.nbytes for store in self.stores.values())


def make_store(runner, layers: int, rows: int, capacity: int) -> KVStore:
    return KVStore(layers, rows, runner.heads, capacity, runner.head_dim, runner.dtype, runner.device)
