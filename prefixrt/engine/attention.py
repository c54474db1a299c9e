"""Decode attention as a merge of partial attentions, each computed by ``prefixrt.ops.prefix_attention``.

A decoding row's keys are ``[bank prefix ; context ; generated]``:

* the **bank prefix** is shared by every row with the same prefix id: their queries are gathered into one
  ``[groups, H, W, D]`` call with no own keys, so each distinct prefix is read once per step;
* the **context** (a GPT-2 prompt, BART's decoder-start token, BART's encoder output for cross-attention) is
  shared by the beams or samples of one item: one call with the item's queries ``[items, H, W, D]``;
* the **generated** tokens belong to one row: one call ``[rows, H, 1, D]``.

The parts are merged with their log-sum-exps (natural log, fp32): ``out = sum_i w_i o_i / sum_i w_i`` with
``w_i = exp(lse_i - max_j lse_j)``. A part a row cannot see (no prefix, id ``-1``) has ``lse = -inf`` and
weight 0. Every call goes through the op (:func:`attend`, the engine's one call of it), so whichever backend serves
it (reference, C++, Triton) plugs in.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from prefixrt import ops
from prefixrt.engine.plan import Grouping, PrefixGroups
from prefixrt.ops import BankLayer, StepPlan

__all__ = ["NoPrefix", "OwnPart", "PrefixPart", "SharedPart", "attend", "decode_attention", "merge_partials"]


@dataclass
class PrefixPart:
    """The bank prefixes of one (site, layer): ``banks[view]`` is that view's BankLayer (``[H, S, D]``)."""

    plan: PrefixGroups
    banks: dict


@dataclass
class SharedPart:
    """Keys shared by the rows of an item: ``k, v [items, H, T, D]``, ``mask [items, T]`` or None;
    ``grouping`` maps rows to items (None when row ``r`` is item ``r``)."""

    k: torch.Tensor
    v: torch.Tensor
    mask: torch.Tensor | None
    grouping: Grouping | None


@dataclass
class OwnPart:
    """Keys of each row alone: ``k, v [n, H, T, D]``, ``mask [n, T]`` or None."""

    k: torch.Tensor
    v: torch.Tensor
    mask: torch.Tensor | None


@dataclass(frozen=True)
class NoPrefix:
    """What the calls without a prefix read: an empty bank layer and a plan of ``-1`` rows per row count."""

    bank: BankLayer
    plans: dict  # rows -> StepPlan

    @staticmethod
    def like(heads: int, head_dim: int, dtype: torch.dtype, device) -> NoPrefix:
        empty = torch.empty(heads, 0, head_dim, dtype=dtype, device=device)
        return NoPrefix(BankLayer(empty, empty, torch.zeros(1, dtype=torch.long, device=device)), {})

    def plan(self, rows: int) -> StepPlan:
        if rows not in self.plans:
            ids = torch.full((rows,), -1, dtype=torch.long)
            self.plans[rows] = StepPlan.build(ids, [], device=self.bank.offsets.device)
        return self.plans[rows]


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bank: BankLayer,
    plan: StepPlan,
    *,
    mask: torch.Tensor | None,
    causal: bool,
    scale: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The engine's one call of the op: ``q [B, H, Tq, D]`` over ``[bank prefix ; k]``.

    ``k, v [B, H, Tk, D]``; ``bank`` the BankLayer of one (site, layer) (``[H, S, D]``); ``plan`` the step's
    plan of those rows; ``mask [B, Tk]`` or None. Returns ``(out [B, H, Tq, D], lse [B, H, Tq] fp32)``.
    """
    return ops.prefix_attention(
        q, k, v, bank, plan, key_padding_mask=mask, causal=causal, scale=scale, backend=backend
    )


def _call(q, k, v, bank: BankLayer, plan: StepPlan, mask, scale, backend):
    """A non-causal partial attention (the parts are merged by log-sum-exp)."""
    return attend(q, k, v, bank, plan, mask=mask, causal=False, scale=scale, backend=backend)


def decode_attention(
    q: torch.Tensor,
    prefix: PrefixPart | None,
    shared: SharedPart | None,
    own: OwnPart | None,
    none: NoPrefix,
    scale: float,
    backend: str,
) -> torch.Tensor:
    """Attention of one query per row over its prefix, shared context and own keys.

    Parameters
    ----------
    q : Tensor ``[n, H, D]``
    prefix, shared, own : the parts (any may be None)
    none : the empty bank and ``-1`` plans the calls without a prefix read
    scale : float
    backend : str

    Returns
    -------
    Tensor ``[n, H, D]`` in ``q.dtype``.
    """
    n = q.shape[0]
    partials = []
    if prefix is not None:
        partials.append(_prefix_partial(q, prefix, scale, backend))
    if shared is not None:
        if shared.grouping is None:
            out, lse = _call(
                q[:, :, None], shared.k, shared.v, none.bank, none.plan(n), shared.mask, scale, backend
            )
            partials.append((out[:, :, 0], lse[:, :, 0]))
        else:
            qg = shared.grouping.to_groups(q)
            out, lse = _call(
                qg, shared.k, shared.v, none.bank, none.plan(qg.shape[0]), shared.mask, scale, backend
            )
            partials.append(shared.grouping.to_rows(out, lse))
    if own is not None:
        out, lse = _call(q[:, :, None], own.k, own.v, none.bank, none.plan(n), own.mask, scale, backend)
        partials.append((out[:, :, 0], lse[:, :, 0]))
    return merge_partials(partials).to(q.dtype)


def _prefix_partial(q, prefix: PrefixPart, scale, backend):
    plan = prefix.plan
    rows_q = q if plan.rows is None else q[plan.rows]
    qg = plan.grouping.to_groups(rows_q)  # [G, H, W, D]
    groups = qg.shape[0]
    empty = q.new_empty(groups, q.shape[1], 0, q.shape[2])
    if len(plan.views) == 1:
        view, _, step = plan.views[0]
        out, lse = _call(qg, empty, empty, prefix.banks[view], step, None, scale, backend)
    else:
        out = q.new_zeros(qg.shape)
        lse = torch.full(qg.shape[:3], float("-inf"), device=q.device)
        for view, sel, step in plan.views:
            o, s = _call(qg[sel], empty[sel], empty[sel], prefix.banks[view], step, None, scale, backend)
            out[sel], lse[sel] = o, s
    out, lse = plan.grouping.to_rows(out, lse)
    if plan.rows is None:
        return out, lse
    full_out = q.new_zeros(q.shape)
    full_lse = torch.full(q.shape[:2], float("-inf"), device=q.device)
    full_out[plan.rows], full_lse[plan.rows] = out, lse
    return full_out, full_lse


def merge_partials(partials: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Merge partial attentions ``(out [n, H, D], lse [n, H])`` by log-sum-exp; returns fp32 ``[n, H, D]``.

    A row that sees no key in any part gets 0 (never NaN).

    >>> import torch
    >>> out = merge_partials([(torch.ones(1, 1, 2), torch.zeros(1, 1)), (3 * torch.ones(1, 1, 2), torch.zeros(1, 1))])
    >>> out.tolist()
    [[[2.0, 2.0]]]
    """
    if len(partials) == 1:
        return partials[0][0].float()
    lses = torch.stack([lse for _, lse in partials])  # [parts, n, H]
    top = lses.max(0).values
    top = torch.where(torch.isinf(top), torch.zeros_like(top), top)
    weights = torch.exp(lses - top)  # exp(-inf) = 0 for parts a row cannot see
    total = weights.sum(0)
    out = sum(w[..., None] * o.float() for w, (o, _) in zip(weights, partials, strict=True))
    return out / torch.where(total == 0, torch.ones_like(total), total)[..., None]
