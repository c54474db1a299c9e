"""C++ backward against the fp64 reference backward, and gradients through the public op with
``backend="cpp"`` against ``backend="reference"``: bank gradients summed over rows that share an entry, zero for
unused entries, zero (not NaN) for queries that see no key, deterministic."""

import pytest
import torch
from support.cpp_cases import (
    DTYPES,
    GRAD_NAMES,
    TOLERANCES,
    assert_close,
    make_case,
    oracle_grads,
    with_mask,
)

from prefixrt.ops import prefix_attention
from prefixrt.ops.cpp.backend import cpp_backward, cpp_forward

pytestmark = pytest.mark.usefixtures("cpp_kernels", "one_thread")


def cpp_grads(case, dout):
    out, lse = cpp_forward(case.attention_args())
    return cpp_backward(case.attention_args(), dout, out, lse)


def check_grads(case, what=""):
    dout = torch.randn(case.q.shape, generator=torch.Generator().manual_seed(7)).to(case.dtype)
    grads = cpp_grads(case, dout)
    for name, got, want, like in zip(
        GRAD_NAMES, grads, oracle_grads(case, dout), case.args()[:5], strict=True
    ):
        assert got.dtype == like.dtype and got.shape == like.shape, name
        assert_close(got, want, TOLERANCES[case.dtype].grad, f"{what} {name}")
    return grads


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("padding", [None, "left", "right"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_backward_mixed_bank(padding, causal, dtype):
    case = make_case(
        batch=6, q_len=21, prefix_ids=[3, -1, 2, 3, 1, 3], padding=padding, causal=causal, dtype=dtype
    )
    check_grads(case, f"padding={padding}")


def test_backward_long_rows_and_odd_head_dim():
    """Tq > 64 (several query blocks accumulate into one row's dk/dv), head dim 37."""
    check_grads(make_case(batch=3, heads=1, q_len=70, head_dim=37, prefix_ids=[3, 2, 3], padding="left"))


def test_backward_cross_attention():
    check_grads(
        make_case(batch=4, q_len=5, k_len=23, causal=False, prefix_ids=[3, -1, 2, 1], padding="random")
    )


def test_backward_decode_rows():
    check_grads(make_case(batch=8, q_len=1, k_len=30, prefix_ids=[3, 3, 3, 3, 3, 2, -1, 1], padding="left"))


def test_unused_entries_and_fully_padded_rows_get_zero_gradient():
    case = make_case(batch=3, q_len=6, prefix_ids=[-1, 3, 3], padding="right")
    mask = case.key_padding_mask.clone()
    mask[0] = False  # sees nothing at all
    grads = check_grads(with_mask(case, mask), "padded")
    dq, dk, dv, dbank_k, _ = grads
    assert not any(g.isnan().any() for g in grads)
    assert not dq[0].any() and not dk[0].any() and not dv[0].any()
    offsets = case.bank_offsets
    assert not dbank_k[:, : offsets[3]].any()  # entries 0..2 are used by no row
    assert dbank_k[:, offsets[3] :].abs().sum() > 0


def test_backward_is_deterministic():
    case = make_case(batch=8, q_len=9, prefix_ids=[3] * 6 + [2, 3], padding="left")
    dout = torch.randn(case.q.shape)
    first, second = cpp_grads(case, dout), cpp_grads(case, dout)
    for name, a, b in zip(GRAD_NAMES, first, second, strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gradients_through_the_op(dtype):
    """``prefix_attention(..., backend="cpp")`` under autograd gives the reference backend's gradients."""
    case = make_case(batch=5, q_len=13, prefix_ids=[3, 1, -1, 3, 2], padding="left", dtype=dtype)
    results = []
    for backend in ("reference", "cpp"):
        leaves = [t.detach().clone().requires_grad_(True) for t in case.args()[:5]]
        out, _ = prefix_attention(*case.inputs(*leaves), backend=backend)
        (out.float() * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
        results.append([t.grad for t in leaves])
    for name, got, want in zip(GRAD_NAMES, results[1], results[0], strict=True):
        assert_close(got, want, TOLERANCES[dtype].grad, name)
