"""Attention dropout in the Triton kernels: the mask of ``prefixrt.ops.dropout``, regenerated wherever it is needed.

Element ``(b, h, i, j)`` (``j`` over the row's ``[prefix ; own]`` keys) draws ``tl.randint(seed, c)`` with the
64-bit counter ``c = offset + ((b * H + h) * TQ + i) * KEY_STRIDE + j`` and is kept iff that word is at least
``threshold = floor(p * 2^32)``; kept probabilities are scaled by ``scale = 1 / (1 - p)``. Nothing is stored:
the forward and the three backward kernels (dQ, dK/dV, bank) each draw the elements they touch.
``seed`` and ``offset`` arrive as int64 bit patterns; all counter arithmetic is int64 (it wraps like the
unsigned definition).

Only ``@triton.jit`` code lives here; the launcher of :func:`dropout_mask_kernel` (for tests) is
:mod:`prefixrt.ops.triton.launch`.
"""

import triton
import triton.language as tl


@triton.jit
def dropout_row_counters(philox_offset, bh, offs_m, TQ, KEY_STRIDE):
    """int64 ``[BLOCK_M]``: the counter of key ``j = 0`` of queries ``offs_m`` of (row, head) ``bh = b * H + h``."""
    return philox_offset + (bh * TQ + offs_m.to(tl.int64)) * KEY_STRIDE


@triton.jit
def dropout_multiplier(seed, counters, threshold, scale):
    """fp32 tile of ``counters``' shape: ``scale`` where the element is kept, ``0`` where it is dropped."""
    bits = tl.randint(seed, counters).to(tl.int64)  # uint32 -> int64 zero-extends
    return tl.where(bits >= threshold, scale, 0.0)


@triton.jit
def dropout_mask_kernel(
    B_IDX, H_IDX, I_IDX, J_IDX, OUT, N, N_HEADS, TQ, KEY_STRIDE, seed, philox_offset, threshold, scale,
    BLOCK: tl.constexpr,
):  # fmt: skip
    """Grid ``(cdiv(N, BLOCK),)``: ``OUT[n]`` = the multiplier of element ``(B_IDX[n], H_IDX[n], I_IDX[n], J_IDX[n])``
    through the very helpers the attention kernels use (tests compare it with the reference and C++)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < N
    b = tl.load(B_IDX + offs, mask=valid, other=0).to(tl.int64)
    h = tl.load(H_IDX + offs, mask=valid, other=0).to(tl.int64)
    i = tl.load(I_IDX + offs, mask=valid, other=0).to(tl.int64)
    j = tl.load(J_IDX + offs, mask=valid, other=0).to(tl.int64)
    counters = dropout_row_counters(philox_offset, b * N_HEADS + h, i, TQ, KEY_STRIDE) + j
    tl.store(OUT + offs, dropout_multiplier(seed, counters, threshold, scale), mask=valid)
