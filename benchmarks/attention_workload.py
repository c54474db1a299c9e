"""The attention benchmarks' workload, and the PEFT-style baselines they measure prefixrt against.

One call is one :class:`prefixrt.ops.AttentionArgs`: ``rows`` rows over ``prefixes`` bank entries of
``prefix_len`` tokens each (row ``b`` reads entry ``b % prefixes``: ids interleaved, the rows that share a
prefix lie ``prefixes`` apart), built by :func:`make_args` with its plan (``StepPlan.build``, once, outside any
timed region, as a model plans once per step for all its layers).

The baselines do what PEFT does with a prefix: copy each row's prefix out of the bank and concatenate it with the
row's own keys (:func:`gather_concat`; the gather is inside the timed region unless its result is handed over),
then run HF-eager-style attention (:func:`eager_concat`: matmul, additive mask, softmax in fp32, matmul) or
PyTorch SDPA (:func:`sdpa_concat`: what HF's default "sdpa" attention calls).

>>> args = make_args(rows=4, prefixes=2, prefix_len=3, q_len=5, k_len=5, heads=2, head_dim=8)
>>> tuple(args.q.shape), tuple(args.bank.k.shape), args.prefix_ids.tolist()
((4, 2, 5, 8), (2, 6, 8), [0, 1, 0, 1])
>>> out, lse = public_op(args, "reference")
>>> torch.testing.assert_close(out, eager_concat(args, prefix_len=3), atol=1e-5, rtol=1e-5)
>>> flops(args, prefix_len=3)  # 4 * D = 32 per visible pair and head: 4 rows * 2 heads * (5 * 3 + 15) pairs
7680.0
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from prefixrt import ops

__all__ = [
    "KV_LAYOUTS",
    "Concatenated",
    "bytes_moved",
    "eager_concat",
    "flops",
    "gather_concat",
    "make_args",
    "public_op",
    "sdpa_concat",
    "with_leaves",
]

# How the own K/V are laid out: "contiguous" ``[B, H, Tk, D]`` (a KV cache) or "transposed", views of
# ``[B, Tk, H, D]`` (fresh projections, as HF hands them to attention).
KV_LAYOUTS = ("contiguous", "transposed")
# What gather_concat returns: keys, values [B, H, P + Tk, D] and the visibility [Tq, P + Tk] (or None).
Concatenated = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]


def make_args(
    *,
    rows: int,
    prefixes: int,
    prefix_len: int,
    q_len: int,
    k_len: int,
    heads: int,
    head_dim: int,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    causal: bool = True,
    kv_layout: str = "contiguous",
    requires_grad: bool = False,
    seed: int = 0,
) -> ops.AttentionArgs:
    """One prefix-attention call with random values (drawn in fp32 on the CPU from ``seed``, then converted).

    Returns
    -------
    AttentionArgs
        ``q [rows, heads, q_len, head_dim]`` (contiguous); ``k, v [rows, heads, k_len, head_dim]`` laid out as
        ``kv_layout`` says (see :data:`KV_LAYOUTS`); the bank ``[heads, prefixes * prefix_len, head_dim]`` with
        offsets ``[0, P, 2P, ...]``; the plan of ``prefix_ids = arange(rows) % prefixes``; no key padding mask;
        scale ``head_dim ** -0.5``. With ``requires_grad`` the five tensors are leaves that require grad (with
        the same strides).
    """
    if kv_layout not in KV_LAYOUTS:
        raise ValueError(f"kv_layout must be one of {KV_LAYOUTS}, got {kv_layout!r}")
    g = torch.Generator(device="cpu").manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    def own() -> torch.Tensor:  # [B, H, Tk, D]
        if kv_layout == "contiguous":
            return randn(rows, heads, k_len, head_dim)
        return randn(rows, k_len, heads, head_dim).transpose(1, 2)

    q = randn(rows, heads, q_len, head_dim)
    k, v = own(), own()
    bank_k, bank_v = (randn(heads, prefixes * prefix_len, head_dim) for _ in range(2))  # [H, N * P, D]
    offsets = torch.arange(prefixes + 1, device=device) * prefix_len  # [N + 1]
    prefix_ids = torch.arange(rows, device=device) % prefixes  # [B]
    bank = ops.BankLayer(bank_k, bank_v, offsets)
    plan = ops.StepPlan.build(prefix_ids, [prefix_len] * prefixes)
    args = ops.AttentionArgs(q, k, v, bank, plan, None, causal, head_dim**-0.5)
    return with_leaves(args) if requires_grad else args


def with_leaves(args: ops.AttentionArgs) -> ops.AttentionArgs:
    """The same call on fresh leaves that require grad (``detach().requires_grad_()``: same values, same
    strides) for q, k, v and the bank's K/V."""
    q, k, v, bank_k, bank_v = (
        t.detach().requires_grad_(True) for t in (args.q, args.k, args.v, args.bank.k, args.bank.v)
    )
    return args.with_tensors(q, k, v, ops.BankLayer(bank_k, bank_v, args.bank.offsets))


def public_op(args: ops.AttentionArgs, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``ops.prefix_attention`` on this call with one backend: ``(out [B, H, Tq, D], lse [B, H, Tq] fp32)``."""
    return ops.prefix_attention(
        args.q, args.k, args.v, args.bank, args.plan, args.key_padding_mask, args.causal, args.scale,
        backend=backend,
    )  # fmt: skip


# -- what the call must compute and move --------------------------------------------------------------------------
def flops(args: ops.AttentionArgs, prefix_len: int) -> float:
    """Forward FLOPs over the visible (query, key) pairs: ``4 * D`` per pair and head (``QK^T`` and ``PV``);
    every query sees its whole prefix, and its own keys up to the bottom-right aligned causal cut."""
    b, h, tq, d = args.q.shape
    tk = args.k.shape[2]
    own = sum(max(0, min(tk, i + 1 + tk - tq)) for i in range(tq)) if args.causal else tq * tk
    return 4.0 * d * h * b * (tq * prefix_len + own)


def bytes_moved(args: ops.AttentionArgs, prefix_len: int) -> float:
    """Bytes that must move at the least: each distinct prefix's K/V once (a kernel that groups rows by prefix
    reads it once), each row's own K/V, q and out."""
    b, h, tq, d = args.q.shape
    distinct = args.plan.n_used  # entries some row reads (counted when the plan was built: no sync here)
    return args.q.element_size() * h * d * (2 * distinct * prefix_len + 2 * b * args.k.shape[2] + 2 * b * tq)


# -- the PEFT-style baselines -------------------------------------------------------------------------------------
def gather_concat(args: ops.AttentionArgs, prefix_len: int) -> Concatenated:
    """Each row's prefix copied out of the bank in front of its own keys.

    Returns
    -------
    keys, values : Tensor ``[B, H, P + Tk, D]``
    visible : BoolTensor ``[Tq, P + Tk]`` (True = attend), or None when every key is visible (not causal, or a
        single query, which sees its whole cache)
    """
    q, device = args.q, args.q.device
    index = args.bank.offsets[args.prefix_ids][:, None] + torch.arange(prefix_len, device=device)  # [B, P]
    keys = torch.cat([args.bank.k[:, index].transpose(0, 1), args.k], dim=2)  # [B, H, P + Tk, D]
    values = torch.cat([args.bank.v[:, index].transpose(0, 1), args.v], dim=2)
    tq, tk = q.shape[2], args.k.shape[2]
    if not args.causal or tq == 1:
        return keys, values, None
    own = torch.ones(tq, tk, dtype=torch.bool, device=device).tril(tk - tq)
    visible = torch.cat([torch.ones(tq, prefix_len, dtype=torch.bool, device=device), own], dim=1)
    return keys, values, visible


def eager_concat(
    args: ops.AttentionArgs, prefix_len: int, concat: Concatenated | None = None
) -> torch.Tensor:
    """HF eager attention on the concatenated K/V: matmul, additive mask, softmax in fp32, matmul.

    ``concat`` is :func:`gather_concat`'s result when it was made beforehand (a PEFT-style cache that already
    holds a copy of the prefix in every row); otherwise the gather runs here. Returns ``[B, H, Tq, D]``."""
    keys, values, visible = gather_concat(args, prefix_len) if concat is None else concat
    q = args.q
    scores = q @ keys.transpose(-1, -2) * args.scale  # [B, H, Tq, P + Tk]
    if visible is not None:
        mask = torch.zeros(visible.shape, dtype=q.dtype, device=q.device)
        scores = scores + mask.masked_fill(~visible, torch.finfo(q.dtype).min)
    return torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype) @ values


def sdpa_concat(args: ops.AttentionArgs, prefix_len: int, concat: Concatenated | None = None) -> torch.Tensor:
    """PyTorch SDPA on the concatenated K/V, with a boolean mask when some key is hidden (``concat`` as in
    :func:`eager_concat`). Returns ``[B, H, Tq, D]``."""
    keys, values, visible = gather_concat(args, prefix_len) if concat is None else concat
    return F.scaled_dot_product_attention(args.q, keys, values, attn_mask=visible, scale=args.scale)
