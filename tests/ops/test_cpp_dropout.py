"""Attention dropout in the C++ kernels against the fp64 reference with the same Philox state: outputs, lse
(that of the undropped scores) and every gradient, for each dtype, p = 0.1 and 0.5, prefix lengths 0/1/17/200,
mixed ids with -1, padding, decode rows stacked into one tile, long rows; gradients skipped when not needed;
the same mask whatever the thread count."""

import pytest
import torch
from support.cpp_cases import (
    DTYPES,
    GRAD_NAMES,
    TOLERANCES,
    assert_close,
    make_case,
    oracle,
    oracle_grads,
    philox_state,
)

from prefixrt.ops.cpp.backend import cpp_backward, cpp_forward

pytestmark = pytest.mark.usefixtures("cpp_kernels", "one_thread")
ALL = (True,) * 5


def run(case, dropout_p, philox, needs=ALL):
    args = case.attention_args(dropout_p, philox)
    out, lse = cpp_forward(args)
    dout = torch.randn(case.q.shape, generator=torch.Generator().manual_seed(7)).to(case.dtype)
    return out, lse, dout, cpp_backward(args, dout, out, lse, needs)


def check(case, dropout_p, philox=None, needs=ALL):
    philox = philox_state(31337, 1 << 33) if philox is None else philox
    out, lse, dout, grads = run(case, dropout_p, philox, needs)
    tol = TOLERANCES[case.dtype]
    want_out, want_lse = oracle(case, dropout_p, philox)
    assert_close(out, want_out, tol.out, "out")
    assert_close(lse, want_lse, tol.lse, "lse")
    for name, got, want, need in zip(
        GRAD_NAMES, grads, oracle_grads(case, dout, dropout_p, philox), needs, strict=True
    ):
        if need:
            assert_close(got, want, tol.grad, name)
    return out, grads


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("dropout_p", [0.1, 0.5])
@pytest.mark.parametrize("padding", [None, "left", "random"])
def test_mixed_bank(padding, dropout_p, dtype):
    case = make_case(batch=6, q_len=21, prefix_ids=[3, -1, 2, 3, 1, 0], padding=padding, dtype=dtype)
    check(case, dropout_p)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_cross_attention_and_non_causal(causal):
    check(
        make_case(batch=4, q_len=5, k_len=23, causal=causal, prefix_ids=[3, -1, 2, 1], padding="random"), 0.5
    )


def test_decode_rows_share_one_tile():
    """Many one-query rows of one entry: the forward stacks them into one tile (each row its own counters)."""
    check(make_case(batch=9, q_len=1, k_len=30, prefix_ids=[3] * 6 + [2, -1, 3], padding="left"), 0.1)


def test_long_rows_and_odd_head_dim():
    """Tq > 64 (several backward blocks and forward tiles per row), head dim 37."""
    check(make_case(batch=3, heads=1, q_len=70, head_dim=37, prefix_ids=[3, 2, 3], padding="left"), 0.1)


def test_mask_depends_on_the_state():
    case = make_case(batch=2, q_len=9, prefix_ids=[3, 1])
    outs = [cpp_forward(case.attention_args(0.5, philox_state(*s)))[0] for s in ((1, 0), (2, 0), (1, 8))]
    assert not torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])


@pytest.mark.parametrize(
    "needs",
    [(False, True, True, True, True), (False, False, False, True, True), (True, False, False, False, False),
     (False, True, True, False, False)],
    ids=["no-dq", "bank-only", "dq-only", "kv-only"],
)  # fmt: skip
def test_gradients_not_needed_are_skipped(needs):
    case = make_case(batch=4, q_len=13, prefix_ids=[3, 1, -1, 3], padding="left")
    philox = philox_state(5, 0)
    _, grads = check(case, 0.1, philox, needs)
    _, _, _, full = run(case, 0.1, philox)
    for name, got, want, need in zip(GRAD_NAMES, grads, full, needs, strict=True):
        if need:
            assert torch.equal(got, want), name  # the same arithmetic, whatever else is computed
        else:
            assert got.numel() == 0, name


def test_same_mask_on_any_thread_count():
    case = make_case(batch=8, q_len=17, prefix_ids=[3] * 5 + [2, -1, 1], padding="left")
    philox = philox_state(77, 4)
    one = run(case, 0.5, philox)
    torch.set_num_threads(2)  # the one_thread fixture restores the count
    two = run(case, 0.5, philox)
    for name, a, b in zip(
        ("out", "lse", "dout", *GRAD_NAMES), (*one[:3], *one[3]), (*two[:3], *two[3]), strict=True
    ):
        assert torch.equal(a, b), name
