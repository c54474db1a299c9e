"""Shared inputs, oracle results and tolerances for the C++ backend tests (this module holds no tests).

``make_case`` builds one prefix-attention call over a packed bank of the given entry lengths; the oracle is
``prefix_attention_reference`` on the same values in float64. ``TOLERANCES`` is the one table per dtype that
every C++ test compares with. ``one_thread`` (a fixture) runs a test on one intra-op thread.
``cpp_kernels`` (a fixture) builds the kernels once, skips when this machine
has no C++ compiler (or ``PREFIXRT_NO_CPP`` is set), and fails, with the reason, when a machine that has one cannot build them.
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from functools import partial

import pytest
import torch

from prefixrt.ops.cpp import build as cpp_build
from support.attention_cases import (  # noqa: F401  (re-exported)
    GRAD_NAMES,
    Case,
    Tolerance,
    philox_state,
    reference_gradients,
    reference_outputs,
)
from support.attention_cases import assert_close as shared_assert_close
from support.threads import one_thread  # noqa: F401  (the fixture, for the C++ test modules)

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Every prefix length the issue names, in one packed bank: entry e has length ENTRY_LENGTHS[e].
ENTRY_LENGTHS = (0, 1, 17, 200)


TOLERANCES = {
    torch.float32: Tolerance(out=2e-5, lse=2e-5, grad=5e-5),
    torch.float16: Tolerance(out=2e-3, lse=2e-5, grad=5e-3),
    torch.bfloat16: Tolerance(out=1e-2, lse=2e-5, grad=3e-2),
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str = "") -> None:
    """:func:`attention_cases.assert_close` in fp64 (the oracle here runs in fp64)."""
    shared_assert_close(actual, expected, tol, what, dtype=torch.float64)


def make_case(
    batch: int = 3,
    heads: int = 2,
    q_len: int = 37,
    k_len: int | None = None,
    head_dim: int = 64,
    entry_lengths: tuple[int, ...] = ENTRY_LENGTHS,
    prefix_ids: list[int] | None = None,
    causal: bool = True,
    padding: str | None = None,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> Case:
    """A call with random inputs; ``padding`` is None, ``"left"``, ``"right"`` or ``"random"`` (key padding)."""
    g = torch.Generator().manual_seed(seed)
    k_len = q_len if k_len is None else k_len

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    offsets = torch.tensor([0, *torch.tensor(entry_lengths, dtype=torch.long).cumsum(0).tolist()])
    if prefix_ids is None:
        prefix_ids = [(b % (len(entry_lengths) + 1)) - 1 for b in range(batch)]
    mask = None
    if padding is not None:
        lengths = torch.randint(1, k_len + 1, (batch,), generator=g)
        steps = torch.arange(k_len)
        if padding == "left":
            mask = steps[None, :] >= (k_len - lengths)[:, None]
        elif padding == "right":
            mask = steps[None, :] < lengths[:, None]
        else:
            mask = torch.rand(batch, k_len, generator=g) < 0.7
    return Case(
        q=randn(batch, heads, q_len, head_dim),
        k=randn(batch, heads, k_len, head_dim),
        v=randn(batch, heads, k_len, head_dim),
        bank_k=randn(heads, int(offsets[-1]), head_dim),
        bank_v=randn(heads, int(offsets[-1]), head_dim),
        prefix_ids=torch.tensor(prefix_ids, dtype=torch.long),
        bank_offsets=offsets,
        key_padding_mask=mask,
        causal=causal,
        scale=head_dim**-0.5,
    )


def with_mask(case: Case, mask: torch.Tensor | None) -> Case:
    return replace(case, key_padding_mask=mask)


# The oracle runs in fp64 on the case's exact values: ``oracle(case, dropout_p=0.0, philox=None)`` is
# ``(out, lse)``, ``oracle_grads(case, dout, dropout_p=0.0, philox=None)`` is ``(dq, dk, dv, dbank_k, dbank_v)``.
oracle = partial(reference_outputs, dtype=torch.float64)
oracle_grads = partial(reference_gradients, dtype=torch.float64)


@pytest.fixture(scope="session")
def cpp_kernels():
    """The compiled kernel module; skips without a C++ compiler, fails when one is there but the build fails."""
    module, reason = cpp_build.kernels_or_reason()
    if module is None:
        if "PREFIXRT_NO_CPP" in reason or (shutil.which("c++") is None and shutil.which("g++") is None):
            pytest.skip(f"no C++ compiler on this machine: {reason}")
        pytest.fail(f"the C++ kernels did not build: {reason}")
    return module
