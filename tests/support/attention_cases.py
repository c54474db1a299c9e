"""What the kernel tests share (this module holds no tests): a call's arguments, per-dtype tolerances, the
oracle's results, and the comparison with them. Each backend's case module (``cpp_cases``, ``triton_cases``)
builds its own inputs and tolerance table on these."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from prefixrt.ops import AttentionArgs, BankLayer, StepPlan
from prefixrt.ops.reference import prefix_attention_reference, prefix_attention_reference_backward

# The gradients of a call, in the order the backward returns them.
GRAD_NAMES = ("dq", "dk", "dv", "dbank_k", "dbank_v")


@dataclass(frozen=True)
class Tolerance:
    """``atol`` is relative to the largest magnitude of the expected tensor (at least 1); ``rtol`` elementwise."""

    out: float
    lse: float
    grad: float


def philox_state(seed: int, offset: int = 0) -> torch.Tensor:
    """A fixed Philox state ``(seed, offset)`` (unsigned ints stored as int64 bit patterns), for tests that
    compare backends on the very same dropout mask."""
    to_signed = [x - (1 << 64) if x >= 1 << 63 else x for x in (seed, offset)]
    return torch.tensor(to_signed, dtype=torch.long)


def assert_close(
    actual: torch.Tensor,
    expected: torch.Tensor,
    tol: float,
    what: str = "",
    dtype: torch.dtype = torch.float32,
) -> None:
    """Compare in ``dtype`` with ``atol = tol * max(1, max|expected|)`` and ``rtol = tol``; infinities must
    match (position and sign) and the result must hold no NaN."""
    actual, expected = actual.to(dtype), expected.to(dtype)
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
        """The oracle's positional arguments (``prefix_attention_reference``)."""
        return (self.q, self.k, self.v, self.bank_k, self.bank_v, self.prefix_ids, self.bank_offsets,
                self.key_padding_mask, self.causal, self.scale)  # fmt: skip

    def bank(self) -> BankLayer:
        return BankLayer(self.bank_k, self.bank_v, self.bank_offsets)

    def plan(self) -> StepPlan:
        return StepPlan.build(self.prefix_ids, self.bank_offsets.diff())

    def inputs(self, *leaves: torch.Tensor) -> tuple:
        """The public op's positional arguments: ``prefix_attention(*case.inputs(), backend=...)``; with
        ``leaves`` = (q, k, v, bank_k, bank_v) those tensors replace the case's (e.g. leaves that need grad)."""
        q, k, v, bank_k, bank_v = leaves or (self.q, self.k, self.v, self.bank_k, self.bank_v)
        bank = BankLayer(bank_k, bank_v, self.bank_offsets)
        return (q, k, v, bank, self.plan(), self.key_padding_mask, self.causal, self.scale)

    def attention_args(self, dropout_p: float = 0.0, philox: torch.Tensor | None = None) -> AttentionArgs:
        """What a backend or launcher receives (with dropout: ``dropout_p`` and a Philox state ``[2]``)."""
        return AttentionArgs(*self.inputs(), dropout_p, philox)

    def args_as(self, dtype: torch.dtype) -> tuple:
        """The arguments with every floating tensor converted to ``dtype`` (widening is exact)."""
        return tuple(
            a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in self.args()
        )

    def double_args(self) -> tuple:
        return self.args_as(torch.float64)

    def float_args(self) -> tuple:
        return self.args_as(torch.float32)

    def with_(self, **changes) -> Case:
        return replace(self, **changes)

    @property
    def dtype(self) -> torch.dtype:
        return self.q.dtype


def reference_outputs(
    case: Case, dropout_p: float = 0.0, philox: torch.Tensor | None = None, *, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)`` of ``prefix_attention_reference`` on the case's values in ``dtype`` (with dropout: the
    mask of ``philox``)."""
    return prefix_attention_reference(*case.args_as(dtype), dropout_p, philox)


def reference_gradients(
    case: Case,
    dout: torch.Tensor,
    dropout_p: float = 0.0,
    philox: torch.Tensor | None = None,
    *,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, ...]:
    """``(dq, dk, dv, dbank_k, dbank_v)`` of ``prefix_attention_reference_backward`` in ``dtype`` (with dropout:
    the mask of ``philox``)."""
    return prefix_attention_reference_backward(dout.to(dtype), *case.args_as(dtype), dropout_p, philox)
