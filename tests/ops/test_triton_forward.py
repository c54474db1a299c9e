"""The Triton prefill/training forward against the reference oracle: output and log-sum-exp."""

import pytest
import torch
from support.triton_cases import ENTRY_LENGTHS, TOLERANCES, assert_close, gpu, make_case, reference

from prefixrt.ops.triton.configs import FWD_CONFIGS
from prefixrt.ops.triton.launch import prefix_attention_fwd

DTYPES = [torch.float32, torch.float16]


def check_forward(case, config=None):
    out, lse = prefix_attention_fwd(case.attention_args(), config=config)
    ref_out, ref_lse = reference(case)
    tol = TOLERANCES[case.q.dtype]
    assert out.dtype == case.q.dtype and lse.dtype == torch.float32
    assert_close(out, ref_out, tol.out, "out")
    assert_close(lse, ref_lse, tol.lse, "lse")
    return out, lse


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [True, False])
def test_every_entry_length_in_one_batch(causal, dtype):
    # entries of lengths 0, 1, 15, 16, 17, 64, 200 side by side, plus a row without prefix
    case = make_case(list(range(len(ENTRY_LENGTHS))) + [-1], q_len=17, entry_lengths=ENTRY_LENGTHS, causal=causal,
                     dtype=dtype)  # fmt: skip
    check_forward(case)


@pytest.mark.parametrize("q_len", [1, 2, 17, pytest.param(128, marks=pytest.mark.slow)])
def test_sequence_lengths(q_len):
    check_forward(make_case([3, 0, -1], q_len=q_len, heads=2, padding="mixed"))


@pytest.mark.parametrize(
    "ids",
    [[1, 1, 1, 1], [0, 1, 2, 3], [3, 0, 3, 1, 3], [-1, 2, -1, 0], [3], [-1, -1]],
    ids=["all-equal", "all-distinct", "repeated-non-contiguous", "with-none", "largest-id", "all-none"],
)
def test_id_patterns(ids):
    check_forward(make_case(ids, q_len=9, heads=2))


def test_empty_bank():
    case = make_case([-1, -1], q_len=5, entry_lengths=())
    check_forward(case)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("padding", ["left", "right", "mixed", "full"])
def test_key_padding(padding, dtype):
    check_forward(make_case([3, 0, -1, 1], q_len=11, padding=padding, dtype=dtype))


def test_fully_padded_row_without_prefix_sees_nothing():
    case = make_case([-1, 0, 3], q_len=6, padding="full")
    out, lse = check_forward(case)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    assert torch.isneginf(lse[0]).all()


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("shape", [(5, 23), (9, 4), (3, 0)], ids=["tq<tk", "tq>tk", "no-own-keys"])
def test_query_and_key_lengths_differ(shape, causal):
    # non-causal: BART cross-attention; causal: chunked prefill against a cache (bottom-right aligned)
    q_len, k_len = shape
    check_forward(make_case([1, -1, 3], q_len=q_len, k_len=k_len, causal=causal, padding="mixed"))


@pytest.mark.parametrize("causal", [True, False])
def test_non_contiguous_views(causal):
    k_len = 13 if causal else 7
    case = make_case([3, 0, 3], q_len=13, k_len=k_len, heads=2, causal=causal, fused_qkv=True, padding="left")
    assert not case.q.is_contiguous() and not case.k.is_contiguous() and not case.bank_k.is_contiguous()
    check_forward(case)


@pytest.mark.parametrize("head_dim", [32, 64, 128])
def test_head_dims(head_dim):
    check_forward(make_case([3, 1], q_len=7, head_dim=head_dim, dtype=torch.float16))


@pytest.mark.parametrize("config", FWD_CONFIGS, ids=lambda c: f"m{c.block_m}n{c.block_n}")
def test_every_config(config):
    case = make_case(
        [4, 2, -1, 4], q_len=20, entry_lengths=(0, 1, 15, 16, 17), padding="mixed", dtype=torch.float16
    )
    check_forward(case, config)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("causal", [True, False])
def test_bf16(causal):
    check_forward(make_case([3, 0, 3, -1], q_len=33, heads=2, head_dim=64, causal=causal, padding="mixed",
                            dtype=torch.bfloat16))  # fmt: skip
