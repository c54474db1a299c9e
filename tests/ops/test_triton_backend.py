"""The Triton backend in the op layer: what it accepts and refuses, when "auto" picks it, and the public op
(``torch.library`` forward + autograd, torch.compile) running the kernels."""

import pytest
import torch
from support.triton_cases import TOLERANCES, assert_close, gpu, make_case, reference, reference_grads

import prefixrt.ops as ops
from prefixrt.ops.registry import AttentionCall, BackendUnavailable, select_backend
from prefixrt.ops.triton import backend as triton_backend


def call(**changes):
    base = dict(device_type="cuda", dtype=torch.float16, head_dim=64, q_len=17, k_len=17, causal=True,
                dropout_p=0.0, requires_grad=True)  # fmt: skip
    base.update(changes)
    return AttentionCall(**base)


def test_registered():
    assert "triton" in ops.available_backends()
    assert "triton" not in ops._import_errors


@pytest.mark.parametrize("head_dim", [16, 32, 64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_accepts_supported_cuda_calls(dtype, head_dim, monkeypatch):
    monkeypatch.setattr(triton_backend, "INTERPRETED", False)  # compiled kernels, as on a GPU machine
    assert triton_backend.refuse(call(dtype=dtype, head_dim=head_dim)) is None


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        (dict(head_dim=80), "head dim 80"),
        (dict(head_dim=256), "head dim 256"),
        (dict(dtype=torch.float64), "dtype"),
        (dict(device_type="mps"), "CUDA"),
    ],
)
def test_refuses_with_a_reason(changes, reason):
    assert reason in triton_backend.refuse(call(**changes))


def test_cpu_only_in_the_interpreter(monkeypatch):
    monkeypatch.setattr(triton_backend, "INTERPRETED", False)
    assert "interpreter" in triton_backend.refuse(call(device_type="cpu"))
    monkeypatch.setattr(triton_backend, "INTERPRETED", True)
    assert triton_backend.refuse(call(device_type="cpu", dtype=torch.float32)) is None
    assert "bf16" in triton_backend.refuse(call(device_type="cpu", dtype=torch.bfloat16))


def test_auto_picks_triton_for_cuda_only(monkeypatch):
    monkeypatch.delenv("PREFIXRT_BACKEND", raising=False)
    assert select_backend("auto", call()).name == "triton"
    assert select_backend("auto", call(device_type="cpu", dtype=torch.float32)).name != "triton"
    assert select_backend("auto", call(dropout_p=0.1)).name == "triton"  # training with dropout too


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_explicit_triton_bf16_on_cpu_says_why():
    case = make_case([0], q_len=3, dtype=torch.bfloat16)
    with pytest.raises(BackendUnavailable, match="bf16"):
        ops.prefix_attention(*case.inputs(), backend="triton")


def run_op(case, dout=None):
    """The public op with backend="triton": (out, lse, grads of q, k, v, bank_k, bank_v)."""
    leaves = [t.detach().requires_grad_(True) for t in case.args()[:5]]
    out, lse = ops.prefix_attention(*case.inputs(*leaves), backend="triton")
    if dout is None:
        dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(out)
    out.backward(dout)
    return out.detach(), lse, dout, [t.grad for t in leaves]


@pytest.mark.parametrize("q_len", [1, 9], ids=["decode-route", "prefill-route"])
def test_op_forward_and_autograd(q_len):
    case = make_case([3, 0, 3, -1], q_len=q_len, k_len=9, heads=2, padding="left")
    out, lse, dout, grads = run_op(case)
    ref_out, ref_lse = reference(case)
    tol = TOLERANCES[torch.float32]
    assert_close(out, ref_out, tol.out, "out")
    assert_close(lse, ref_lse, tol.lse, "lse")
    for name, got, want in zip(("dq", "dk", "dv", "dbank_k", "dbank_v"), grads, reference_grads(case, dout),
                               strict=True):  # fmt: skip
        assert_close(got, want, tol.grad, name)


def test_tq1_routes_to_decode(monkeypatch):
    seen = []
    real = triton_backend.prefix_decode
    monkeypatch.setattr(triton_backend, "prefix_decode", lambda *a, **k: seen.append(1) or real(*a, **k))
    case = make_case([1, 3], q_len=1, k_len=5)
    with torch.no_grad():
        ops.prefix_attention(*case.inputs(), backend="triton")
    assert seen == [1]


def test_torch_compile_sees_one_op():
    case = make_case([3, 1], q_len=5, heads=2)
    plan = case.plan()  # once per step, outside the compiled layer

    def f(q, k, v, bank_k, bank_v):
        bank = ops.BankLayer(bank_k, bank_v, case.bank_offsets)
        out, _ = ops.prefix_attention(q, k, v, bank, plan, None, case.causal, case.scale, backend="triton")
        return out * 2

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(*case.args()[:5]), 2 * reference(case)[0], atol=1e-4, rtol=1e-4)


@gpu
@pytest.mark.gpu
def test_op_bf16_on_gpu():
    case = make_case([3, 0, 3, -1], q_len=17, heads=2, head_dim=64, padding="mixed", dtype=torch.bfloat16)
    out, _, dout, grads = run_op(case)
    tol = TOLERANCES[torch.bfloat16]
    assert_close(out, reference(case)[0], tol.out, "out")
    for got, want in zip(grads, reference_grads(case, dout), strict=True):
        assert_close(got, want, tol.grad)
