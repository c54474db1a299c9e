"""Shared inputs, reference results and tolerances for the Triton tests (this module holds no tests).

Shapes are small on purpose: on CPU the kernels run in Triton's interpreter, where every block operation
costs about a millisecond. ``make_case`` builds one prefix-attention call with a packed bank of the given
entry lengths; ``TOLERANCES`` is the one table per dtype every Triton test compares with.
"""

from __future__ import annotations

from functools import partial

import pytest
import torch

from support.attention_cases import (  # noqa: F401  (re-exported)
    GRAD_NAMES,
    Case,
    Tolerance,
    assert_close,
    philox_state,
    reference_gradients,
    reference_outputs,
)

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
gpu = pytest.mark.skipif(
    not HAS_CUDA, reason="needs a CUDA device: the Triton interpreter computes bf16 wrongly"
)

# Every length the issue names, in one bank: entry e has length ENTRY_LENGTHS[e].
ENTRY_LENGTHS = (0, 1, 15, 16, 17, 64, 200)


TOLERANCES = {
    torch.float32: Tolerance(out=1e-4, lse=1e-4, grad=1e-4),
    torch.float16: Tolerance(out=1e-2, lse=1e-3, grad=2e-2),
    torch.bfloat16: Tolerance(out=4e-2, lse=1e-2, grad=8e-2),
}


def padding_mask(batch: int, k_len: int, padding: str | None, device=DEVICE) -> torch.Tensor | None:
    """``[B, Tk]`` bool (True = attend): ``left`` / ``right`` pad ``b % 3 + 1`` keys of row ``b``;
    ``mixed`` alternates left and right; ``full`` is ``mixed`` with row 0 entirely padded."""
    if padding is None:
        return None
    mask = torch.ones(batch, k_len, dtype=torch.bool, device=device)
    for b in range(batch):
        pad = min(b % 3 + 1, k_len - 1) if k_len > 1 else 0
        left = padding == "left" or (padding in ("mixed", "full") and b % 2 == 0)
        if pad:
            if left:
                mask[b, :pad] = False
            else:
                mask[b, k_len - pad :] = False
    if padding == "full":
        mask[0] = False
    return mask


def make_case(
    ids: list[int],
    q_len: int,
    k_len: int | None = None,
    entry_lengths: tuple[int, ...] = (3, 16, 0, 21),
    heads: int = 1,
    head_dim: int = 16,
    causal: bool = True,
    padding: str | None = None,
    dtype: torch.dtype = torch.float32,
    fused_qkv: bool = False,
    seed: int = 0,
) -> Case:
    """A call with ``len(ids)`` rows over a packed bank of the given entry lengths.

    ``fused_qkv`` makes q/k/v strided views of one projection (``[B, T, 3, H, D]`` as HF's GPT-2 does) and
    the bank a transposed view of an ``[S, H, D]`` tensor.
    """
    k_len = q_len if k_len is None else k_len
    g = torch.Generator().manual_seed(seed)
    batch = len(ids)
    lengths = torch.tensor(entry_lengths, dtype=torch.long)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    total = int(offsets[-1])

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(dtype=dtype, device=DEVICE)

    if fused_qkv:
        if q_len == k_len:
            qkv = randn(batch, q_len, 3, heads, head_dim)
            q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
        else:  # cross-attention: q from the decoder, k/v fused from the encoder
            q = randn(batch, q_len, heads, head_dim).transpose(1, 2)
            kv = randn(batch, k_len, 2, heads, head_dim)
            k, v = (kv[:, :, i].transpose(1, 2) for i in range(2))
        bank_k = randn(total, heads, head_dim).transpose(0, 1)
        bank_v = randn(total, heads, head_dim).transpose(0, 1)
    else:
        q = randn(batch, heads, q_len, head_dim)
        k, v = randn(batch, heads, k_len, head_dim), randn(batch, heads, k_len, head_dim)
        bank_k, bank_v = randn(heads, total, head_dim), randn(heads, total, head_dim)
    return Case(q, k, v, bank_k, bank_v, torch.tensor(ids, dtype=torch.long, device=DEVICE),
                offsets.to(DEVICE), padding_mask(batch, k_len, padding), causal, head_dim**-0.5)  # fmt: skip


# The oracle in fp32: ``reference(case, dropout_p=0.0, philox=None)`` is ``(out, lse)``,
# ``reference_grads(case, dout, dropout_p=0.0, philox=None)`` is ``(dq, dk, dv, dbank_k, dbank_v)``.
reference = partial(reference_outputs, dtype=torch.float32)
reference_grads = partial(reference_gradients, dtype=torch.float32)


def unused_entries(case: Case) -> list[int]:
    """Entries no row uses (their bank gradient must be exactly zero)."""
    used = set(case.prefix_ids.tolist())
    return [e for e in range(case.bank_offsets.shape[0] - 1) if e not in used]
