"""Launcher of the Triton decode path: one query per row against its bank prefix and its own KV cache.

>>> plan = StepPlan.build(prefix_ids, lengths)                     # once per generation step  # doctest: +SKIP
>>> for layer in layers:                                            # doctest: +SKIP
...     out, lse = prefix_decode(AttentionArgs(q, k_cache, v_cache, bank[layer], plan, mask, False, scale))

The grouped prefix kernel reads each used entry's prefix once per group of rows that share it, with the groups
the plan cut (sized by the ids the step uses).
"""

from __future__ import annotations

import torch
import triton

from prefixrt.kernels.prefix_decode import (
    prefix_decode_grouped_kernel,
    prefix_decode_merge_kernel,
    prefix_decode_split_kernel,
)
from prefixrt.ops.args import AttentionArgs
from prefixrt.ops.triton.configs import KernelConfig, pick_decode_config
from prefixrt.ops.triton.launch import LOG2E, check_supported, dot_precision, mask_arg

__all__ = ["prefix_decode", "default_kv_splits"]

MAX_KV_SPLITS = 16


def default_kv_splits(batch_heads: int, k_len: int, block_n: int, device: torch.device) -> int:
    """Chunks per row's own cache: enough (row, head, chunk) programs for about two waves of SMs, each chunk
    at least ``block_n`` keys, at most :data:`MAX_KV_SPLITS`. 1 off the GPU. With one chunk the own-cache
    kernel merges with the prefix part itself (two launches instead of three)."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    want = triton.cdiv(2 * sms, max(batch_heads, 1))
    return max(1, min(want, MAX_KV_SPLITS, triton.cdiv(k_len, block_n)))


def prefix_decode(
    args: AttentionArgs, kv_splits: int | None = None, config: KernelConfig | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode-step prefix attention: grouped prefix part + split-KV own part, merged by log-sum-exp.

    Parameters
    ----------
    args : AttentionArgs
        ``q [B, H, 1, D]`` (any strides); ``k, v [B, H, Tk, D]``, the row's own keys (self-attention: its KV
        cache including the new token; cross-attention: the encoder states), any strides, e.g. a slice of a
        preallocated cache. ``causal`` does not matter: the single query is the last position and sees every
        own key (bottom-right alignment). The key padding mask ``[B, Tk]`` (True = attend) hides the rest.
    kv_splits : int, optional
        Chunks of each own cache (default :func:`default_kv_splits`).
    config : KernelConfig, optional
        Forces ``block_m`` (rows per group: the plan is regrouped when it differs) and ``block_n``.

    Returns
    -------
    out : Tensor ``[B, H, 1, D]`` in ``q.dtype``; lse : Tensor ``[B, H, 1]`` fp32, natural log.
    """
    q, k, v, bank_k, bank_v = args.q, args.k, args.v, args.bank.k, args.bank.v
    prefix_ids, bank_offsets, scale = args.prefix_ids, args.bank.offsets, args.scale
    check_supported(q)
    batch, heads, tq, head_dim = q.shape
    if tq != 1:
        raise ValueError(f"q: decode takes one query per row, got shape {tuple(q.shape)}")
    if args.dropout:
        raise ValueError(
            "dropout_p: the decode kernels have no dropout (the prefill kernel takes Tq == 1 too)"
        )
    tk = k.shape[2]
    n_entries = bank_offsets.shape[0] - 1
    out = torch.empty(batch, heads, 1, head_dim, dtype=q.dtype, device=q.device)
    lse = torch.empty(batch, heads, 1, dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    plan = args.plan if config is None else args.plan.with_group_size(config.block_m)
    if config is None:
        config = pick_decode_config(plan.group_size, head_dim, q.dtype)
    block_m, block_n = plan.group_size, config.block_n
    opts = {"num_warps": config.num_warps, "num_stages": config.num_stages}

    splits = default_kv_splits(batch * heads, tk, block_n, q.device) if kv_splits is None else kv_splits
    splits = min(max(splits, 1), max(triton.cdiv(tk, block_n), 1))
    chunk = triton.cdiv(triton.cdiv(max(tk, 1), splits), block_n) * block_n
    splits = max(triton.cdiv(tk, chunk), 1)  # an empty cache still runs one (empty) chunk
    fuse_merge = splits == 1
    o_part = torch.empty(batch, heads, 1 + splits, head_dim, dtype=torch.float32, device=q.device)
    lse_part = torch.empty(batch, heads, 1 + splits, dtype=torch.float32, device=q.device)
    q_strides = (q.stride(0), q.stride(1), q.stride(3))
    out_strides = (out.stride(0), out.stride(1), out.stride(3), lse.stride(0), lse.stride(1))
    qk_scale = scale * LOG2E

    # -- part 0: each group of rows sharing an entry against that entry's prefix (read once per group)
    if n_entries > 0 and plan.n_groups > 0:
        prefix_decode_grouped_kernel[(plan.n_groups, heads)](
            q, bank_k, bank_v, bank_offsets, plan.order, plan.group_entry, plan.group_start,
            plan.group_rows, o_part, lse_part,
            *q_strides, *bank_k.stride(), *bank_v.stride(), *o_part.stride(), *lse_part.stride(),
            n_entries, qk_scale,
            HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n, DOT_PRECISION=dot_precision(q.dtype), **opts,
        )  # fmt: skip
    # -- parts 1..splits: flash-decoding over each row's own keys (merged right there when there is one chunk)
    mask, smb, smn, has_mask = mask_arg(args.key_padding_mask, q)
    prefix_decode_split_kernel[(batch * heads, splits)](
        q, k, v, mask, o_part, lse_part, prefix_ids, bank_offsets, out, lse,
        *q_strides, *k.stride(), *v.stride(), smb, smn, *o_part.stride(), *lse_part.stride(), *out_strides,
        heads, tk, chunk, n_entries, qk_scale,
        HEAD_DIM=head_dim, BLOCK_N=block_n, HAS_MASK=has_mask, FUSE_MERGE=fuse_merge, **opts,
    )  # fmt: skip
    if fuse_merge:
        return out, lse
    # -- merge by log-sum-exp
    prefix_decode_merge_kernel[(batch * heads,)](
        o_part, lse_part, prefix_ids, bank_offsets, out, lse,
        *o_part.stride(), *lse_part.stride(), *out_strides,
        heads, 1 + splits, n_entries,
        HEAD_DIM=head_dim, BLOCK_P=triton.next_power_of_2(1 + splits),
    )  # fmt: skip
    return out, lse
