"""The Triton backward against the reference oracle: dq, dk, dv and the bank gradient (summed over rows that
share an id, zero for unused entries, deterministic)."""

import pytest
import torch
from support.triton_cases import (
    ENTRY_LENGTHS,
    GRAD_NAMES,
    TOLERANCES,
    assert_close,
    gpu,
    make_case,
    reference_grads,
    unused_entries,
)

from prefixrt.ops.triton.configs import BWD_CONFIGS
from prefixrt.ops.triton.launch import prefix_attention_bwd, prefix_attention_fwd

DTYPES = [torch.float32, torch.float16]


def run_backward(case, seed=1, **kwargs):
    out, lse = prefix_attention_fwd(case.attention_args())
    g = torch.Generator().manual_seed(seed)
    dout = torch.randn(out.shape, generator=g).to(out)
    return dout, prefix_attention_bwd(case.attention_args(), dout, out, lse, **kwargs)


def check_backward(case, **kwargs):
    dout, grads = run_backward(case, **kwargs)
    expected = reference_grads(case, dout)
    tol = TOLERANCES[case.q.dtype].grad
    for name, got, want, like in zip(GRAD_NAMES, grads, expected, case.args()[:5], strict=True):
        assert got.dtype == like.dtype and got.shape == like.shape, name
        assert_close(got, want, tol, name)
    dbank_k, dbank_v = grads[3:]
    for e in unused_entries(case):
        rows = slice(int(case.bank_offsets[e]), int(case.bank_offsets[e + 1]))
        assert not dbank_k[:, rows].any() and not dbank_v[:, rows].any(), f"unused entry {e} got a gradient"
    return grads


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [True, False])
def test_every_entry_length_in_one_batch(causal, dtype):
    ids = [6, 0, 2, -1, 4, 5, 1, 3, 6]  # entry 6 (length 200) twice
    check_backward(make_case(ids, q_len=17, entry_lengths=ENTRY_LENGTHS, causal=causal, dtype=dtype))


@pytest.mark.parametrize("q_len", [1, 2, 17, pytest.param(128, marks=pytest.mark.slow)])
def test_sequence_lengths(q_len):
    check_backward(make_case([3, 0, -1], q_len=q_len, heads=2, padding="mixed"))


@pytest.mark.parametrize(
    "ids",
    [[1, 1, 1, 1], [0, 1, 2, 3], [3, 0, 3, 1, 3], [-1, 2, -1, 0], [3], [-1, -1]],
    ids=["all-equal", "all-distinct", "repeated-non-contiguous", "with-none", "largest-id", "all-none"],
)
def test_id_patterns(ids):
    check_backward(make_case(ids, q_len=9, heads=2))


def test_empty_bank():
    check_backward(make_case([-1, -1], q_len=5, entry_lengths=()))


@pytest.mark.parametrize("padding", ["left", "right", "mixed"])
def test_key_padding(padding):
    check_backward(make_case([3, 0, -1, 1], q_len=11, padding=padding, dtype=torch.float16))


def test_fully_padded_row_gets_zero_gradient():
    case = make_case([-1, 0, 3], q_len=6, padding="full")
    dq, dk, dv, _, _ = check_backward(case)
    for name, grad in (("dq", dq), ("dk", dk), ("dv", dv)):
        assert torch.equal(grad[0], torch.zeros_like(grad[0])), name


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("shape", [(5, 23), (9, 4), (3, 0)], ids=["tq<tk", "tq>tk", "no-own-keys"])
def test_query_and_key_lengths_differ(shape, causal):
    q_len, k_len = shape
    check_backward(make_case([1, -1, 3], q_len=q_len, k_len=k_len, causal=causal, padding="mixed"))


@pytest.mark.parametrize("causal", [True, False])
def test_non_contiguous_views(causal):
    k_len = 13 if causal else 7
    check_backward(make_case([3, 0, 3], q_len=13, k_len=k_len, heads=2, causal=causal, fused_qkv=True,
                             padding="left"))  # fmt: skip


@pytest.mark.parametrize("head_dim", [32, 64, 128])
def test_head_dims(head_dim):
    check_backward(make_case([3, 1, 3], q_len=7, head_dim=head_dim, dtype=torch.float16))


@pytest.mark.parametrize("config", BWD_CONFIGS, ids=lambda c: f"m{c.block_m}n{c.block_n}")
def test_every_config(config):
    case = make_case(
        [4, 2, -1, 4], q_len=20, entry_lengths=(0, 1, 15, 16, 17), padding="mixed", dtype=torch.float16
    )
    check_backward(case, config=config)


@pytest.mark.parametrize("splits", [2, 3])
def test_bank_row_splits(splits):
    # rows of one entry cut into chunks whose fp32 partial sums are added in a fixed order
    check_backward(make_case([3, 1, 3, 3, -1, 3], q_len=6), bank_splits=splits)


def test_deterministic():
    case = make_case([3, 0, 3, 1, 3, 3], q_len=10, dtype=torch.float16, padding="mixed")
    _, first = run_backward(case)
    _, second = run_backward(case)
    for name, a, b in zip(GRAD_NAMES, first, second, strict=True):
        assert torch.equal(a, b), name


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("causal", [True, False])
def test_bf16(causal):
    case = make_case([3, 0, 3, -1], q_len=33, heads=2, head_dim=64, causal=causal, padding="mixed",
                     dtype=torch.bfloat16)  # fmt: skip
    check_backward(case)


@gpu
@pytest.mark.gpu
def test_deterministic_on_gpu_with_one_dominant_id():
    # many rows of one id: the bank gradient is split over rows; two runs must still be bitwise equal
    case = make_case(
        [3] * 48 + [0, 1], q_len=64, heads=4, head_dim=64, dtype=torch.bfloat16, entry_lengths=(5, 9, 0, 200)
    )
    _, first = run_backward(case)
    _, second = run_backward(case)
    for name, a, b in zip(GRAD_NAMES, first, second, strict=True):
        assert torch.equal(a, b), name
