"""Triton forward of prefix attention (prefill and training): one online softmax over ``[bank prefix ; own keys]``.

Row ``b`` reads its prefix out of the packed bank through ``bank_offsets[prefix_ids[b]]``; id ``-1`` is folded
into a prefix length of 0 rather than into a mask (Triton's CPU interpreter rejects a mask combined with a
condition on a loaded value, such as ``m & (pid >= 0)``, with "mask has unsupported dtype"). Scores live in
base 2 inside the kernel (``qk_scale = scale * log2(e)``); the stored log-sum-exp is natural-log, fp32, ``-inf``
for a query that sees no key (its output is 0).

With ``DROPOUT`` the normalized probabilities are multiplied by the mask of :mod:`prefixrt.kernels.dropout`
(drawn per element from the Philox state, never stored) before ``P V``; the running sum ``l`` and the log-sum-exp
stay those of the undropped scores.

Only ``@triton.jit`` code lives here; the launcher is :mod:`prefixrt.ops.triton.launch`.
"""

import triton
import triton.language as tl

from .dropout import dropout_multiplier, dropout_row_counters

LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def prefix_span(IDS, OFFSETS, b, N_ENTRIES):
    """``(first bank row, length)`` of row ``b``'s prefix; length 0 when ``prefix_ids[b] == -1``.

    Ids are clamped into ``[0, N_ENTRIES]`` before indexing ``OFFSETS`` (``N_ENTRIES + 1`` values), so an
    empty bank (``N_ENTRIES == 0``) reads ``OFFSETS[0]`` twice and gets length 0.
    """
    pid = tl.load(IDS + b).to(tl.int64)
    has = (pid >= 0).to(tl.int64)
    safe = tl.maximum(pid, 0)
    lo = tl.load(OFFSETS + tl.minimum(safe, N_ENTRIES)).to(tl.int64)
    hi = tl.load(OFFSETS + tl.minimum(safe + 1, N_ENTRIES)).to(tl.int64)
    return lo, (hi - lo) * has


@triton.jit
def causal_key_ranges(m0, TQ, TK, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    """Own keys a query block ``[m0, m0 + BLOCK_M)`` may see: ``[0, split)`` needs no causal mask and
    ``[split, hi)`` does (bottom-right alignment: query ``i`` sees key ``j <= i + TK - TQ``)."""
    if CAUSAL:
        shift = TK - TQ
        hi = tl.minimum(tl.minimum(m0 + BLOCK_M, TQ) + shift, TK)
        hi = tl.maximum(hi, 0)
        split = tl.maximum(m0 + shift + 1, 0) // BLOCK_N * BLOCK_N
        split = tl.minimum(split, hi)
    else:
        hi = TK
        split = TK
    return split, hi


@triton.jit
def _attend_block(
    acc, l_i, m_i, q, offs_m, offs_n, k_ptrs, v_ptrs, mask_ptrs, end, causal_shift, qk_scale,
    row_ctr, key_base, seed, drop_threshold, drop_scale,
    BOUNDED: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, DOT_PRECISION: tl.constexpr,
    DROPOUT: tl.constexpr,
):  # fmt: skip
    """Fold one block of keys ``offs_n`` into ``(acc, l_i, m_i)``. Without ``BOUNDED``, ``CAUSAL`` and ``HAS_MASK``
    every key of the block is visible: no load masks, no ``where``s, and ``m`` is finite after it (the hot path
    of long prefixes and of the own keys left of the diagonal). With ``DROPOUT``, key ``offs_n`` is key
    ``key_base + offs_n`` of the row's ``[prefix ; own]`` list and ``row_ctr [BLOCK_M]`` the queries' counters."""
    if BOUNDED:
        valid_n = offs_n < end
        k = tl.load(k_ptrs, mask=valid_n[None, :], other=0.0)
    else:
        valid_n = offs_n >= 0  # all true; only read when masked by the mask below
        k = tl.load(k_ptrs)
    s = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale
    if HAS_MASK:
        valid_n = valid_n & (tl.load(mask_ptrs, mask=valid_n, other=0) != 0)
    if BOUNDED or CAUSAL or HAS_MASK:
        visible = valid_n[None, :]
        if CAUSAL:
            visible = visible & (offs_n[None, :] <= offs_m[:, None] + causal_shift)
        s = tl.where(visible, s, float("-inf"))
        # a row that has seen nothing yet keeps m = -inf and contributes exp2(-inf) = 0
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_ref = m_new
    p = tl.exp2(s - m_ref[:, None])
    alpha = tl.exp2(m_i - m_ref)
    l_i = l_i * alpha + tl.sum(p, 1)
    if DROPOUT:  # after the row sum: l and the lse are those of the undropped scores
        keys = (key_base + offs_n).to(tl.int64)
        p = p * dropout_multiplier(seed, row_ctr[:, None] + keys[None, :], drop_threshold, drop_scale)
    if BOUNDED:
        v = tl.load(v_ptrs, mask=valid_n[:, None], other=0.0)
    else:
        v = tl.load(v_ptrs)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, l_i, m_new


@triton.jit
def _attend_range(
    acc,
    l_i,
    m_i,
    q,
    offs_m,
    K_BASE,
    V_BASE,
    stride_kn,
    stride_kd,
    stride_vn,
    stride_vd,
    MASK_BASE,
    stride_maskn,
    start,
    end,
    causal_shift,
    qk_scale,
    row_ctr,
    key_base,
    seed,
    drop_threshold,
    drop_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_MASK: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DROPOUT: tl.constexpr,
):
    """Fold keys ``[start, end)`` of one K/V sequence into the running ``(acc, l_i, m_i)`` (base-2 scores):
    the whole blocks without bounds checks, then the partial last block (if any) with them. Key ``n`` of the
    sequence is key ``key_base + n`` of the row's ``[prefix ; own]`` list (for the dropout counters)."""
    offs_n = start + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    k_ptrs = K_BASE + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd  # [D, BLOCK_N]
    v_ptrs = V_BASE + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd  # [BLOCK_N, D]
    mask_ptrs = MASK_BASE + offs_n * stride_maskn
    whole_end = start + (end - start) // BLOCK_N * BLOCK_N
    for _ in range(start, whole_end, BLOCK_N):
        acc, l_i, m_i = _attend_block(
            acc, l_i, m_i, q, offs_m, offs_n, k_ptrs, v_ptrs, mask_ptrs, end, causal_shift, qk_scale,
            row_ctr, key_base, seed, drop_threshold, drop_scale,
            False, CAUSAL, HAS_MASK, DOT_PRECISION, DROPOUT,
        )  # fmt: skip
        k_ptrs += BLOCK_N * stride_kn
        v_ptrs += BLOCK_N * stride_vn
        mask_ptrs += BLOCK_N * stride_maskn
        offs_n += BLOCK_N
    if whole_end < end:
        acc, l_i, m_i = _attend_block(
            acc, l_i, m_i, q, offs_m, offs_n, k_ptrs, v_ptrs, mask_ptrs, end, causal_shift, qk_scale,
            row_ctr, key_base, seed, drop_threshold, drop_scale,
            True, CAUSAL, HAS_MASK, DOT_PRECISION, DROPOUT,
        )  # fmt: skip
    return acc, l_i, m_i


@triton.jit
def prefix_attention_fwd_kernel(
    Q,
    K,
    V,
    BANK_K,
    BANK_V,
    IDS,
    OFFSETS,
    MASK,
    OUT,
    LSE,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_vd,
    stride_bkh,
    stride_bks,
    stride_bkd,
    stride_bvh,
    stride_bvs,
    stride_bvd,
    stride_maskb,
    stride_maskn,
    stride_ob,
    stride_oh,
    stride_om,
    stride_od,
    stride_lb,
    stride_lh,
    stride_lm,
    TQ,
    TK,
    N_ENTRIES,
    qk_scale,
    N_HEADS,
    KEY_STRIDE,
    seed,
    philox_offset,
    drop_threshold,
    drop_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_MASK: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DROPOUT: tl.constexpr,
):
    """Grid ``(cdiv(TQ, BLOCK_M), H, B)``: one program per (query block, row, head).

    Q ``[B, H, TQ, D]``, K/V ``[B, H, TK, D]``, BANK_K/BANK_V ``[H, S, D]``, IDS ``[B]``, OFFSETS
    ``[N_ENTRIES + 1]``, MASK ``[B, TK]`` uint8 (1 = attend; ignored unless HAS_MASK), OUT ``[B, H, TQ, D]``,
    LSE ``[B, H, TQ]`` fp32. Dropout (``DROPOUT``): ``N_HEADS``, ``KEY_STRIDE`` (``S + TK``), the Philox
    ``seed`` and ``philox_offset`` (int64 bit patterns), ``drop_threshold`` (``floor(p 2^32)``) and
    ``drop_scale`` (``1 / (1 - p)``); ignored otherwise.
    """
    start_m = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    m0 = start_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    valid_m = offs_m < TQ

    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=valid_m[:, None], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)

    # dropout counters of key 0 of these queries (unused without DROPOUT)
    row_ctr = dropout_row_counters(philox_offset, b * N_HEADS + h, offs_m, TQ, KEY_STRIDE)

    # -- prefix part: never masked, read in place from the bank; prefix key p is key j = p
    lo, plen = prefix_span(IDS, OFFSETS, b, N_ENTRIES)
    acc, l_i, m_i = _attend_range(
        acc, l_i, m_i, q, offs_m,
        BANK_K + h * stride_bkh + lo * stride_bks, BANK_V + h * stride_bvh + lo * stride_bvs,
        stride_bks, stride_bkd, stride_bvs, stride_bvd,
        MASK, 0, 0, plen, 0, qk_scale, row_ctr, 0, seed, drop_threshold, drop_scale,
        HEAD_DIM, BLOCK_N, False, False, DOT_PRECISION, DROPOUT,
    )  # fmt: skip

    # -- own part: key padding everywhere, the causal mask only on the diagonal blocks; own key t is j = plen + t
    split, hi = causal_key_ranges(m0, TQ, TK, BLOCK_M, BLOCK_N, CAUSAL)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    mask_base = MASK + b * stride_maskb
    acc, l_i, m_i = _attend_range(
        acc, l_i, m_i, q, offs_m, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
        mask_base, stride_maskn, 0, split, 0, qk_scale, row_ctr, plen, seed, drop_threshold, drop_scale,
        HEAD_DIM, BLOCK_N, False, HAS_MASK, DOT_PRECISION, DROPOUT,
    )  # fmt: skip
    acc, l_i, m_i = _attend_range(
        acc, l_i, m_i, q, offs_m, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
        mask_base, stride_maskn, split, hi, TK - TQ, qk_scale, row_ctr, plen, seed, drop_threshold, drop_scale,
        HEAD_DIM, BLOCK_N, CAUSAL, HAS_MASK, DOT_PRECISION, DROPOUT,
    )  # fmt: skip

    # -- epilogue: a query that saw no key gets out = 0 and lse = -inf
    seen = l_i > 0.0
    l_safe = tl.where(seen, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse = tl.where(seen, (m_i + tl.log2(l_safe)) * LN2, float("-inf"))
    o_ptrs = OUT + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od
    tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=valid_m[:, None])
    tl.store(LSE + b * stride_lb + h * stride_lh + offs_m * stride_lm, lse, mask=valid_m)
