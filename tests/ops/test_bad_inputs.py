"""One answer from every backend: each bad input to ``prefix_attention`` (or to the ``StepPlan`` it reads) raises the
same error type, with the same message naming the argument, whichever backend is asked (reference, C++, Triton --
in its CPU interpreter without a GPU, see tests/conftest.py), because the op layer checks the call once before any
backend sees it. A plan built without reading the ids (for traced code) reads no prefix for an out-of-range id, on
every backend alike."""

import pytest
import torch

from prefixrt import ops
from prefixrt.ops import BankLayer, StepPlan

B, H, TQ, TK, D = 2, 2, 3, 5, 16
LENGTHS = [2, 3]  # two entries: bank rows 0:2 and 2:5


def _valid() -> dict:
    """A call every backend runs: two rows (entry 1, no prefix), causal, a key padding mask."""
    g = torch.Generator().manual_seed(0)
    mask = torch.ones(B, TK, dtype=torch.bool)
    mask[0, 0] = False
    return dict(
        q=torch.randn(B, H, TQ, D, generator=g),
        k=torch.randn(B, H, TK, D, generator=g),
        v=torch.randn(B, H, TK, D, generator=g),
        bank_k=torch.randn(H, sum(LENGTHS), D, generator=g),
        bank_v=torch.randn(H, sum(LENGTHS), D, generator=g),
        offsets=torch.tensor([0, *LENGTHS]).cumsum(0),
        ids=torch.tensor([1, -1]),
        lengths=list(LENGTHS),
        plan_kwargs={},
        mask=mask,
        dropout_p=0.0,
    )


def _call(backend: str, a: dict):
    plan = StepPlan.build(a["ids"], a["lengths"], **a["plan_kwargs"])
    bank = BankLayer(a["bank_k"], a["bank_v"], a["offsets"])
    return ops.prefix_attention(
        a["q"],
        a["k"],
        a["v"],
        bank,
        plan,
        key_padding_mask=a["mask"],
        causal=True,
        dropout_p=a["dropout_p"],
        backend=backend,
    )


def _runs(backend: str) -> bool:
    try:
        _call(backend, _valid())
    except ops.BackendUnavailable:
        return False
    return True


BACKENDS = [name for name in ops.available_backends() if _runs(name)]


def _to_int(a):
    for key in ("q", "k", "v", "bank_k", "bank_v"):
        a[key] = a[key].long()


# (case, change to the valid call, error type, message the error starts with: it names the argument)
CASES = [
    ("q_3d", lambda a: a.update(q=a["q"][0]), ValueError, r"q must be \[B, H, Tq, D\]"),
    ("q_integer", _to_int, ValueError, "q must be a floating-point tensor"),
    ("k_heads", lambda a: a.update(k=a["k"][:, :1]), ValueError, r"k must be \[B=2, H=2, Tk, D=16\]"),
    ("v_head_dim", lambda a: a.update(v=a["v"][..., :8]), ValueError, r"v must be \[B=2, H=2, Tk, D=16\]"),
    ("v_length", lambda a: a.update(v=a["v"][:, :, :4]), ValueError, "k and v must have the same shape"),
    ("k_dtype", lambda a: a.update(k=a["k"].double()), ValueError, "k must have q's dtype"),
    ("bank_heads", lambda a: a.update(bank_k=a["bank_k"][:1], bank_v=a["bank_v"][:1]), ValueError, r"bank.k must be \[H=2"),
    ("bank_k_v_shapes", lambda a: a.update(bank_v=a["bank_v"][:, :4]), ValueError, "bank.k and bank.v must have the same shape"),
    ("bank_dtype", lambda a: a.update(bank_k=a["bank_k"].double(), bank_v=a["bank_v"].double()), ValueError, "bank.k must have q's dtype"),
    ("offsets_int32", lambda a: a.update(offsets=a["offsets"].int()), ValueError, "bank.offsets must be a LongTensor"),
    ("plan_for_other_entries", lambda a: a.update(lengths=[2, 3, 0]), ValueError, "plan was built for a bank of 3 entries"),
    ("bank_rows_short", lambda a: a.update(bank_k=a["bank_k"][:, :4], bank_v=a["bank_v"][:, :4]), ValueError, "bank.offsets reach row 5"),
    ("plan_batch", lambda a: a.update(ids=torch.tensor([1, -1, 0])), ValueError, r"plan \(prefix_ids\) has 3 rows"),
    ("mask_shape", lambda a: a.update(mask=a["mask"][:, :4]), ValueError, r"key_padding_mask must be \[B=2, Tk=5\]"),
    ("mask_dtype", lambda a: a.update(mask=a["mask"].long()), ValueError, "key_padding_mask must be a bool tensor"),
    ("k_device", lambda a: a.update(k=a["k"].to("meta")), ValueError, "k must be on q's device"),
    ("mask_device", lambda a: a.update(mask=a["mask"].to("meta")), ValueError, "key_padding_mask must be on q's device"),
    ("id_too_large", lambda a: a.update(ids=torch.tensor([1, 7])), ValueError, r"prefix_ids holds ids \[7\]; valid ids are -1"),
    ("id_below_minus_one", lambda a: a.update(ids=torch.tensor([-3, 0])), ValueError, r"prefix_ids holds ids \[-3\]"),
    ("ids_float", lambda a: a.update(ids=torch.tensor([1.0, -1.0])), ValueError, "prefix_ids must be an integer tensor"),
    ("ids_2d", lambda a: a.update(ids=torch.tensor([[1, -1]])), ValueError, r"prefix_ids must be an integer tensor \[batch\]"),
    ("negative_length", lambda a: a.update(lengths=[4, -1]), ValueError, "bank offsets must be non-decreasing"),
    ("group_size", lambda a: a.update(plan_kwargs={"group_size": 24}), ValueError, "group_size must be a power of two"),
    ("dropout_above_one", lambda a: a.update(dropout_p=1.5), ValueError, r"dropout_p must be in \[0, 1\)"),
    ("dropout_negative", lambda a: a.update(dropout_p=-0.1), ValueError, r"dropout_p must be in \[0, 1\)"),
]  # fmt: skip


def test_the_valid_call_runs_on_the_reference_and_every_kernel_backend_here():
    assert "reference" in BACKENDS
    missing = {name: ops.explain_backends(ops.AttentionCall.of(*[_valid()[k] for k in ("q", "k")], True, 0.0, False))[name] for name in set(ops.available_backends()) - set(BACKENDS)}  # fmt: skip
    assert not missing, f"backends registered here that refuse the valid call: {missing}"


@pytest.mark.parametrize("case, change, error, message", CASES, ids=[c[0] for c in CASES])
def test_every_backend_gives_the_same_error(case, change, error, message):
    seen = {}
    for backend in [*BACKENDS, "auto"]:
        call = _valid()
        change(call)
        with pytest.raises(error, match=f"^{message}") as raised:
            _call(backend, call)
        seen[backend] = (type(raised.value), str(raised.value))
    assert len(set(seen.values())) == 1, seen


@pytest.mark.parametrize("ids", [[1, 7], [-3, 0], [9, -5]])
def test_an_unread_plan_reads_no_prefix_for_out_of_range_ids_on_every_backend(ids):
    """``StepPlan.build(..., read_ids=False)`` validates nothing (no host read): an id outside ``[-1, N)`` is a row
    without prefix, on every backend (the reference used to index with it, the C++ kernels to refuse it)."""
    call = _valid()
    call.update(ids=torch.tensor(ids), plan_kwargs={"read_ids": False})
    expected = _valid()
    expected.update(ids=torch.tensor([i if 0 <= i < len(LENGTHS) else -1 for i in ids]))
    reference = _call("reference", expected)[0]
    for backend in BACKENDS:
        torch.testing.assert_close(_call(backend, call)[0], reference, atol=1e-5, rtol=1e-4, msg=backend)
