"""C++ forward (prefill and decode) against the fp64 reference: prefix lengths 0/1/17/200, mixed entries,
ids repeated / -1 / largest, key padding on either side, fully padded rows, non-contiguous views, decode equal to
the last prefill row, cross-attention shapes, odd head dims, every dtype."""

import pytest
import torch
from support.cpp_cases import (
    DTYPES,
    ENTRY_LENGTHS,
    TOLERANCES,
    assert_close,
    make_case,
    oracle,
    with_mask,
)

from prefixrt.ops import prefix_attention

pytestmark = pytest.mark.usefixtures("cpp_kernels", "one_thread")


def run_cpp(case):
    with torch.no_grad():
        return prefix_attention(*case.inputs(), backend="cpp")


def check(case, what=""):
    out, lse = run_cpp(case)
    ref_out, ref_lse = oracle(case)
    tol = TOLERANCES[case.dtype]
    assert out.dtype == case.dtype and lse.dtype == torch.float32
    assert_close(out, ref_out, tol.out, f"{what} out")
    assert_close(lse, ref_lse, tol.lse, f"{what} lse")
    return out, lse


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("length", [0, 1, 17, 200])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_single_prefix_length(length, causal, dtype):
    check(
        make_case(entry_lengths=(length,), prefix_ids=[0, -1, 0], causal=causal, dtype=dtype), f"P={length}"
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("padding", [None, "left", "right", "random"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_mixed_bank_repeated_ids_and_padding(padding, causal, dtype):
    # ids: repeated (3, 3, 3), none (-1), the largest id (3), every entry length of ENTRY_LENGTHS
    case = make_case(batch=7, prefix_ids=[3, -1, 2, 3, 1, 0, 3], padding=padding, causal=causal, dtype=dtype)
    check(case, f"padding={padding}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fully_padded_rows(dtype):
    case = make_case(batch=4, q_len=9, prefix_ids=[-1, 3, 0, 2], padding="left", dtype=dtype)
    mask = case.key_padding_mask.clone()
    mask[0] = False  # no prefix, no key: out 0, lse -inf
    mask[1] = False  # prefix only
    mask[2] = False  # entry of length 0: sees nothing either
    out, lse = check(with_mask(case, mask), "fully padded")
    assert not out.isnan().any()
    assert torch.equal(out[0], torch.zeros_like(out[0])) and torch.isneginf(lse[0]).all()
    assert torch.equal(out[2], torch.zeros_like(out[2])) and torch.isneginf(lse[2]).all()
    assert lse[1].isfinite().all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_non_contiguous_views_read_in_place(dtype):
    """HF passes q/k/v as transposed views of [B, T, H, D]; a bank can be a slice of a bigger buffer."""
    case = make_case(batch=4, padding="right", prefix_ids=[3, 2, -1, 3], dtype=dtype)
    q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (case.q, case.k, case.v))
    wide = torch.cat([case.bank_k, case.bank_v], dim=-1)  # [H, S, 2D]: rows of stride 2D
    bank_k, bank_v = wide[..., : case.q.shape[-1]], wide[..., case.q.shape[-1] :]
    assert not q.is_contiguous() and not bank_k.is_contiguous()
    views = case.__class__(q, k, v, bank_k, bank_v, *case.args()[5:])
    # the same values read through other strides: bitwise the same result
    for got, want in zip(run_cpp(views), run_cpp(case), strict=True):
        assert torch.equal(got, want)
    # a last dim that is not contiguous is copied by the launcher
    q_strided = case.q.transpose(-1, -2).contiguous().transpose(-1, -2)
    assert q_strided.stride(-1) != 1
    assert_close(run_cpp(case.__class__(q_strided, *case.args()[1:]))[0], run_cpp(case)[0], 0.0, "strided q")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_decode_equals_last_prefill_row(dtype):
    prefill = make_case(batch=6, q_len=23, prefix_ids=[3, 3, -1, 2, 1, 3], padding="left", dtype=dtype)
    out, lse = run_cpp(prefill)
    decode = prefill.__class__(prefill.q[:, :, -1:], *prefill.args()[1:])
    dec_out, dec_lse = check(decode, "decode")
    assert_close(dec_out, out[:, :, -1:], TOLERANCES[dtype].out, "decode vs prefill out")
    assert_close(dec_lse, lse[:, :, -1:], TOLERANCES[dtype].lse, "decode vs prefill lse")


@pytest.mark.parametrize("group", [1, 3, 4, 5, 7, 16])
def test_decode_groups_of_every_size(group):
    """Rows sharing an entry are stacked into one tile: dot kernel up to 4 rows, packed kernel above."""
    ids = [3] * group + [2, -1, 1, 3, 0][: max(0, 5 - group % 3)]
    case = make_case(batch=len(ids), q_len=1, k_len=65, prefix_ids=ids, padding="left", seed=group)
    check(case, f"group={group}")


@pytest.mark.parametrize("q_len,k_len", [(5, 23), (23, 5), (1, 0), (7, 0)])
def test_cross_attention_shapes(q_len, k_len):
    """Tq != Tk, non-causal (BART cross-attention), including no own keys at all (prefix only)."""
    case = make_case(batch=4, q_len=q_len, k_len=k_len, prefix_ids=[3, -1, 2, 1], causal=False,
                     padding="random" if k_len else None)  # fmt: skip
    check(case, f"Tq={q_len} Tk={k_len}")


@pytest.mark.parametrize("head_dim", [8, 16, 37, 80, 128])
def test_head_dims(head_dim):
    check(make_case(batch=5, q_len=19, head_dim=head_dim, padding="right", prefix_ids=[3, 2, 1, -1, 3]))


def test_long_rows_many_tiles():
    """Tq > 64 (several tiles per row), keys > 128 (several key blocks), the 200-key entry."""
    check(make_case(batch=2, heads=1, q_len=150, prefix_ids=[3, 3], padding="left"), "long")


def test_thread_count_does_not_change_results():
    case = make_case(batch=8, q_len=1, k_len=40, prefix_ids=[3, 3, 3, 3, 3, 2, -1, 3])
    results = []
    for threads in (1, 2, 3):  # tile heights and job splits depend on the thread count
        torch.set_num_threads(threads)
        results.append(run_cpp(case))
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            assert_close(a, b, TOLERANCES[torch.float32].out)


def test_empty_batch_and_queries():
    for case in (make_case(batch=0, prefix_ids=[]), make_case(q_len=0, k_len=5)):
        out, lse = run_cpp(case)
        assert out.shape == case.q.shape and lse.shape == case.q.shape[:3]


def test_out_of_range_id_is_an_error():
    # refused by the op layer when the step is planned, before any backend runs (the same for every backend)
    case = make_case(prefix_ids=[0, len(ENTRY_LENGTHS), -1])
    with pytest.raises(ValueError, match=rf"prefix_ids holds ids \[{len(ENTRY_LENGTHS)}\]"):
        run_cpp(case)
