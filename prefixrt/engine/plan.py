"""Decode planning: which rows share what, computed once per change of the batch and reused by every layer.

Decode attention splits each row's keys into parts that are shared at different granularities (see
:mod:`prefixrt.engine.attention`): the bank prefix is shared by every row with the same prefix id, the prompt by
the beams (or samples) of one item, the generated tokens by nobody. A :class:`Grouping` gathers the one query of
each row into ``[groups, H, W, D]`` so the shared keys are read once per group (Hydragen / cascade attention), and
scatters the results back to rows.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from prefixrt.ops import StepPlan

__all__ = ["Grouping", "PrefixGroups"]


@dataclass
class Grouping:
    """Rows ``0 .. n-1`` gathered into ``G`` groups of up to ``W`` queries.

    Attributes
    ----------
    n, num_groups, width : int
    gather : LongTensor ``[G, W]`` or None
        Row of each (group, slot); ``n`` (a zero row) pads short groups. None when the rows already are the
        groups laid out in order (``n == G * W``, group ``g`` = rows ``g*W .. g*W+W-1``): a free reshape.
    scatter : LongTensor ``[n]`` or None
        Flat ``g * W + j`` of each row (None with ``gather``).
    """

    n: int
    num_groups: int
    width: int
    gather: torch.Tensor | None
    scatter: torch.Tensor | None

    @staticmethod
    def of(group_of_row: list[int], num_groups: int, device) -> Grouping:
        """Group rows by ``group_of_row[r]`` in ``0 .. num_groups-1`` (each group must have a row)."""
        n = len(group_of_row)
        members: list[list[int]] = [[] for _ in range(num_groups)]
        for row, g in enumerate(group_of_row):
            members[g].append(row)
        width = max((len(m) for m in members), default=0)
        in_order = all(m == list(range(g * width, (g + 1) * width)) for g, m in enumerate(members))
        if n == num_groups * width and in_order:
            return Grouping(n, num_groups, width, None, None)
        gather = torch.full((num_groups, width), n, dtype=torch.long)
        scatter = torch.empty(n, dtype=torch.long)
        for g, rows in enumerate(members):
            for j, row in enumerate(rows):
                gather[g, j] = row
                scatter[row] = g * width + j
        return Grouping(n, num_groups, width, gather.to(device), scatter.to(device))

    def to_groups(self, q: torch.Tensor) -> torch.Tensor:
        """``q [n, H, D]`` -> ``[G, H, W, D]`` (padding slots are zero queries)."""
        if self.gather is None:
            return q.view(self.num_groups, self.width, *q.shape[1:]).transpose(1, 2)
        padded = torch.cat([q, q.new_zeros(1, *q.shape[1:])])
        return padded[self.gather].transpose(1, 2)

    def to_rows(self, out: torch.Tensor, lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``out [G, H, W, D]``, ``lse [G, H, W]`` -> ``[n, H, D]``, ``[n, H]``."""
        groups, heads, width, head_dim = out.shape
        out = out.transpose(1, 2).reshape(groups * width, heads, head_dim)
        lse = lse.transpose(1, 2).reshape(groups * width, heads)
        if self.scatter is None:
            return out, lse
        return out[self.scatter], lse[self.scatter]


@dataclass
class PrefixGroups:
    """Rows that read a bank prefix, grouped by (bank view, prefix id).

    Attributes
    ----------
    rows : LongTensor ``[m]`` or None
        The rows that have a prefix (None: all ``n`` rows do).
    grouping : Grouping
        Over those ``m`` rows.
    ids : LongTensor ``[G]``
        The prefix id of each group.
    views : list[tuple[int, LongTensor | None, StepPlan]]
        ``(view key, groups of that view or None for all, the op's plan for those groups' ids)``; usually one
        entry.
    """

    n: int
    rows: torch.Tensor | None
    grouping: Grouping
    ids: torch.Tensor
    views: list

    @staticmethod
    def of(
        prefix_ids: list[int], view_keys: list[int], device, plan_for: Callable[[int, list[int]], StepPlan]
    ) -> PrefixGroups | None:
        """Plan for rows with ids ``prefix_ids`` read from views ``view_keys``; None if no row has a prefix.
        ``plan_for(view_key, group_ids)`` builds the op's :class:`~prefixrt.ops.StepPlan` of a view's groups."""
        with_prefix = [r for r, pid in enumerate(prefix_ids) if pid >= 0]
        if not with_prefix:
            return None
        keys = sorted({(view_keys[r], prefix_ids[r]) for r in with_prefix})
        index = {key: g for g, key in enumerate(keys)}
        group_of_row = [index[(view_keys[r], prefix_ids[r])] for r in with_prefix]
        grouping = Grouping.of(group_of_row, len(keys), device)
        ids = torch.tensor([pid for _, pid in keys], dtype=torch.long, device=device)
        view_set = sorted({v for v, _ in keys})
        if len(view_set) == 1:
            views = [(view_set[0], None, plan_for(view_set[0], [pid for _, pid in keys]))]
        else:
            views = []
            for v in view_set:
                mine = [g for g, key in enumerate(keys) if key[0] == v]
                sel = torch.tensor(mine, dtype=torch.long, device=device)
                views.append((v, sel, plan_for(v, [keys[g][1] for g in mine])))
        rows = None if len(with_prefix) == len(prefix_ids) else torch.tensor(with_prefix, device=device)
        return PrefixGroups(len(prefix_ids), rows, grouping, ids, views)
