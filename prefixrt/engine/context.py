"""The K/V cache and attention a runner sees: :class:`PrefillContext` and :class:`DecodeContext` over a Batch.

They implement :class:`~prefixrt.hf.models.base.PrefillCache` and :class:`~prefixrt.hf.models.base.DecodeCache`,
so a runner (``prefixrt.hf.models``) writes K/V and asks for attention by (site, layer) without knowing the
stores, the bank views or the decode plan of :class:`~prefixrt.engine.batch.Batch`.

Decode attention, per layer:

* **one op call** when the batch is fused (one row per item), all rows read one bank view, and the backend
  reads prefixes in place by id: ``[bank prefix ; prompt ; generated]`` of each row in a single call;
* otherwise the **merge** of a prefix part (rows grouped by prefix id), a context part (rows grouped by item:
  the shared layout's prompt, or BART's source) and the row's own part (:mod:`prefixrt.engine.attention`).
"""

from __future__ import annotations

import torch

from prefixrt.engine.attention import OwnPart, PrefixPart, SharedPart, attend, decode_attention
from prefixrt.engine.bankview import BankView
from prefixrt.ops import StepPlan

__all__ = ["DecodeContext", "PrefillContext"]


class PrefillContext:
    """New items of ``batch``, their rows already reserved (``prompt_rows`` in the prompt store, ``source_rows``
    in ``"src"``); prefixes are read from ``view`` with ids ``prefix_ids`` (R host ints), planned once per site
    for every layer."""

    def __init__(
        self,
        batch,
        view: BankView,
        prefix_ids: list[int],
        prompt_rows: slice,
        source_rows: slice | None,
    ):
        self.batch, self.view, self.prefix_ids = batch, view, prefix_ids
        self.prompt_rows, self.source_rows = prompt_rows, source_rows
        self._plans: dict[str, StepPlan] = {}

    def plan(self, site: str) -> StepPlan:
        if site not in self._plans:
            self._plans[site] = self.view.plan(site, self.prefix_ids)
        return self._plans[site]

    def write_prompt(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """``k, v [R, H, T, D]``."""
        self.batch.prompt_store().write_block(layer, self.prompt_rows, k, v)

    def write_source(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """``k, v [R, H, Ts, D]``."""
        self.batch.stores["src"].write_block(layer, self.source_rows, k, v)

    def attention(self, q, k, v, site: str, layer: int, scale: float, *, mask, causal: bool) -> torch.Tensor:
        """``q [R, H, Tq, D]`` over ``[bank prefix ; k]`` -> ``[R, H, Tq, D]``."""
        out, _ = attend(
            q,
            k,
            v,
            self.view.layer(site, layer),
            self.plan(site),
            mask=mask,
            causal=causal,
            scale=scale,
            backend=self.batch.backend,
        )
        return out


class DecodeContext:
    """One decode step of ``batch``: this step's token goes to ``slot`` of every row's ``"gen"`` store (from
    ``KVStore.grow``: an int, or LongTensor ``[n]``); ``full`` reads the stores at full capacity (static shapes,
    for CUDA graphs)."""

    def __init__(self, batch, slot, full: bool = False):
        self.batch, self.slot, self.full = batch, slot, full

    def write_token(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """``k, v [n, H, D]``."""
        self.batch.stores["gen"].write_token(layer, self.slot, k, v)

    def self_attention(self, q: torch.Tensor, layer: int, scale: float) -> torch.Tensor:
        """``q [n, H, D]`` over ``[decoder prefix ; context ; generated]`` -> ``[n, H, D]``."""
        b = self.batch
        plan = b.plan()
        k, v, mask = b.stores["gen"].view(layer, self.full)
        if self._single_call(plan):
            return self._one_call(q, k, v, mask, "decoder", layer, scale, causal=True)
        shared = None
        if not b.fused:
            ck, cv, cmask = b.stores["ctx"].view(layer, self.full)
            shared = SharedPart(ck, cv, cmask, plan["items"])
        return decode_attention(
            q, self._prefix_part("decoder", layer), shared, OwnPart(k, v, mask), b.no_prefix, scale, b.backend
        )

    def cross_attention(self, q: torch.Tensor, layer: int, scale: float) -> torch.Tensor:
        """``q [n, H, D]`` over ``[cross prefix ; source]`` -> ``[n, H, D]``."""
        b = self.batch
        plan = b.plan()
        k, v, mask = b.stores["src"].view(layer, self.full)
        if self._single_call(plan):
            return self._one_call(q, k, v, mask, "cross", layer, scale, causal=False)
        prefix = self._prefix_part("cross", layer)
        if b.fused:  # rows are items: the source is the row's own part
            return decode_attention(q, prefix, None, OwnPart(k, v, mask), b.no_prefix, scale, b.backend)
        return decode_attention(
            q, prefix, SharedPart(k, v, mask, plan["items"]), None, b.no_prefix, scale, b.backend
        )

    # -- helpers ------------------------------------------------------------------------------------------------
    def _single_call(self, plan: dict) -> bool:
        """One op call per layer: fused layout, one bank view, and a kernel that reads prefixes by id."""
        b = self.batch
        return b.fused and plan["view"] is not None and b.kernel_groups_prefixes

    def _one_call(self, q, k, v, mask, site: str, layer: int, scale: float, causal: bool) -> torch.Tensor:
        b = self.batch
        plan = b.plan()
        bank = b.views[plan["view"]].layer(site, layer)
        out, _ = attend(
            q[:, :, None],
            k,
            v,
            bank,
            plan["steps"][site],
            mask=mask,
            causal=causal,
            scale=scale,
            backend=b.backend,
        )
        return out[:, :, 0]

    def _prefix_part(self, site: str, layer: int) -> PrefixPart | None:
        b = self.batch
        plan = b.plan()["prefix"][site]
        if plan is None:
            return None
        return PrefixPart(plan, {key: b.views[key].layer(site, layer) for key, *_ in plan.views})
