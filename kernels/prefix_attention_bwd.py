"""Triton backward of prefix attention: Delta, dQ, dK/dV of the own keys, and the bank gradient.

P is recomputed from the forward's log-sum-exp (natural log, converted to base 2 here); a query with
``lse = -inf`` saw no key and gets ``P = 0``. The bank gradient is a deterministic segmented reduction: one
program per (key block of a used entry, head, row split) loops, in sorted order, over the rows that use the
entry and accumulates in fp32; nothing is written twice and there are no atomics.

Dropout (``DROPOUT``): with ``Z`` the scaled mask of :mod:`prefixrt.kernels.dropout` (regenerated here from the
Philox state, never stored) and ``O`` the dropped output, ``dV = (P*Z)^T dO`` and ``dS = P * (Z * dO V^T - Delta)``
with ``Delta = rowsum(dO * O)`` (FlashAttention's backward); ``P`` itself is recomputed from the undropped lse.

Only ``@triton.jit`` code lives here; the launcher is :mod:`prefixrt.ops.triton.launch`.
"""

import triton
import triton.language as tl

from .dropout import dropout_multiplier, dropout_row_counters
from .prefix_attention_fwd import causal_key_ranges, prefix_span

LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def prefix_attention_bwd_preprocess_kernel(
    OUT, DOUT, DELTA,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_db, stride_dh, stride_dm,
    TQ,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    """Grid ``(cdiv(TQ, BLOCK_M), H, B)``: ``DELTA[b, h, i] = sum_d OUT * DOUT`` in fp32."""
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    valid = (offs_m < TQ)[:, None]
    o = tl.load(OUT + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od,
                mask=valid, other=0.0).to(tl.float32)  # fmt: skip
    do = tl.load(DOUT + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod,
                 mask=valid, other=0.0).to(tl.float32)  # fmt: skip
    tl.store(DELTA + b * stride_db + h * stride_dh + offs_m * stride_dm, tl.sum(o * do, 1), mask=offs_m < TQ)


@triton.jit
def _dq_range(
    dq, q, do, lse2, delta, offs_m,
    K_BASE, V_BASE, stride_kn, stride_kd, stride_vn, stride_vd, MASK_BASE, stride_maskn,
    start, end, causal_shift, qk_scale, row_ctr, key_base, seed, drop_threshold, drop_scale,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DROPOUT: tl.constexpr,
):  # fmt: skip
    """Add ``dS K`` over keys ``[start, end)`` to ``dq`` ``[BLOCK_M, D]`` (unscaled); key ``n`` is key
    ``key_base + n`` of the row's ``[prefix ; own]`` list, ``row_ctr`` the queries' dropout counters."""
    offs_n = start + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    k_ptrs = K_BASE + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd  # [BLOCK_N, D]
    v_ptrs = V_BASE + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd
    mask_ptrs = MASK_BASE + offs_n * stride_maskn
    for _ in range(start, end, BLOCK_N):
        valid_n = offs_n < end
        k = tl.load(k_ptrs, mask=valid_n[:, None], other=0.0)
        v = tl.load(v_ptrs, mask=valid_n[:, None], other=0.0)
        if HAS_MASK:
            valid_n = valid_n & (tl.load(mask_ptrs, mask=valid_n, other=0) != 0)
            mask_ptrs += BLOCK_N * stride_maskn
        visible = valid_n[None, :]
        if CAUSAL:
            visible = visible & (offs_n[None, :] <= offs_m[:, None] + causal_shift)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N]
        p = tl.where(visible, tl.exp2(s - lse2[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        if DROPOUT:
            keys = (key_base + offs_n).to(tl.int64)
            dp = dp * dropout_multiplier(seed, row_ctr[:, None] + keys[None, :], drop_threshold, drop_scale)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
        k_ptrs += BLOCK_N * stride_kn
        v_ptrs += BLOCK_N * stride_vn
        offs_n += BLOCK_N
    return dq


@triton.jit
def prefix_attention_bwd_dq_kernel(
    Q, K, V, BANK_K, BANK_V, IDS, OFFSETS, MASK, DOUT, LSE, DELTA, DQ,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_bkh, stride_bks, stride_bkd,
    stride_bvh, stride_bvs, stride_bvd,
    stride_maskb, stride_maskn,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_lb, stride_lh, stride_lm,
    stride_db, stride_dh, stride_dm,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    TQ, TK, N_ENTRIES, qk_scale, sm_scale,
    N_HEADS, KEY_STRIDE, seed, philox_offset, drop_threshold, drop_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
    HAS_MASK: tl.constexpr, DOT_PRECISION: tl.constexpr, DROPOUT: tl.constexpr,
):  # fmt: skip
    """Grid ``(cdiv(TQ, BLOCK_M), H, B)``: dQ of a query block over the row's prefix and own keys (dropout
    arguments as in the forward kernel)."""
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    m0 = tl.program_id(0) * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    valid_m = offs_m < TQ
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=valid_m[:, None], other=0.0)  # fmt: skip
    do = tl.load(DOUT + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod,
                 mask=valid_m[:, None], other=0.0)  # fmt: skip
    lse = tl.load(LSE + b * stride_lb + h * stride_lh + offs_m * stride_lm, mask=valid_m, other=0.0)
    lse2 = tl.where(lse == float("-inf"), 0.0, lse * LOG2E)  # a query that saw nothing: P = 0 via the masks
    delta = tl.load(DELTA + b * stride_db + h * stride_dh + offs_m * stride_dm, mask=valid_m, other=0.0)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    row_ctr = dropout_row_counters(philox_offset, b * N_HEADS + h, offs_m, TQ, KEY_STRIDE)

    # -- prefix part (prefix key p is key j = p)
    lo, plen = prefix_span(IDS, OFFSETS, b, N_ENTRIES)
    dq = _dq_range(
        dq, q, do, lse2, delta, offs_m,
        BANK_K + h * stride_bkh + lo * stride_bks, BANK_V + h * stride_bvh + lo * stride_bvs,
        stride_bks, stride_bkd, stride_bvs, stride_bvd, MASK, 0, 0, plen, 0, qk_scale,
        row_ctr, 0, seed, drop_threshold, drop_scale,
        HEAD_DIM, BLOCK_N, False, False, DOT_PRECISION, DROPOUT,
    )  # fmt: skip
    # -- own part (own key t is key j = plen + t)
    split, hi = causal_key_ranges(m0, TQ, TK, BLOCK_M, BLOCK_N, CAUSAL)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    mask_base = MASK + b * stride_maskb
    dq = _dq_range(
        dq, q, do, lse2, delta, offs_m, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
        mask_base, stride_maskn, 0, split, 0, qk_scale, row_ctr, plen, seed, drop_threshold, drop_scale,
        HEAD_DIM, BLOCK_N, False, HAS_MASK, DOT_PRECISION, DROPOUT,
    )  # fmt: skip
    dq = _dq_range(
        dq, q, do, lse2, delta, offs_m, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
        mask_base, stride_maskn, split, hi, TK - TQ, qk_scale, row_ctr, plen, seed, drop_threshold, drop_scale,
        HEAD_DIM, BLOCK_N, CAUSAL, HAS_MASK, DOT_PRECISION, DROPOUT,
    )  # fmt: skip
    dq_ptrs = (
        DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqm + offs_d[None, :] * stride_dqd
    )
    tl.store(dq_ptrs, (dq * sm_scale).to(DQ.dtype.element_ty), mask=valid_m[:, None])


@triton.jit
def _dkdv_range(
    dk, dv, k, v, valid_n, offs_n,
    Q_BASE, DO_BASE, LSE_BASE, DELTA_BASE,
    stride_qm, stride_qd, stride_dom, stride_dod, stride_lm, stride_dm,
    start, end, causal_shift, qk_scale,
    keys, bh, TQ, KEY_STRIDE, seed, philox_offset, drop_threshold, drop_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
    DROPOUT: tl.constexpr,
):  # fmt: skip
    """Add ``dS^T Q`` (unscaled) and ``P^T dO`` over queries ``[start, end)`` to ``dk``, ``dv`` ``[BLOCK_N, D]``.

    Dropout: ``keys`` (int64 ``[BLOCK_N]``) are the block's key coordinates ``j`` in the row's ``[prefix ; own]``
    list, ``bh = b * H + h`` the (row, head) whose queries these are (``TQ`` of them)."""
    offs_m = start + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    q_ptrs = Q_BASE + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd  # [BLOCK_M, D]
    do_ptrs = DO_BASE + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod
    lse_ptrs = LSE_BASE + offs_m * stride_lm
    delta_ptrs = DELTA_BASE + offs_m * stride_dm
    for _ in range(start, end, BLOCK_M):
        valid_m = offs_m < end
        q = tl.load(q_ptrs, mask=valid_m[:, None], other=0.0)
        do = tl.load(do_ptrs, mask=valid_m[:, None], other=0.0)
        lse = tl.load(lse_ptrs, mask=valid_m, other=0.0)
        lse2 = tl.where(lse == float("-inf"), 0.0, lse * LOG2E)
        delta = tl.load(delta_ptrs, mask=valid_m, other=0.0)
        visible = valid_n[:, None] & valid_m[None, :]
        if CAUSAL:
            visible = visible & (offs_n[:, None] <= offs_m[None, :] + causal_shift)
        s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_N, BLOCK_M]
        p_t = tl.where(visible, tl.exp2(s_t - lse2[None, :]), 0.0)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        if DROPOUT:
            row_ctr = dropout_row_counters(philox_offset, bh, offs_m, TQ, KEY_STRIDE)
            z_t = dropout_multiplier(seed, keys[:, None] + row_ctr[None, :], drop_threshold, drop_scale)
            dv += tl.dot((p_t * z_t).to(do.dtype), do, input_precision=DOT_PRECISION)
            dp_t = dp_t * z_t
        else:
            dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PRECISION)
        q_ptrs += BLOCK_M * stride_qm
        do_ptrs += BLOCK_M * stride_dom
        lse_ptrs += BLOCK_M * stride_lm
        delta_ptrs += BLOCK_M * stride_dm
        offs_m += BLOCK_M
    return dk, dv


@triton.jit
def prefix_attention_bwd_dkdv_kernel(
    Q, K, V, IDS, OFFSETS, MASK, DOUT, LSE, DELTA, DK, DV,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_maskb, stride_maskn,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_lb, stride_lh, stride_lm,
    stride_db, stride_dh, stride_dm,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    TQ, TK, N_ENTRIES, qk_scale, sm_scale,
    N_HEADS, KEY_STRIDE, seed, philox_offset, drop_threshold, drop_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
    HAS_MASK: tl.constexpr, DOT_PRECISION: tl.constexpr, DROPOUT: tl.constexpr,
):  # fmt: skip
    """Grid ``(cdiv(TK, BLOCK_N), H, B)``: dK, dV of a block of a row's own keys over the queries that see it.
    IDS/OFFSETS give the row's prefix length (own key ``t`` is key ``j = P_b + t`` of the dropout counters)."""
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    n0 = tl.program_id(0) * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    valid_n = offs_n < TK
    k = tl.load(K + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                mask=valid_n[:, None], other=0.0)  # fmt: skip
    v = tl.load(V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                mask=valid_n[:, None], other=0.0)  # fmt: skip
    if HAS_MASK:
        keep = tl.load(MASK + b * stride_maskb + offs_n * stride_maskn, mask=valid_n, other=0)
        valid_n = valid_n & (keep != 0)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)

    # queries [first, full) see part of this key block (causal mask), [full, TQ) see all of it
    if CAUSAL:
        shift = TK - TQ
        first = tl.maximum(n0 - shift, 0) // BLOCK_M * BLOCK_M
        full = tl.minimum(tl.maximum(n0 + BLOCK_N - 1 - shift, 0), TQ)
        full = tl.minimum((full + BLOCK_M - 1) // BLOCK_M * BLOCK_M, TQ)
        full = tl.maximum(full, tl.minimum(first, TQ))
    else:
        shift = 0
        first = 0
        full = 0
    q_base = Q + b * stride_qb + h * stride_qh
    do_base = DOUT + b * stride_dob + h * stride_doh
    lse_base = LSE + b * stride_lb + h * stride_lh
    delta_base = DELTA + b * stride_db + h * stride_dh
    if DROPOUT:  # own key t is key j = P_b + t of the dropout counters
        _, plen = prefix_span(IDS, OFFSETS, b, N_ENTRIES)
        keys = plen + offs_n.to(tl.int64)
    else:
        keys = offs_n.to(tl.int64)  # unused
    bh = b * N_HEADS + h
    dk, dv = _dkdv_range(
        dk, dv, k, v, valid_n, offs_n, q_base, do_base, lse_base, delta_base,
        stride_qm, stride_qd, stride_dom, stride_dod, stride_lm, stride_dm,
        first, full, shift, qk_scale,
        keys, bh, TQ, KEY_STRIDE, seed, philox_offset, drop_threshold, drop_scale,
        HEAD_DIM, BLOCK_M, CAUSAL, DOT_PRECISION, DROPOUT,
    )  # fmt: skip
    dk, dv = _dkdv_range(
        dk, dv, k, v, valid_n, offs_n, q_base, do_base, lse_base, delta_base,
        stride_qm, stride_qd, stride_dom, stride_dod, stride_lm, stride_dm,
        full, TQ, 0, qk_scale,
        keys, bh, TQ, KEY_STRIDE, seed, philox_offset, drop_threshold, drop_scale,
        HEAD_DIM, BLOCK_M, False, DOT_PRECISION, DROPOUT,
    )  # fmt: skip
    dk_ptrs = (
        DK + b * stride_dkb + h * stride_dkh + offs_n[:, None] * stride_dkn + offs_d[None, :] * stride_dkd
    )
    dv_ptrs = (
        DV + b * stride_dvb + h * stride_dvh + offs_n[:, None] * stride_dvn + offs_d[None, :] * stride_dvd
    )
    tl.store(dk_ptrs, (dk * sm_scale).to(DK.dtype.element_ty), mask=(offs_n < TK)[:, None])
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=(offs_n < TK)[:, None])


@triton.jit
def prefix_attention_bwd_bank_kernel(
    Q, BANK_K, BANK_V, DOUT, LSE, DELTA, DBANK_K, DBANK_V,
    OFFSETS, ORDER, SEG_OFFSETS, TILE_ENTRY, TILE_BLOCK,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_bkh, stride_bks, stride_bkd,
    stride_bvh, stride_bvs, stride_bvd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_lb, stride_lh, stride_lm,
    stride_db, stride_dh, stride_dm,
    stride_split, stride_dbkh, stride_dbks, stride_dbkd, stride_dbvh, stride_dbvs, stride_dbvd,
    TQ, N_ENTRIES, SPLITS, qk_scale, sm_scale,
    N_HEADS, KEY_STRIDE, seed, philox_offset, drop_threshold, drop_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
    DROPOUT: tl.constexpr,
):  # fmt: skip
    """Grid ``(tile slots, H, SPLITS)``: the gradient of ``BLOCK_N`` bank rows of one used entry for one head,
    summed (fp32, in sorted row order) over split ``pid(2)`` of the rows that use the entry.

    TILE_ENTRY/TILE_BLOCK ``[slots]`` (entry ``-1`` = idle slot), ORDER ``[B]`` rows sorted by id,
    SEG_OFFSETS ``[N + 1]``; DBANK_K/DBANK_V ``[SPLITS, H, S, D]`` (``stride_split`` 0 when ``SPLITS == 1``).
    """
    t = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)
    entry = tl.load(TILE_ENTRY + t).to(tl.int64)
    has = (entry >= 0).to(tl.int64)
    safe = tl.maximum(entry, 0)
    lo = tl.load(OFFSETS + tl.minimum(safe, N_ENTRIES)).to(tl.int64)
    hi = tl.load(OFFSETS + tl.minimum(safe + 1, N_ENTRIES)).to(tl.int64)
    p0 = tl.load(TILE_BLOCK + t).to(tl.int64) * BLOCK_N  # first prefix key of the tile (key j = p)
    n0 = lo + p0
    n_rows = tl.minimum(hi - n0, BLOCK_N) * has  # 0 for an idle slot
    # rows of this split: a contiguous chunk of the entry's sorted rows (none for an idle slot)
    seg_lo = tl.load(SEG_OFFSETS + tl.minimum(safe, N_ENTRIES)).to(tl.int64)
    seg_hi = tl.load(SEG_OFFSETS + tl.minimum(safe + 1, N_ENTRIES)).to(tl.int64)
    chunk = ((seg_hi - seg_lo) * has + SPLITS - 1) // SPLITS
    r_lo = seg_lo + split * chunk
    r_hi = tl.minimum(r_lo + chunk, seg_hi)

    offs_r = tl.arange(0, BLOCK_N)
    offs_n = n0 + offs_r
    offs_d = tl.arange(0, HEAD_DIM)
    valid_n = offs_r < n_rows
    k = tl.load(BANK_K + h * stride_bkh + offs_n[:, None] * stride_bks + offs_d[None, :] * stride_bkd,
                mask=valid_n[:, None], other=0.0)  # fmt: skip
    v = tl.load(BANK_V + h * stride_bvh + offs_n[:, None] * stride_bvs + offs_d[None, :] * stride_bvd,
                mask=valid_n[:, None], other=0.0)  # fmt: skip
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    keys = p0 + offs_r.to(tl.int64)
    for r in range(r_lo, r_hi):
        b = tl.load(ORDER + r).to(tl.int64)
        dk, dv = _dkdv_range(
            dk, dv, k, v, valid_n, offs_n,
            Q + b * stride_qb + h * stride_qh, DOUT + b * stride_dob + h * stride_doh,
            LSE + b * stride_lb + h * stride_lh, DELTA + b * stride_db + h * stride_dh,
            stride_qm, stride_qd, stride_dom, stride_dod, stride_lm, stride_dm,
            0, TQ, 0, qk_scale,
            keys, b * N_HEADS + h, TQ, KEY_STRIDE, seed, philox_offset, drop_threshold, drop_scale,
            HEAD_DIM, BLOCK_M, False, DOT_PRECISION, DROPOUT,
        )  # fmt: skip
    split64 = split.to(tl.int64) * stride_split
    dbk = DBANK_K + split64 + h * stride_dbkh + offs_n[:, None] * stride_dbks + offs_d[None, :] * stride_dbkd
    dbv = DBANK_V + split64 + h * stride_dbvh + offs_n[:, None] * stride_dbvs + offs_d[None, :] * stride_dbvd
    tl.store(dbk, (dk * sm_scale).to(DBANK_K.dtype.element_ty), mask=valid_n[:, None])
    tl.store(dbv, dv.to(DBANK_V.dtype.element_ty), mask=valid_n[:, None])
