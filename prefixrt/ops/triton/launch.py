"""Launchers of the Triton prefix-attention kernels (forward and backward): check inputs, allocate, launch.

The kernels themselves live in :mod:`prefixrt.kernels`; the decode path is in
:mod:`prefixrt.ops.triton.decode`; the sort-by-id tables come with the call's :class:`~prefixrt.ops.StepPlan`.
Conventions are those of :mod:`prefixrt.ops.reference` (``lse`` natural-log fp32, ``-inf`` where a query
sees no key). No launcher synchronises with the device. Attention dropout (``args.dropout_p > 0``) is a
compile-time switch of the kernels (``DROPOUT``); its mask is :mod:`prefixrt.ops.dropout`'s, drawn in the
kernels from ``args.philox`` (a CPU tensor: reading it costs no device sync).
"""

from __future__ import annotations

import torch
import triton

from prefixrt.kernels.dropout import dropout_mask_kernel
from prefixrt.kernels.prefix_attention_bwd import (
    prefix_attention_bwd_bank_kernel,
    prefix_attention_bwd_dkdv_kernel,
    prefix_attention_bwd_dq_kernel,
    prefix_attention_bwd_preprocess_kernel,
)
from prefixrt.kernels.prefix_attention_fwd import prefix_attention_fwd_kernel
from prefixrt.ops.args import AttentionArgs
from prefixrt.ops.dropout import dropout_keep_threshold, dropout_scale
from prefixrt.ops.triton.configs import (
    SUPPORTED_DTYPES,
    SUPPORTED_HEAD_DIMS,
    KernelConfig,
    pick_bwd_config,
    pick_fwd_config,
)

__all__ = ["prefix_attention_fwd", "prefix_attention_bwd", "dropout_mask", "LOG2E"]

LOG2E = 1.4426950408889634
MAX_BANK_WORKSPACE = 256 * 2**20


def check_supported(q: torch.Tensor) -> None:
    """Raise ``ValueError`` when the kernels cannot take ``q``'s dtype or head dim."""
    if q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"q: Triton kernels take dtypes {SUPPORTED_DTYPES}, got {q.dtype}")
    if q.shape[-1] not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"q: Triton kernels take head dims {SUPPORTED_HEAD_DIMS}, got {q.shape[-1]}")


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs get exact fp32 products (like the reference); 16-bit inputs use tensor cores anyway."""
    return "ieee" if dtype == torch.float32 else "tf32"


def mask_arg(key_padding_mask: torch.Tensor | None, q: torch.Tensor) -> tuple[torch.Tensor, int, int, bool]:
    """``(tensor, stride_b, stride_n, has_mask)`` for a kernel's MASK argument (a uint8 view, no copy)."""
    if key_padding_mask is None:
        return q, 0, 0, False
    mask = key_padding_mask if key_padding_mask.dtype == torch.bool else key_padding_mask.bool()
    mask = mask.view(torch.uint8)
    return mask, mask.stride(0), mask.stride(1), True


def _launch_opts(config: KernelConfig) -> dict:
    return {"num_warps": config.num_warps, "num_stages": config.num_stages}


def dropout_args(args: AttentionArgs) -> tuple:
    """The kernels' dropout arguments ``(N_HEADS, KEY_STRIDE, seed, philox_offset, drop_threshold, drop_scale)``
    (seed and offset as the int64 bit patterns ``args.philox`` holds); placeholders without dropout."""
    heads = args.q.shape[1]
    if not args.dropout:
        return heads, 0, 0, 0, 0, 1.0
    seed, offset = args.philox.tolist()
    p = args.dropout_p
    return heads, args.key_stride, seed, offset, dropout_keep_threshold(p), dropout_scale(p)


def dropout_mask(
    philox: torch.Tensor,
    dropout_p: float,
    heads: int,
    q_len: int,
    key_stride: int,
    coords: torch.Tensor,
    block: int = 128,
) -> torch.Tensor:
    """The dropout multiplier (0 or ``1 / (1 - p)``, fp32 ``[N]``) of elements ``coords`` (LongTensor ``[N, 4]``
    of ``(b, h, i, j)``) as the attention kernels draw it: a check of the kernels' helpers against
    :func:`prefixrt.ops.dropout.dropout_multiplier` and the C++ kernels."""
    coords = coords.long()
    n = coords.shape[0]
    out = torch.empty(n, dtype=torch.float32, device=coords.device)
    if n == 0:
        return out
    seed, offset = philox.tolist()
    cols = [coords[:, c].contiguous() for c in range(4)]
    dropout_mask_kernel[(triton.cdiv(n, block),)](
        *cols, out, n, heads, q_len, key_stride, seed, offset, dropout_keep_threshold(dropout_p),
        dropout_scale(dropout_p), BLOCK=block,
    )  # fmt: skip
    return out


def prefix_attention_fwd(
    args: AttentionArgs, config: KernelConfig | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prefill / training forward of prefix attention with the Triton kernel.

    Parameters
    ----------
    args : AttentionArgs
        ``q [B, H, Tq, D]``, ``k, v [B, H, Tk, D]``, the bank layer ``[H, S, D]`` (all any strides), the plan's
        ``prefix_ids [B]``, the key padding mask ``[B, Tk]`` (True = attend), causal, scale.
    config : KernelConfig, optional
        Forces a block configuration (tests use it to exercise every entry of ``FWD_CONFIGS``).

    Returns
    -------
    out : Tensor ``[B, H, Tq, D]``, ``q.dtype``, contiguous
    lse : Tensor ``[B, H, Tq]``, fp32, natural log
    """
    q, k, v, bank_k, bank_v = args.q, args.k, args.v, args.bank.k, args.bank.v
    prefix_ids, bank_offsets, causal, scale = args.prefix_ids, args.bank.offsets, args.causal, args.scale
    check_supported(q)
    batch, heads, tq, head_dim = q.shape
    tk = k.shape[2]
    out = torch.empty(batch, heads, tq, head_dim, dtype=q.dtype, device=q.device)
    lse = torch.empty(batch, heads, tq, dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    config = config or pick_fwd_config(tq, head_dim, q.dtype, q.is_cuda)
    mask, smb, smn, has_mask = mask_arg(args.key_padding_mask, q)
    grid = (triton.cdiv(tq, config.block_m), heads, batch)
    prefix_attention_fwd_kernel[grid](
        q, k, v, bank_k, bank_v, prefix_ids, bank_offsets, mask, out, lse,
        *q.stride(), *k.stride(), *v.stride(), *bank_k.stride(), *bank_v.stride(), smb, smn,
        *out.stride(), *lse.stride(),
        tq, tk, bank_offsets.shape[0] - 1, scale * LOG2E, *dropout_args(args),
        HEAD_DIM=head_dim, BLOCK_M=config.block_m, BLOCK_N=config.block_n, CAUSAL=bool(causal),
        HAS_MASK=has_mask, DOT_PRECISION=dot_precision(q.dtype), DROPOUT=args.dropout, **_launch_opts(config),
    )  # fmt: skip
    return out, lse


def prefix_attention_bwd(
    args: AttentionArgs,
    dout: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    config: KernelConfig | None = None,
    bank_splits: int | None = None,
    needs: tuple[bool, bool, bool, bool, bool] = (True, True, True, True, True),
) -> tuple[torch.Tensor | None, ...]:
    """Backward of prefix attention: ``(dq, dk, dv, dbank_k, dbank_v)``, deterministic.

    Up to four launches: ``Delta = rowsum(dO * O)``; dQ over each row's prefix and own keys; dK/dV of the own
    keys; the bank gradient, one program per (key block of a used entry, head, row split) looping over the rows
    that use the entry in sorted order (the plan's tables; no atomics; entries no row uses stay zero). With
    ``bank_splits > 1`` the rows of an entry are cut into that many chunks whose fp32 partial sums are added in
    a fixed order. A launch whose gradients ``needs`` leaves out is skipped (its gradients come back as None):
    the dQ launch without ``needs[0]``, dK/dV without ``needs[1]`` or ``needs[2]``, the bank launch without
    ``needs[3]`` or ``needs[4]``. With dropout every launch regenerates the forward's mask.

    Parameters
    ----------
    args : AttentionArgs
        As in :func:`prefix_attention_fwd`.
    dout : Tensor ``[B, H, Tq, D]``
    out : Tensor ``[B, H, Tq, D]``, lse : Tensor ``[B, H, Tq]`` fp32
        The forward's results.
    config : KernelConfig, optional
        Forces a block configuration of ``BWD_CONFIGS``.
    bank_splits : int, optional
        Row chunks per bank tile (default: enough programs to fill the device, at most 8).
    needs : five bools
        Which of ``(dq, dk, dv, dbank_k, dbank_v)`` to compute.

    Returns
    -------
    dq ``[B, H, Tq, D]``, dk ``[B, H, Tk, D]``, dv ``[B, H, Tk, D]`` in their inputs' dtypes;
    dbank_k, dbank_v ``[H, S, D]`` in the bank's dtype (accumulated in fp32); None for a skipped launch's.
    """
    q, k, v, bank_k, bank_v = args.q, args.k, args.v, args.bank.k, args.bank.v
    prefix_ids, bank_offsets, causal, scale = args.prefix_ids, args.bank.offsets, args.causal, args.scale
    check_supported(q)
    batch, heads, tq, head_dim = q.shape
    tk = k.shape[2]
    config = config or pick_bwd_config(tq, head_dim, q.dtype, q.is_cuda)
    opts = _launch_opts(config)
    mask, smb, smn, has_mask = mask_arg(args.key_padding_mask, q)
    n_entries = bank_offsets.shape[0] - 1
    precision = dot_precision(q.dtype)
    qk_scale = scale * LOG2E
    drop = dropout_args(args)
    need_dq, need_own, need_bank = needs[0], needs[1] or needs[2], needs[3] or needs[4]

    dq = torch.empty(batch, heads, tq, head_dim, dtype=q.dtype, device=q.device) if need_dq else None
    dk = torch.empty(batch, heads, tk, head_dim, dtype=k.dtype, device=q.device) if need_own else None
    dv = torch.empty(batch, heads, tk, head_dim, dtype=v.dtype, device=q.device) if need_own else None
    dbank_k = torch.zeros(bank_k.shape, dtype=bank_k.dtype, device=q.device) if need_bank else None
    dbank_v = torch.zeros(bank_v.shape, dtype=bank_v.dtype, device=q.device) if need_bank else None
    if batch * heads == 0 or tq == 0 or not (need_dq or need_own or need_bank):
        for t in (dq, dk, dv):
            if t is not None:
                t.zero_()
        return dq, dk, dv, dbank_k, dbank_v

    # -- Delta = rowsum(dO * O) [B, H, Tq] fp32
    delta = torch.empty(batch, heads, tq, dtype=torch.float32, device=q.device)
    q_grid = (triton.cdiv(tq, config.block_m), heads, batch)
    prefix_attention_bwd_preprocess_kernel[q_grid](
        out, dout, delta, *out.stride(), *dout.stride(), *delta.stride(), tq,
        HEAD_DIM=head_dim, BLOCK_M=config.block_m,
    )  # fmt: skip
    common = dict(HEAD_DIM=head_dim, BLOCK_M=config.block_m, BLOCK_N=config.block_n, DOT_PRECISION=precision,
                  DROPOUT=args.dropout)  # fmt: skip

    # -- dQ: one program per (query block, row, head), over the row's prefix and own keys
    if need_dq:
        prefix_attention_bwd_dq_kernel[q_grid](
            q, k, v, bank_k, bank_v, prefix_ids, bank_offsets, mask, dout, lse, delta, dq,
            *q.stride(), *k.stride(), *v.stride(), *bank_k.stride(), *bank_v.stride(), smb, smn,
            *dout.stride(), *lse.stride(), *delta.stride(), *dq.stride(),
            tq, tk, n_entries, qk_scale, scale, *drop,
            CAUSAL=bool(causal), HAS_MASK=has_mask, **common, **opts,
        )  # fmt: skip

    # -- dK/dV of the own keys: one program per (key block, row, head)
    if need_own and tk > 0:
        prefix_attention_bwd_dkdv_kernel[(triton.cdiv(tk, config.block_n), heads, batch)](
            q, k, v, prefix_ids, bank_offsets, mask, dout, lse, delta, dk, dv,
            *q.stride(), *k.stride(), *v.stride(), smb, smn,
            *dout.stride(), *lse.stride(), *delta.stride(), *dk.stride(), *dv.stride(),
            tq, tk, n_entries, qk_scale, scale, *drop,
            CAUSAL=bool(causal), HAS_MASK=has_mask, **common, **opts,
        )  # fmt: skip

    # -- bank gradient: sort-by-id segmented reduction, one program per (tile of a used entry, head, split)
    plan = args.plan
    if not need_bank or n_entries == 0 or bank_k.shape[1] == 0 or plan.n_used == 0:
        return dq, dk, dv, dbank_k, dbank_v
    tile_entry, tile_block = plan.bank_tiles(bank_offsets.diff(), config.block_n)
    tiles = tile_entry.shape[0]
    splits = bank_splits or _default_bank_splits(tiles * heads, batch, q, bank_k.numel())
    if splits == 1:
        acc_k, acc_v = dbank_k, dbank_v
        ws_stride = 0
    else:
        acc_k = torch.zeros(splits, *bank_k.shape, dtype=torch.float32, device=q.device)
        acc_v = torch.zeros_like(acc_k)
        ws_stride = acc_k.stride(0)
    prefix_attention_bwd_bank_kernel[(tiles, heads, splits)](
        q, bank_k, bank_v, dout, lse, delta, acc_k, acc_v,
        bank_offsets, plan.order, plan.seg_offsets, tile_entry, tile_block,
        *q.stride(), *bank_k.stride(), *bank_v.stride(), *dout.stride(), *lse.stride(), *delta.stride(),
        ws_stride, *acc_k.stride()[-3:], *acc_v.stride()[-3:],
        tq, n_entries, splits, qk_scale, scale, *drop, **common, **opts,
    )  # fmt: skip
    if splits > 1:
        dbank_k = acc_k.sum(0).to(bank_k.dtype)
        dbank_v = acc_v.sum(0).to(bank_v.dtype)
    return dq, dk, dv, dbank_k, dbank_v


def _default_bank_splits(programs: int, batch: int, q: torch.Tensor, bank_numel: int) -> int:
    """Row chunks per bank tile: enough programs for about two waves of the device's SMs, at most 8, and
    an fp32 workspace (``2 * splits * H * S * D`` values) of at most :data:`MAX_BANK_WORKSPACE` bytes."""
    if not q.is_cuda:
        return 1
    sms = torch.cuda.get_device_properties(q.device).multi_processor_count
    splits = 1
    while (
        splits < 8
        and splits * 2 <= batch
        and programs * splits < 2 * sms
        and 2 * (splits * 2) * bank_numel * 4 <= MAX_BANK_WORKSPACE
    ):
        splits *= 2
    return splits
