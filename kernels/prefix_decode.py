"""Triton decode of prefix attention: one query per row against its bank prefix plus its own KV cache.

Three kernels, Hydragen / FlashInfer-cascade style:

1. ``prefix_decode_grouped_kernel``: rows that share a prefix id are batched (a group of up to ``BLOCK_M``
   rows) into one ``tl.dot`` against the prefix, so each prefix is read once per group, not once per row.
   Writes partial 0 of every grouped row.
2. ``prefix_decode_split_kernel``: flash-decoding over each row's own cache, cut into ``SPLITS`` chunks.
   Writes partials ``1 .. SPLITS``.
3. ``prefix_decode_merge_kernel``: merges a row's partials by log-sum-exp (partial 0 only when the row has a
   prefix; rows with id ``-1`` are in no group). With a single chunk the split kernel merges itself.

Partials are fp32 outputs normalised within their part plus a natural-log LSE (``-inf`` when the part saw no
key). Only ``@triton.jit`` code lives here; the launcher is :mod:`prefixrt.ops.triton.decode`.
"""

import triton
import triton.language as tl

from .prefix_attention_fwd import LN2, prefix_span


@triton.jit
def _finish_partial(l_i, m_i):
    """Divisor (1 when nothing was seen: the output stays 0) and natural-log LSE (-inf then) of an
    online-softmax state."""
    seen = l_i > 0.0
    l_safe = tl.where(seen, l_i, 1.0)
    return l_safe, tl.where(seen, (m_i + tl.log2(l_safe)) * LN2, float("-inf"))


@triton.jit
def prefix_decode_grouped_kernel(
    Q, BANK_K, BANK_V, OFFSETS, ORDER, GROUP_ENTRY, GROUP_START, GROUP_ROWS, O_PART, LSE_PART,
    stride_qb, stride_qh, stride_qd,
    stride_bkh, stride_bks, stride_bkd,
    stride_bvh, stride_bvs, stride_bvd,
    stride_pb, stride_ph, stride_pp, stride_pd,
    stride_lb, stride_lh, stride_lp,
    N_ENTRIES, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """Grid ``(group slots, H)``: the queries of one group of rows that share an entry, against that prefix.

    Q ``[B, H, 1, D]`` (its query dim dropped: strides b, h, d), GROUP_* ``[slots]`` (entry ``-1`` = idle),
    ORDER ``[B]``; O_PART ``[B, H, 1 + SPLITS, D]`` fp32 and LSE_PART ``[B, H, 1 + SPLITS]`` get part 0.
    """
    g = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    entry = tl.load(GROUP_ENTRY + g).to(tl.int64)
    has = (entry >= 0).to(tl.int64)
    safe = tl.maximum(entry, 0)
    lo = tl.load(OFFSETS + tl.minimum(safe, N_ENTRIES)).to(tl.int64)
    plen = (tl.load(OFFSETS + tl.minimum(safe + 1, N_ENTRIES)).to(tl.int64) - lo) * has
    n_group = tl.load(GROUP_ROWS + g)  # 0 for an idle slot
    start = tl.load(GROUP_START + g)

    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    valid_m = offs_m < n_group
    rows = tl.load(ORDER + start + offs_m, mask=valid_m, other=0).to(tl.int64)
    q = tl.load(Q + rows[:, None] * stride_qb + h * stride_qh + offs_d[None, :] * stride_qd,
                mask=valid_m[:, None], other=0.0)  # fmt: skip

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    offs_n = tl.arange(0, BLOCK_N)
    k_ptrs = (
        BANK_K
        + h * stride_bkh
        + lo * stride_bks
        + offs_n[None, :] * stride_bks
        + offs_d[:, None] * stride_bkd
    )
    v_ptrs = (
        BANK_V
        + h * stride_bvh
        + lo * stride_bvs
        + offs_n[:, None] * stride_bvs
        + offs_d[None, :] * stride_bvd
    )
    for _ in range(0, plen, BLOCK_N):
        valid_n = offs_n < plen
        k = tl.load(k_ptrs, mask=valid_n[None, :], other=0.0)  # [D, BLOCK_N]
        s = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale
        s = tl.where(valid_n[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])  # every group row sees every prefix key: m_new is finite
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptrs, mask=valid_n[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
        k_ptrs += BLOCK_N * stride_bks
        v_ptrs += BLOCK_N * stride_bvs
        offs_n += BLOCK_N

    l_safe, lse = _finish_partial(l_i, m_i)
    o_ptrs = O_PART + rows[:, None] * stride_pb + h * stride_ph + offs_d[None, :] * stride_pd
    tl.store(o_ptrs, acc / l_safe[:, None], mask=valid_m[:, None])
    tl.store(LSE_PART + rows * stride_lb + h * stride_lh, lse, mask=valid_m)


@triton.jit
def prefix_decode_split_kernel(
    Q, K, V, MASK, O_PART, LSE_PART, IDS, OFFSETS, OUT, LSE,
    stride_qb, stride_qh, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_maskb, stride_maskn,
    stride_pb, stride_ph, stride_pp, stride_pd,
    stride_lb, stride_lh, stride_lp,
    stride_ob, stride_oh, stride_od,
    stride_lob, stride_loh,
    H, TK, CHUNK, N_ENTRIES, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, HAS_MASK: tl.constexpr, FUSE_MERGE: tl.constexpr,
):  # fmt: skip
    """Grid ``(B * H, SPLITS)``: one row's query against own keys ``[c * CHUNK, (c + 1) * CHUNK)``.

    K/V ``[B, H, TK, D]`` (a cache view: any strides), MASK ``[B, TK]`` uint8; writes partial ``1 + c``.
    With ``FUSE_MERGE`` (one chunk: ``SPLITS == 1``) it instead merges its result with partial 0 (the prefix,
    written by the grouped kernel earlier on the stream) and writes OUT ``[B, H, 1, D]`` (strides b, h, d)
    and LSE ``[B, H, 1]`` itself, saving the merge launch.
    A single query has no tl.dot: scores are an elementwise product summed over D (decode is memory-bound).
    """
    bh = tl.program_id(0)
    c = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_d * stride_qd).to(tl.float32)
    start = c * CHUNK
    end = tl.minimum(start + CHUNK, TK)
    offs_n = start + tl.arange(0, BLOCK_N)
    k_ptrs = K + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd
    v_ptrs = V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd
    mask_ptrs = MASK + b * stride_maskb + offs_n * stride_maskn

    m_i = tl.full([1], float("-inf"), tl.float32)
    l_i = tl.zeros([1], tl.float32)
    acc = tl.zeros([HEAD_DIM], tl.float32)
    for _ in range(start, end, BLOCK_N):
        valid_n = offs_n < end
        if HAS_MASK:
            valid_n = valid_n & (tl.load(mask_ptrs, mask=valid_n, other=0) != 0)
            mask_ptrs += BLOCK_N * stride_maskn
        k = tl.load(k_ptrs, mask=valid_n[:, None], other=0.0).to(tl.float32)  # [BLOCK_N, D]
        s = tl.sum(k * q[None, :], 1) * qk_scale  # [BLOCK_N]
        s = tl.where(valid_n, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe)
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 0)
        v = tl.load(v_ptrs, mask=valid_n[:, None], other=0.0).to(tl.float32)
        acc = acc * alpha + tl.sum(p[:, None] * v, 0)
        m_i = m_new
        k_ptrs += BLOCK_N * stride_kn
        v_ptrs += BLOCK_N * stride_vn
        offs_n += BLOCK_N

    l_safe, lse = _finish_partial(l_i, m_i)
    out = acc / l_safe
    one = tl.arange(0, 1)
    if FUSE_MERGE:
        # partial 0 exists only for a row with a non-empty prefix: fold that into the load masks
        _, plen = prefix_span(IDS, OFFSETS, b, N_ENTRIES)
        has = (plen > 0).to(tl.int32)
        lse0 = tl.load(LSE_PART + b * stride_lb + h * stride_lh + one, mask=one < has, other=float("-inf"))
        o0 = tl.load(O_PART + b * stride_pb + h * stride_ph + offs_d * stride_pd, mask=offs_d < HEAD_DIM * has,
                     other=0.0)  # fmt: skip
        m = tl.maximum(lse0, lse)
        m_safe = tl.where(m == float("-inf"), 0.0, m)
        w0 = tl.exp(lse0 - m_safe)
        w1 = tl.exp(lse - m_safe)
        total = w0 + w1
        seen = total > 0.0
        t_safe = tl.where(seen, total, 1.0)
        out = (w0 * o0 + w1 * out) / t_safe
        lse = tl.where(seen, m_safe + tl.log(t_safe), float("-inf"))
        tl.store(OUT + b * stride_ob + h * stride_oh + offs_d * stride_od, out.to(OUT.dtype.element_ty))
        tl.store(LSE + b * stride_lob + h * stride_loh + one, lse)
    else:
        part = (1 + c).to(tl.int64)
        tl.store(O_PART + b * stride_pb + h * stride_ph + part * stride_pp + offs_d * stride_pd, out)
        tl.store(LSE_PART + b * stride_lb + h * stride_lh + part * stride_lp + one, lse)


@triton.jit
def prefix_decode_merge_kernel(
    O_PART, LSE_PART, IDS, OFFSETS, OUT, LSE,
    stride_pb, stride_ph, stride_pp, stride_pd,
    stride_lpb, stride_lph, stride_lpp,
    stride_ob, stride_oh, stride_od,
    stride_lb, stride_lh,
    H, N_PARTS, N_ENTRIES,
    HEAD_DIM: tl.constexpr, BLOCK_P: tl.constexpr,
):  # fmt: skip
    """Grid ``(B * H,)``: ``out = sum_p w_p o_p / sum_p w_p`` with ``w_p = exp(lse_p - max lse)`` over the row's
    parts (part 0 only when the row has a non-empty prefix); OUT ``[B, H, 1, D]`` (strides b, h, d) in the
    query's dtype, LSE ``[B, H, 1]`` fp32 natural log."""
    bh = tl.program_id(0)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    _, plen = prefix_span(IDS, OFFSETS, b, N_ENTRIES)
    first = 1 - (plen > 0).to(tl.int32)  # skip part 0 (never written) for a row without prefix
    offs_p = tl.arange(0, BLOCK_P)
    offs_d = tl.arange(0, HEAD_DIM)
    valid_p = (offs_p >= first) & (offs_p < N_PARTS)
    lse_p = tl.load(LSE_PART + b * stride_lpb + h * stride_lph + offs_p * stride_lpp, mask=valid_p,
                    other=float("-inf"))  # fmt: skip
    m = tl.max(lse_p, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp(lse_p - m_safe)  # 0 for empty parts
    o_p = tl.load(O_PART + b * stride_pb + h * stride_ph + offs_p[:, None] * stride_pp + offs_d[None, :] * stride_pd,
                  mask=valid_p[:, None], other=0.0)  # fmt: skip
    total = tl.sum(w, 0)
    seen = total > 0.0
    out = tl.sum(w[:, None] * o_p, 0) / tl.where(seen, total, 1.0)
    lse = tl.where(seen, m_safe + tl.log(tl.where(seen, total, 1.0)), float("-inf"))
    tl.store(OUT + b * stride_ob + h * stride_oh + offs_d * stride_od, out.to(OUT.dtype.element_ty))
    tl.store(LSE + b * stride_lb + h * stride_lh, lse)
