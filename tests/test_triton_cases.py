"""Shared inputs, reference results and tolerances for the Triton tests (this module holds no tests).

Shapes are small on purpose: on CPU the kernels run in Triton's interpreter, where every block operation
costs about a millisecond. ``make_case`` builds one prefix-attention call with a packed bank of the given
entry lengths; ``TOLERANCES`` is the one table per dtype every Triton test compares with.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import pytest
import torch

from prefixrt.ops.reference import prefix_attention_reference, prefix_attention_reference_backward

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
gpu = pytest.mark.skipif(
    not HAS_CUDA, reason="needs a CUDA device: the Triton interpreter computes bf16 wrongly"
)

# Every length the issue names, in one bank: entry e has length ENTRY_LENGTHS[e].
ENTRY_LENGTHS = (0, 1, 15, 16, 17, 64, 200)


@dataclass(frozen=True)
class Tolerance:
    """``atol`` is relative to the largest magnitude of the expected tensor (at least 1); ``rtol`` elementwise."""

    out: float
    lse: float
    grad: float


TOLERANCES = {
    torch.float32: Tolerance(out=1e-4, lse=1e-4, grad=1e-4),
    torch.float16: Tolerance(out=1e-2, lse=1e-3, grad=2e-2),
    torch.bfloat16: Tolerance(out=4e-2, lse=1e-2, grad=8e-2),
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str = "") -> None:
    """Compare in fp32 with ``atol = tol * max(1, max|expected|)`` and ``rtol = tol``; infinities must match."""
    actual, expected = actual.float(), expected.float()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert not actual.isnan().any(), f"{what}: NaN in the result"
    finite = expected.isfinite()
    assert torch.equal(actual.isfinite(), finite), f"{what}: infinities differ"
    assert torch.equal(actual[~finite], expected[~finite]), f"{what}: infinities differ in sign"
    scale = max(1.0, expected[finite].abs().max().item()) if finite.any() else 1.0
    torch.testing.assert_close(
        actual[finite], expected[finite], atol=tol * scale, rtol=tol, msg=lambda m: f"{what}: {m}"
    )


@dataclass(frozen=True)
class Case:
    """One prefix-attention call (the arguments of ``prefix_attention_reference``, in order)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    bank_k: torch.Tensor
    bank_v: torch.Tensor
    prefix_ids: torch.Tensor
    bank_offsets: torch.Tensor
    key_padding_mask: torch.Tensor | None
    causal: bool
    scale: float

    def args(self) -> tuple:
        return (self.q, self.k, self.v, self.bank_k, self.bank_v, self.prefix_ids, self.bank_offsets,
                self.key_padding_mask, self.causal, self.scale)  # fmt: skip

    def float_args(self) -> tuple:
        """The arguments with every floating tensor in fp32 (the reference then returns fp32 results)."""
        return tuple(
            a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in self.args()
        )

    def with_(self, **changes) -> Case:
        return replace(self, **changes)


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


def reference(case: Case) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)`` of the oracle in fp32."""
    return prefix_attention_reference(*case.float_args())


def reference_grads(case: Case, dout: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``(dq, dk, dv, dbank_k, dbank_v)`` of the oracle in fp32."""
    return prefix_attention_reference_backward(dout.float(), *case.float_args())


GRAD_NAMES = ("dq", "dk", "dv", "dbank_k", "dbank_v")


def unused_entries(case: Case) -> list[int]:
    """Entries no row uses (their bank gradient must be exactly zero)."""
    used = set(case.prefix_ids.tolist())
    return [e for e in range(case.bank_offsets.shape[0] - 1) if e not in used]
