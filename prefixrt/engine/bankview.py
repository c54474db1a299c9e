"""A read-only view of a prefix bank at one version, held by reference.

``PrefixBank.add`` / ``remove`` never write the packed storage in place: they build new tensors and swap them in
(``PrefixBank._write_slot``). So holding a reference to the tensors of one version keeps that version readable,
at no cost, for as long as a running sequence needs it: this is how the engine lets a request finish after its
prefix was removed from the bank (see :mod:`prefixrt.engine.engine`). Views are cast once to the model's dtype
and device (a copy only when they differ).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from prefixrt.bank import PrefixBank
from prefixrt.ops import BankLayer, StepPlan

__all__ = ["BankView"]


@dataclass
class BankView:
    """The bank's entries at ``version``.

    Attributes
    ----------
    kv : dict site -> Tensor ``[layers, 2, H, S, D]``
    offsets : dict site -> LongTensor ``[slots + 1]``
    lengths : dict site -> list[int]
        Prefix length of each slot (0 for free slots).
    names : list[str | None]
        Entry name of each slot (None when free).
    """

    version: int
    kv: dict
    offsets: dict
    lengths: dict
    names: list

    @staticmethod
    def of(bank: PrefixBank, dtype: torch.dtype, device: torch.device) -> BankView:
        kv, offsets, lengths = {}, {}, {}
        for site in bank.spec.sites:
            kv[site] = bank.kv[site].detach().to(device=device, dtype=dtype)
            offsets[site] = bank.offsets(site).to(device)
            lengths[site] = bank.lengths(site).tolist()
        live = set(bank.live_ids())
        names = [bank.name_of(i) if i in live else None for i in range(bank.num_slots)]
        return BankView(bank.version, kv, offsets, lengths, names)

    def layer(self, site: str, layer: int) -> BankLayer:
        """The bank layer of one (site, layer): ``k``, ``v`` ``[H, S, D]`` views and ``offsets [slots + 1]``."""
        kv = self.kv[site]
        return BankLayer(kv[layer, 0], kv[layer, 1], self.offsets[site])

    def plan(self, site: str, prefix_ids: list[int]) -> StepPlan:
        """The step plan of rows reading ``prefix_ids`` (host ints, ``-1`` = none) at ``site``: no device sync."""
        device = self.offsets[site].device
        return StepPlan.build(torch.tensor(prefix_ids, dtype=torch.long), self.lengths[site], device=device)

    def length(self, site: str, prefix_id: int) -> int:
        """Prefix length of ``prefix_id`` at ``site`` (0 for ``-1``)."""
        return 0 if prefix_id < 0 else self.lengths[site][prefix_id]

    def is_live(self, prefix_id: int) -> bool:
        return prefix_id == -1 or (0 <= prefix_id < len(self.names) and self.names[prefix_id] is not None)

    def entry(self, site: str, prefix_id: int) -> torch.Tensor:
        """The K/V of one entry at one site, ``[layers, 2, H, P, D]`` (a view)."""
        start = int(self.offsets[site][prefix_id])
        return self.kv[site][:, :, :, start : start + self.lengths[site][prefix_id]]

    def same_entry(self, other: BankView, prefix_id: int) -> bool:
        """Whether ``prefix_id`` names the same entry with the same K/V in both views."""
        if prefix_id < 0:
            return True
        if not (self.is_live(prefix_id) and other.is_live(prefix_id)):
            return False
        if self.names[prefix_id] != other.names[prefix_id]:
            return False
        for site in self.kv:
            if self.lengths[site][prefix_id] != other.lengths[site][prefix_id]:
                return False
            if not torch.equal(self.entry(site, prefix_id), other.entry(site, prefix_id)):
                return False
        return True
