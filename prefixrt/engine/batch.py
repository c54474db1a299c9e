"""The rows decoded together: their K/V stores, per-row state, bank views and the decode plan.

Vocabulary
----------
* An **item** is one input sequence (a prompt, or a BART source).
* A **row** is one sequence being extended: a beam, one of ``num_return_sequences`` samples, or the item itself.
  Rows are kept item-major (the rows of an item are contiguous, items in order).

Two layouts
-----------
* **fused** (one row per item: greedy, sampling, every Engine request): the row's store ``"gen"`` holds its
  prompt (GPT-2) or decoder-start token (BART) followed by its generated tokens, so self-attention is one
  ``prefix_attention`` call per layer over ``[bank prefix ; prompt ; generated]`` with the prefix read from the
  bank by id inside the kernel (the C++ and Triton backends group rows by id and read each prefix once). The
  reference backend copies each row's prefix out of the bank instead; with it, the engine groups the rows by
  prefix itself (a prefix part, then the row's own part, merged by log-sum-exp), so each prefix is still
  gathered once per step, not once per row.
* **shared** (several rows per item: beam search, ``num_return_sequences``): the prompt's K/V sit once per item
  in ``"ctx"`` and are shared by its rows; ``"gen"`` holds each row's generated tokens; self-attention merges a
  prefix part (rows grouped by id), a context part (rows grouped by item) and the row's own part
  (:mod:`prefixrt.engine.attention`). The fused layout falls back to this merge while rows read two bank versions
  (an Engine request that outlives its prefix's removal).

A family with an encoder (BART) also has ``"src"``, the source's cross-attention K/V, one row per item.

The runner sees the stores only through :mod:`prefixrt.engine.context` (:meth:`Batch.prefill`,
:meth:`Batch.decode`).

The plan (who shares which prefix and item) is built on the host whenever the batch's composition changes and
reused by every layer of every step until then.
"""

from __future__ import annotations

import torch

from prefixrt import ops
from prefixrt.engine.attention import NoPrefix
from prefixrt.engine.bankview import BankView
from prefixrt.engine.context import DecodeContext, PrefillContext
from prefixrt.engine.kv import KVStore
from prefixrt.engine.plan import Grouping, PrefixGroups
from prefixrt.hf.models.base import Runner, StepInputs

__all__ = ["Batch"]

# Backends that copy each row's prefix out of the bank (the oracle); the others read it in place, grouped by id.
GATHERING_BACKENDS = frozenset({"reference"})


def _kernel_groups_prefixes(runner, backend: str) -> bool:
    """Whether the backend that will serve decode calls reads prefixes in place (grouped by id)."""
    query = torch.empty(1, runner.heads, 1, runner.head_dim, dtype=runner.dtype, device=runner.device)
    call = ops.AttentionCall.of(query, query, True, 0.0, False)
    return ops.select_backend(backend, call).name not in GATHERING_BACKENDS


class Batch:
    """Rows being decoded together over one model (see the module docstring).

    Parameters
    ----------
    runner : Runner (:mod:`prefixrt.hf.models`): the model the rows run through
    items, rows : int
        Capacity in items and rows (``rows == items`` for the fused layout).
    context : int
        Most decoder tokens per item before generation (``runner.decoder_length`` of the longest input: GPT-2's
        padded prompt, BART's start token).
    generated : int
        Most tokens fed back per row.
    source : int
        Longest source (families with an encoder; ignored otherwise).
    backend : str
        The op backend for every attention call.
    fused : bool
        The fused layout (one row per item) instead of the shared one.
    """

    def __init__(
        self, runner: Runner, *, items, rows, context, generated, source=0, backend="auto", fused=False
    ):
        if fused and rows != items:
            raise ValueError("the fused layout has one row per item")
        self.runner, self.backend, self.fused = runner, backend, fused
        self.kernel_groups_prefixes = _kernel_groups_prefixes(runner, backend)

        def store(count, capacity):
            return KVStore(
                runner.layers, count, runner.heads, capacity, runner.head_dim, runner.dtype, runner.device
            )

        if fused:
            self.stores = {"gen": store(rows, context + generated)}
        else:
            self.stores = {"ctx": store(items, context), "gen": store(rows, generated)}
        if runner.has_encoder:
            self.stores["src"] = store(items, source)
        self.item_prefix: list[int] = []
        self.item_view: list[int] = []
        self.row_item: list[int] = []
        self.row_pos: list[int] = []  # position id of the next token each row feeds (prefix shift included)
        self.views: dict[int, BankView] = {}
        self.no_prefix = NoPrefix.like(runner.heads, runner.head_dim, runner.dtype, runner.device)
        self._plan: dict | None = None

    # -- composition --------------------------------------------------------------------------------------------
    @property
    def n_items(self) -> int:
        return len(self.item_prefix)

    @property
    def n_rows(self) -> int:
        return len(self.row_item)

    @property
    def free_rows(self) -> int:
        """Rows of the pool not in use."""
        return self.stores["gen"].rows - self.n_rows

    @property
    def kv_bytes(self) -> int:
        """Bytes held by this batch's preallocated K/V stores."""
        return sum(store.nbytes for store in self.stores.values())

    def add_view(self, view: BankView) -> int:
        """Register a bank view (kept by reference while any item uses it); returns its key."""
        for key, known in self.views.items():
            if known is view:
                return key
        key = max(self.views, default=-1) + 1
        self.views[key] = view
        return key

    def prompt_store(self) -> KVStore:
        """Where a prefill writes the decoder-side K/V of new items."""
        return self.stores["gen" if self.fused else "ctx"]

    def add_items(self, prefix_ids: list[int], view_key: int, widths: list[int], next_pos: list[int]) -> None:
        """Record items just prefilled: ``widths[i]`` rows each, all feeding position ``next_pos[i]`` next."""
        first = self.n_items
        for i, (pid, width) in enumerate(zip(prefix_ids, widths, strict=True)):
            if self.fused and width != 1:
                raise ValueError("the fused layout has one row per item")
            self.item_prefix.append(pid)
            self.item_view.append(view_key)
            self.row_item.extend([first + i] * width)
            self.row_pos.extend([next_pos[i]] * width)
            if not self.fused:
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
        changed = new_row_item != self.row_item or len(items) != self.n_items
        self.row_item = new_row_item
        self.row_pos = [self.row_pos[r] for r in rows]
        self.item_prefix = [self.item_prefix[i] for i in items]
        self.item_view = [self.item_view[i] for i in items]
        self.drop_unused_views()
        if changed:
            self._plan = None

    def set_item_view(self, item: int, view_key: int) -> None:
        if self.item_view[item] != view_key:
            self.item_view[item] = view_key
            self._plan = None

    def drop_unused_views(self) -> None:
        used = set(self.item_view)
        for key in [k for k in self.views if k not in used]:
            del self.views[key]

    def move_to(self, view: BankView) -> int:
        """Register ``view`` and move every item whose entry is the same in it (same name, lengths and K/V);
        the others keep reading their old view. Returns the view's key."""
        key = self.add_view(view)
        for item in range(self.n_items):
            old = self.views[self.item_view[item]]
            if old is not view and view.same_entry(old, self.item_prefix[item]):
                self.set_item_view(item, key)
        self.drop_unused_views()
        return key

    # -- planning -----------------------------------------------------------------------------------------------
    def plan(self) -> dict:
        """Cached until the batch changes: ``prefix`` (site -> PrefixGroups or None), ``items`` (Grouping of
        rows by item, or None when row ``r`` is item ``r``), ``ids`` (LongTensor ``[n]`` of row prefix ids),
        ``view`` (the single view key, or None when rows read several)."""
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
                prefix[site] = PrefixGroups.of(
                    ids,
                    row_view,
                    device,
                    lambda key, group_ids, site=site: self.views[key].plan(site, group_ids),
                )
            one_row_per_item = self.row_item == list(range(self.n_items))
            view = row_view[0] if len(set(row_view)) == 1 else None
            self._plan = {
                "prefix": prefix,
                "items": None if one_row_per_item else Grouping.of(self.row_item, self.n_items, device),
                "steps": {}
                if view is None
                else {site: self.views[view].plan(site, row_prefix) for site in self.runner.decode_sites},
                "view": view,
            }
        return self._plan

    # -- stepping -----------------------------------------------------------------------------------------------
    def prefill(
        self,
        input_ids: torch.Tensor,
        mask: torch.Tensor | None,
        decoder_ids: torch.Tensor,
        shifts: list[int],
        prefix_ids: list[int],
        view_key: int,
        widths: list[int],
    ) -> torch.Tensor:
        """Run new inputs through the runner and add them as items.

        Parameters
        ----------
        input_ids : LongTensor ``[R, T]``: prompts (left-padded) or, with an encoder, sources
        mask : BoolTensor ``[R, T]`` or None (no padding)
        decoder_ids : LongTensor ``[R, T']``: ``runner.decoder_prompt(input_ids, config)``
        shifts : each item's decoder position shift (its decoder-prefix length, or 0)
        prefix_ids : R bank ids (``-1`` = none), read from the view ``view_key`` (:meth:`add_view`)
        widths : rows to open per item (beams / samples)

        Returns
        -------
        logits : Tensor ``[R, V]`` for the last decoder position.
        """
        runner = self.runner
        items, length = decoder_ids.shape
        if runner.has_encoder:
            decoder_mask, source, source_mask = None, input_ids, mask
        else:
            decoder_mask, source, source_mask = mask, None, None
        device = decoder_ids.device
        shift = torch.tensor(shifts, dtype=torch.long, device=device)[:, None]
        if decoder_mask is None:
            positions = torch.arange(length, device=device)[None] + shift
        else:  # padding-aware, as HF generate() computes them
            m = decoder_mask.long()
            positions = (m.cumsum(-1) - 1).masked_fill(m == 0, 0) + shift
        prompt_rows = self.prompt_store().append_rows([length] * items, valid=decoder_mask)
        source_rows = None
        if source is not None:
            source_rows = self.stores["src"].append_rows([source.shape[1]] * items, valid=source_mask)
        cache = PrefillContext(self, self.views[view_key], prefix_ids, prompt_rows, source_rows)
        logits = runner.prefill(StepInputs(cache, decoder_ids, positions, decoder_mask, source, source_mask))
        self.add_items(prefix_ids, view_key, widths, (positions[:, -1] + 1).tolist())
        return logits

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row (``tokens [n]``); returns the next-token logits ``[n, V]``."""
        positions = torch.tensor(self.row_pos, dtype=torch.long).to(self.runner.device, non_blocking=True)
        slot = self.stores["gen"].grow()
        logits = self.run_decode(tokens, positions, slot)
        self.row_pos = [p + 1 for p in self.row_pos]
        return logits

    def run_decode(
        self, tokens: torch.Tensor, positions: torch.Tensor, slot, full: bool = False
    ) -> torch.Tensor:
        """The runner's decode of ``tokens [n]`` at ``positions [n]``, this step's K/V going to ``slot`` (from
        ``stores["gen"].grow()``); ``full``: static shapes (:mod:`prefixrt.engine.capture`)."""
        return self.runner.decode(StepInputs(DecodeContext(self, slot, full), tokens, positions))
