"""The op layer: the reference oracle against a naive per-row loop, its explicit backward against autograd,
the torch.library registration, input validation and backend selection."""

import pytest
import torch

from prefixrt import ops
from prefixrt.ops.library import prefix_attention_op
from prefixrt.ops.reference import prefix_attention_reference_backward


def op(q, k, v, bank_k, bank_v, ids, offsets, mask=None, **kwargs):
    """The public op on raw tensors (a bank layer and a plan built here)."""
    plan = ops.StepPlan.build(ids, offsets.diff())
    return ops.prefix_attention(q, k, v, ops.BankLayer(bank_k, bank_v, offsets), plan, mask, **kwargs)


def naive_attention(q, k, v, bank_k, bank_v, prefix_ids, offsets, key_padding_mask, causal, scale):
    """One row, one head, one query at a time, in float64: the definition, spelled out."""
    batch, heads, tq, dim = q.shape
    tk = k.shape[2]
    out = torch.zeros(batch, heads, tq, dim, dtype=torch.float64)
    lse = torch.full((batch, heads, tq), float("-inf"), dtype=torch.float64)
    for b in range(batch):
        e = int(prefix_ids[b])
        lo, hi = (int(offsets[e]), int(offsets[e + 1])) if e >= 0 else (0, 0)
        for h in range(heads):
            for i in range(tq):
                keys, values = [], []
                for p in range(lo, hi):
                    keys.append(bank_k[h, p])
                    values.append(bank_v[h, p])
                for j in range(tk):
                    if key_padding_mask is not None and not key_padding_mask[b, j]:
                        continue
                    if causal and j > i + tk - tq:
                        continue
                    keys.append(k[b, h, j])
                    values.append(v[b, h, j])
                if not keys:
                    continue
                scores = torch.stack([(q[b, h, i].double() * kk.double()).sum() * scale for kk in keys])
                lse[b, h, i] = torch.logsumexp(scores, 0)
                weights = torch.softmax(scores, 0)
                out[b, h, i] = sum(w * vv.double() for w, vv in zip(weights, values, strict=True))
    return out, lse


def make_case(
    batch=4, heads=2, tq=5, tk=5, dim=8, lengths=(3, 0, 4), ids=(2, -1, 0, 2), dtype=torch.float64, seed=0
):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, tq, dim, generator=g, dtype=dtype)
    k = torch.randn(batch, heads, tk, dim, generator=g, dtype=dtype)
    v = torch.randn(batch, heads, tk, dim, generator=g, dtype=dtype)
    total = sum(lengths)
    bank_k = torch.randn(heads, total, dim, generator=g, dtype=dtype)
    bank_v = torch.randn(heads, total, dim, generator=g, dtype=dtype)
    offsets = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    return q, k, v, bank_k, bank_v, torch.tensor(ids), offsets


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("tq,tk", [(5, 5), (1, 6), (3, 7)])
def test_reference_matches_naive_definition(causal, tq, tk):
    q, k, v, bank_k, bank_v, ids, offsets = make_case(tq=tq, tk=tk)
    mask = torch.ones(4, tk, dtype=torch.bool)
    mask[1, :2] = False  # left padding
    mask[2, -1] = False  # right padding
    mask[3, :] = False  # fully padded row that still has a prefix
    scale = 0.3
    out, lse = ops.prefix_attention_reference(q, k, v, bank_k, bank_v, ids, offsets, mask, causal, scale)
    want_out, want_lse = naive_attention(q, k, v, bank_k, bank_v, ids, offsets, mask, causal, scale)
    torch.testing.assert_close(out, want_out)
    torch.testing.assert_close(lse, want_lse)


def test_fully_masked_row_gives_zero_output_no_nan_and_zero_grad():
    q, k, v, bank_k, bank_v, ids, offsets = make_case(ids=(-1, 1, -1, 0))  # entry 1 has length 0
    mask = torch.ones(4, 5, dtype=torch.bool)
    mask[0] = False
    mask[1] = False
    for t in (q, k, v, bank_k, bank_v):
        t.requires_grad_(True)
    out, lse = op(q, k, v, bank_k, bank_v, ids, offsets, mask, causal=True)
    assert torch.isinf(lse[:2]).all() and (lse[:2] < 0).all()
    assert (out[:2] == 0).all()
    out.sum().backward()
    for t in (q, k, v, bank_k, bank_v):
        assert torch.isfinite(t.grad).all()
    assert (q.grad[:2] == 0).all()


@pytest.mark.parametrize("causal", [False, True])
def test_explicit_backward_matches_autograd(causal):
    q, k, v, bank_k, bank_v, ids, offsets = make_case(ids=(2, 2, -1, 0))
    mask = torch.ones(4, 5, dtype=torch.bool)
    mask[0, :1] = False
    inputs = [t.clone().requires_grad_(True) for t in (q, k, v, bank_k, bank_v)]
    out, _ = ops.prefix_attention_reference(*inputs, ids, offsets, mask, causal, 0.5)
    dout = torch.randn_like(out)
    want = torch.autograd.grad(out, inputs, dout)
    got = prefix_attention_reference_backward(dout, q, k, v, bank_k, bank_v, ids, offsets, mask, causal, 0.5)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)


def test_bank_gradient_sums_rows_that_share_an_id_and_unused_entries_are_zero():
    q, k, v, bank_k, bank_v, ids, offsets = make_case(ids=(2, 0, 2, 2))  # entry 1 unused (length 0 anyway)
    bank_k.requires_grad_(True)
    out, _ = op(q, k, v, bank_k, bank_v, ids, offsets, causal=True)
    dout = torch.randn_like(out)
    (total,) = torch.autograd.grad(out, bank_k, dout)
    per_row = []
    for b in range(4):
        out_b, _ = op(
            q[b : b + 1], k[b : b + 1], v[b : b + 1], bank_k, bank_v, ids[b : b + 1], offsets, causal=True
        )
        per_row.append(torch.autograd.grad(out_b, bank_k, dout[b : b + 1])[0])
    torch.testing.assert_close(total, sum(per_row))
    rows_of_entry2 = slice(int(offsets[2]), int(offsets[3]))
    assert total[:, rows_of_entry2].abs().sum() > 0


def test_gradcheck_through_the_registered_op():
    q, k, v, bank_k, bank_v, ids, offsets = make_case(batch=3, tq=3, tk=4, dim=4, ids=(0, -1, 2))
    mask = torch.tensor([[True] * 4, [False, True, True, True], [True] * 4])
    inputs = [t.requires_grad_(True) for t in (q, k, v, bank_k, bank_v)]

    def fn(*xs):
        return op(*xs, ids, offsets, mask, causal=True, backend="reference")[0]

    assert torch.autograd.gradcheck(fn, inputs)


def test_library_op_passes_opcheck():
    q, k, v, bank_k, bank_v, ids, offsets = make_case(dtype=torch.float32)
    for t in (q, k, v, bank_k, bank_v):
        t.requires_grad_(True)
    mask = torch.ones(4, 5, dtype=torch.bool)
    args = ops.AttentionArgs(q, k, v, ops.BankLayer(bank_k, bank_v, offsets), ops.StepPlan.build(ids, offsets.diff()),
                             mask, True, 0.35)  # fmt: skip
    torch.library.opcheck(prefix_attention_op, (*args.op_inputs(), "reference"))


def test_non_contiguous_views_match_contiguous():
    q, k, v, bank_k, bank_v, ids, offsets = make_case(dtype=torch.float32)
    fused = torch.cat([q, k, v], dim=-1).transpose(1, 2).contiguous().transpose(1, 2)  # [B, H, T, 3D] view
    qv, kv, vv = fused.split(8, dim=-1)
    assert not qv.is_contiguous()
    out_views, _ = op(qv, kv, vv, bank_k, bank_v, ids, offsets, causal=True)
    out, _ = op(q, k, v, bank_k, bank_v, ids, offsets, causal=True)
    torch.testing.assert_close(out_views, out)


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda a: a.update(q=a["q"][0]), "q must be"),
        (lambda a: a.update(k=a["k"][:, :1]), "k must be"),
        (lambda a: a.update(bank_k=a["bank_k"][:, :, :4]), "bank.k must be"),
        (lambda a: a.update(prefix_ids=a["prefix_ids"][:2]), "plan .prefix_ids. has 2 rows"),
        (lambda a: a.update(prefix_ids=a["prefix_ids"].float()), "prefix_ids must be an integer tensor"),
        (lambda a: a.update(prefix_ids=torch.tensor([0, 1, 2, 3])), r"prefix_ids holds ids \[3\]"),
        (lambda a: a.update(mask=torch.ones(4, 3, dtype=torch.bool)), "key_padding_mask must be"),
        (lambda a: a.update(mask=torch.ones(4, 5)), "key_padding_mask must be a bool tensor"),
        (lambda a: a.update(v=a["v"].float()), "v must have q's dtype"),
    ],
)
def test_bad_inputs_name_the_argument(change, message):
    q, k, v, bank_k, bank_v, ids, offsets = make_case()
    args = dict(q=q, k=k, v=v, bank_k=bank_k, bank_v=bank_v, prefix_ids=ids, offsets=offsets, mask=None)
    change(args)
    with pytest.raises(ValueError, match=message):
        op(*args.values())


def test_backend_selection_explains_refusals(monkeypatch):
    q, k, *_ = make_case()
    call = ops.AttentionCall.of(q, k, causal=True, dropout_p=0.0, requires_grad=False)
    assert ops.select_backend("reference", call).name == "reference"
    assert ops.explain_backends(call)["reference"] == "ok"
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.select_backend("flash", call)
    monkeypatch.setenv("PREFIXRT_BACKEND", "reference")
    assert ops.select_backend("auto", call).name == "reference"
    monkeypatch.setenv("PREFIXRT_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="PREFIXRT_BACKEND"):
        ops.select_backend("auto", call)


def test_dropout_through_auto_is_identity_in_expectation():
    q, k, v, bank_k, bank_v, ids, offsets = make_case(dtype=torch.float32)
    torch.manual_seed(0)
    out_drop, _ = op(q, k, v, bank_k, bank_v, ids, offsets, causal=True, dropout_p=0.5)
    out, _ = op(q, k, v, bank_k, bank_v, ids, offsets, causal=True)
    assert not torch.allclose(out_drop, out)
    torch.manual_seed(1)
    mean = torch.stack(
        [op(q, k, v, bank_k, bank_v, ids, offsets, causal=True, dropout_p=0.5)[0] for _ in range(400)]
    ).mean(0)
    torch.testing.assert_close(mean, out, atol=0.25, rtol=0.0)
