"""Attention dropout in the Triton kernels against the reference with the same Philox state: outputs, lse (that
of the undropped scores) and every gradient (the dQ, dK/dV and bank kernels regenerate the forward's mask),
over prefix lengths 0/1/17/200, mixed ids with -1, padding, every block configuration; launches skipped for
gradients nobody needs. Shapes are small: the kernels run in Triton's CPU interpreter here."""

import pytest
import torch
from support.triton_cases import (
    GRAD_NAMES,
    TOLERANCES,
    assert_close,
    gpu,
    make_case,
    philox_state,
    reference,
    reference_grads,
    unused_entries,
)

from prefixrt.ops.triton import launch
from prefixrt.ops.triton.backend import triton_forward
from prefixrt.ops.triton.configs import BWD_CONFIGS, FWD_CONFIGS
from prefixrt.ops.triton.launch import prefix_attention_bwd, prefix_attention_fwd

LENGTHS = (0, 1, 17, 200)  # the prefix lengths the issue names, one entry each
ALL = (True,) * 5


def check(case, dropout_p, philox=None, fwd_config=None, bwd_config=None, needs=ALL, **bwd_kwargs):
    """Forward and backward with dropout against the oracle on the same mask; returns the gradients."""
    philox = philox_state(1234, 40) if philox is None else philox
    args = case.attention_args(dropout_p, philox)
    tol = TOLERANCES[case.q.dtype]
    out, lse = prefix_attention_fwd(args, config=fwd_config)
    ref_out, ref_lse = reference(case, dropout_p, philox)
    assert_close(out, ref_out, tol.out, "out")
    assert_close(lse, ref_lse, tol.lse, "lse")
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(5)).to(out)
    grads = prefix_attention_bwd(args, dout, out, lse, config=bwd_config, needs=needs, **bwd_kwargs)
    expected = reference_grads(case, dout, dropout_p, philox)
    for name, got, want, need in zip(GRAD_NAMES, grads, expected, needs, strict=True):
        if need:
            assert_close(got, want, tol.grad, name)
    if needs[3]:
        for e in unused_entries(case):
            rows = slice(int(case.bank_offsets[e]), int(case.bank_offsets[e + 1]))
            assert not grads[3][:, rows].any(), f"unused entry {e} got a gradient"
    return grads


@pytest.mark.slow
@pytest.mark.parametrize(("causal", "dropout_p"), [(True, 0.1), (False, 0.5)])
def test_every_prefix_length_in_one_batch(causal, dropout_p):
    ids = [3, 0, 2, -1, 1, 3]  # the 200-long entry twice, a row without prefix
    check(make_case(ids, q_len=17, entry_lengths=LENGTHS, causal=causal, padding="mixed"), dropout_p)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_dtypes_and_heads(dtype):
    check(make_case([2, -1, 2, 1], q_len=9, heads=2, entry_lengths=LENGTHS, padding="left", dtype=dtype), 0.1)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("shape", [(5, 23), (9, 4), (3, 0)], ids=["tq<tk", "tq>tk", "no-own-keys"])
def test_query_and_key_lengths_differ(shape, causal):
    q_len, k_len = shape
    check(make_case([1, -1, 3, 1], q_len=q_len, k_len=k_len, causal=causal, padding="mixed"), 0.5)


def test_one_query_per_row_takes_the_prefill_kernel():
    """Tq == 1 with dropout (decode is inference; the decode kernels have no dropout) runs the prefill kernel."""
    case = make_case([3, 1, -1, 3], q_len=1, k_len=9, heads=2, padding="left")
    philox = philox_state(8, 0)
    out, lse = triton_forward(case.attention_args(0.5, philox))
    assert_close(out, reference(case, 0.5, philox)[0], TOLERANCES[torch.float32].out, "out")
    check(case, 0.5, philox)
    with pytest.raises(ValueError, match="decode kernels have no dropout"):
        from prefixrt.ops.triton.decode import prefix_decode

        prefix_decode(case.attention_args(0.5, philox))


def test_non_contiguous_views():
    check(make_case([3, 0, 3], q_len=13, heads=2, fused_qkv=True, padding="left"), 0.1)


@pytest.mark.parametrize(
    "configs", list(zip(FWD_CONFIGS, BWD_CONFIGS + BWD_CONFIGS[-1:], strict=True)),
    ids=lambda c: f"fwd-m{c[0].block_m}n{c[0].block_n}-bwd-m{c[1].block_m}n{c[1].block_n}",
)  # fmt: skip
def test_every_config(configs):
    fwd, bwd = configs
    case = make_case([4, 2, -1, 4], q_len=20, entry_lengths=(0, 1, 15, 16, 17), padding="mixed",
                     dtype=torch.float16)  # fmt: skip
    check(case, 0.5, fwd_config=fwd, bwd_config=bwd)


def test_bank_row_splits():
    check(make_case([3, 1, 3, 3, -1, 3], q_len=6), 0.1, bank_splits=3)


def test_mask_depends_on_the_state():
    case = make_case([3, 1], q_len=7, heads=2)
    outs = [
        prefix_attention_fwd(case.attention_args(0.5, philox_state(*s)))[0] for s in ((1, 0), (2, 0), (1, 8))
    ]
    assert not torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])
    assert torch.equal(outs[0], prefix_attention_fwd(case.attention_args(0.5, philox_state(1, 0)))[0])


def test_deterministic():
    case = make_case([3, 0, 3, 1, 3, 3], q_len=10, dtype=torch.float16, padding="mixed")
    first, second = check(case, 0.1), check(case, 0.1)
    for name, a, b in zip(GRAD_NAMES, first, second, strict=True):
        assert torch.equal(a, b), name


class LaunchSpy:
    """Stands in for a kernel: records that it was launched, then launches the real one."""

    def __init__(self, kernel, seen, name):
        self.kernel, self.seen, self.name = kernel, seen, name

    def __getitem__(self, grid):
        self.seen.append(self.name)
        return self.kernel[grid]


@pytest.mark.parametrize(
    ("needs", "launched"),
    [
        ((False, True, True, True, True), ["dkdv", "bank"]),
        ((False, False, False, True, True), ["bank"]),
        ((True, False, False, False, False), ["dq"]),
        ((False, True, True, False, False), ["dkdv"]),
    ],
    ids=["no-dq", "bank-only", "dq-only", "kv-only"],
)
def test_only_the_needed_launches_run(needs, launched, monkeypatch):
    seen = []
    for name in ("dq", "dkdv", "bank"):
        attr = f"prefix_attention_bwd_{name}_kernel"
        monkeypatch.setattr(launch, attr, LaunchSpy(getattr(launch, attr), seen, name))
    grads = check(make_case([3, 1, -1, 3], q_len=9, entry_lengths=LENGTHS, padding="left"), 0.1, needs=needs)
    assert seen == launched
    for name, grad, need in zip(GRAD_NAMES, grads, needs, strict=True):
        assert (grad is None) != need, name


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("causal", [True, False])
def test_bf16_on_gpu(causal):
    case = make_case([3, 0, 3, -1], q_len=33, heads=2, head_dim=64, entry_lengths=LENGTHS, causal=causal,
                     padding="mixed", dtype=torch.bfloat16)  # fmt: skip
    check(case, 0.1)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [64, 128])
def test_configs_and_head_dims_on_gpu(head_dim):
    case = make_case([3, 0, 3, -1, 2], q_len=70, heads=2, head_dim=head_dim, entry_lengths=LENGTHS,
                     padding="mixed", dtype=torch.float16)  # fmt: skip
    for fwd, bwd in zip(FWD_CONFIGS, BWD_CONFIGS + BWD_CONFIGS[-1:], strict=True):
        check(case, 0.1, fwd_config=fwd, bwd_config=bwd)


@gpu
@pytest.mark.gpu
def test_cuda_generator_state_and_the_public_op():
    """On CUDA: the Philox state is the CUDA generator's (seed, offset), the offset advances by the call's
    counters, torch.manual_seed reproduces, and the op with backend="triton" gives the reference backend's
    outputs and gradients for the same seed."""
    import prefixrt.ops as ops
    from prefixrt.ops import dropout as D

    torch.manual_seed(11)
    gen = torch.cuda.default_generators[torch.cuda.current_device()]
    start = gen.get_offset()
    state = D.draw_philox_state("cuda", 1001)
    assert D.philox_ints(state) == (gen.initial_seed(), start) and gen.get_offset() == start + 1004
    torch.manual_seed(11)
    assert torch.equal(D.draw_philox_state("cuda", 1001), state)

    case = make_case([3, 0, 3, -1], q_len=17, heads=2, head_dim=64, entry_lengths=LENGTHS, padding="mixed",
                     dtype=torch.float16)  # fmt: skip
    results = []
    for backend in ("reference", "triton", "triton"):
        leaves = [t.detach().clone().requires_grad_(True) for t in case.args()[:5]]
        torch.manual_seed(5)
        out, _ = ops.prefix_attention(*case.inputs(*leaves), dropout_p=0.1, backend=backend)
        out.float().sum().backward()
        results.append([out.detach(), *(t.grad for t in leaves)])
    tol = TOLERANCES[torch.float16]
    for what, ref, got, again in zip(("out", *GRAD_NAMES), *results, strict=True):
        assert_close(got, ref, tol.grad, what)
        assert torch.equal(got, again), what
