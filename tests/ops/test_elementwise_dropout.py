"""The C++ elementwise dropout against its plain-torch definition (prefixrt.ops.elementwise_dropout): the same
mask for the same Philox state (forward and backward, every dtype, odd sizes, non-contiguous inputs, an offset
whose low word wraps, any thread count), the kept fraction 1 - p, fresh masks per call, torch.manual_seed
reproducing them, and torch's contract (identity in eval or at p = 0, errors naming the argument)."""

import pytest
import torch
from support.attention_cases import philox_state

from prefixrt.ops.dropout import draw_philox_state
from prefixrt.ops.elementwise_dropout import dropout_reference, philox_dropout, philox_dropout_applies

pytestmark = pytest.mark.usefixtures("cpp_kernels")


def kernel(x, p, philox):
    from prefixrt.ops.elementwise_dropout import _apply

    return _apply(x, p, philox)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("p", [0.1, 0.5])
@pytest.mark.parametrize("shape", [(1,), (7,), (3, 5, 11), (32, 64, 768), (2, 4097)])
def test_kernel_equals_definition(dtype, p, shape):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    wraps = (philox_state(2**64 - 5, 2**32 - 3), philox_state(7, 2**63 - 50), philox_state(7, 2**64 - 100))
    for philox in (
        philox_state(31337, 1 << 33),
        *wraps,
    ):  # the low word, the sign bit, the whole counter wrap
        assert torch.equal(kernel(x, p, philox), dropout_reference(x, p, philox))


def test_non_contiguous_input_is_dropped_in_its_logical_order():
    x = torch.randn(64, 48).t()  # [48, 64], column-major storage
    philox = philox_state(5, 8)
    assert torch.equal(kernel(x, 0.3, philox), dropout_reference(x.contiguous(), 0.3, philox))


def test_same_mask_whatever_the_thread_count():
    x = torch.randn(40_000)
    philox = philox_state(9, 0)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = kernel(x, 0.2, philox)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, kernel(x, 0.2, philox))


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_forward_and_backward_draw_the_call_s_mask(p):
    x = torch.randn(4, 33, 65, requires_grad=True)
    torch.manual_seed(3)
    y = philox_dropout(x, p)
    torch.manual_seed(3)
    philox = draw_philox_state("cpu", x.numel())
    assert torch.equal(y.detach(), dropout_reference(x.detach(), p, philox))
    grad = torch.randn_like(x)
    y.backward(grad)
    assert torch.equal(x.grad, dropout_reference(grad, p, philox))
    scale = torch.tensor(1 / (1 - p), dtype=torch.float32)
    kept = y.detach() != 0
    assert torch.allclose(y.detach()[kept], x.detach()[kept] * scale)


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_kept_fraction(p):
    y = philox_dropout(torch.ones(1_000_000), p)
    kept = float((y != 0).float().mean())
    assert abs(kept - (1 - p)) < 5 * (p * (1 - p) / 1e6) ** 0.5  # 5 sigma


def test_fresh_masks_per_call_and_reproducible_from_the_seed():
    x = torch.ones(10_000)
    torch.manual_seed(0)
    a, b = philox_dropout(x, 0.5), philox_dropout(x, 0.5)
    torch.manual_seed(0)
    assert not torch.equal(a, b)
    assert torch.equal(philox_dropout(x, 0.5), a)
    torch.manual_seed(1)
    assert not torch.equal(philox_dropout(x, 0.5), a)


def test_torch_contract():
    x = torch.randn(10)
    assert philox_dropout(x, 0.5, training=False) is x
    assert philox_dropout(x, 0.0) is x
    with pytest.raises(ValueError, match=r"dropout_p must be in \[0, 1\), got 1.5"):
        philox_dropout(x, 1.5)


def test_float64_runs_torch_s_dropout():
    x = torch.ones(1000, dtype=torch.float64)
    assert philox_dropout_applies(torch.ones(3)) and not philox_dropout_applies(x)
    y = philox_dropout(x, 0.5)
    assert y.dtype == torch.float64 and set(y.unique().tolist()) <= {0.0, 2.0}
