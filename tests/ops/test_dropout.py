"""Attention dropout's random stream (prefixrt.ops.dropout) and the op layer around it: Philox against the
published test vectors and Triton's tl.randint; the reference, Triton and C++ masks equal on random
coordinates; the mask's statistics; the Philox state taken from torch's generator (manual_seed reproduces,
consecutive calls differ); the reference's dropout against the definition spelled out; autograd, opcheck and
the gradients the backward is asked for."""

import dataclasses

import pytest
import torch
import triton
import triton.language as tl
from support.attention_cases import philox_state

from prefixrt import ops
from prefixrt.ops import dropout as D
from prefixrt.ops.library import prefix_attention_op, run_op
from prefixrt.ops.reference import prefix_attention_reference, prefix_attention_reference_backward
from prefixrt.ops.registry import get_backend

MASK64 = (1 << 64) - 1
# (seed, offset) pairs: small, a seed >= 2^63, an offset whose counters wrap past 2^64
STATES = [(0, 0), (1234567, 1 << 40), ((1 << 63) + 77, 8), (42, MASK64 - 1000), (5, (1 << 32) - 3)]


# -- Philox 4x32-10 itself -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("counter", "key", "expected"),
    [  # Random123's known-answer vectors for philox4x32_10
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF, 0xFFFFFFFF), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        (
            (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
            (0xA4093822, 0x299F31D0),
            (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
        ),
    ],
    ids=["zeros", "ones", "pi"],
)
def test_philox_known_answers(counter, key, expected):
    assert tuple(int(w) for w in D.philox4x32(counter, key)) == expected


@triton.jit
def _randint_kernel(COUNTERS, OUT, seed, N, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    counters = tl.load(COUNTERS + offs, mask=offs < N, other=0)
    tl.store(OUT + offs, tl.randint(seed, counters).to(tl.int64), mask=offs < N)


@pytest.mark.parametrize("seed", [s for s, _ in STATES])
def test_randint_is_tritons_stream(seed):
    """Word 0 with the counter's two low words from a 64-bit offset: Triton's tl.randint, bit for bit."""
    counters = torch.randint(-(2**63), 2**63 - 1, (128,), generator=torch.Generator().manual_seed(seed % 97))
    counters[:4] = torch.tensor([0, 1, 2**32, -1])
    out = torch.empty(128, dtype=torch.long)
    signed_seed = seed - (1 << 64) if seed >= 1 << 63 else seed
    _randint_kernel[(1,)](counters, out, signed_seed, 128, BLOCK=128)
    assert torch.equal(out, D.randint(seed, counters))


# -- one mask for every backend --------------------------------------------------------------------------------
def random_coords(n, batch, heads, q_len, stride, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.stack(
        [torch.randint(0, m, (n,), generator=g) for m in (batch, heads, q_len, stride)], dim=1
    )  # [N, 4]


@pytest.mark.usefixtures("cpp_kernels")
@pytest.mark.parametrize("dropout_p", [0.1, 0.5])
@pytest.mark.parametrize(
    "state", STATES, ids=["small", "offset-2^40", "seed>=2^63", "offset-wraps", "low-word-carry"]
)
def test_reference_triton_and_cpp_draw_the_same_mask(state, dropout_p):
    from prefixrt.ops.cpp.backend import cpp_dropout_mask
    from prefixrt.ops.triton.launch import dropout_mask

    heads, q_len, stride = 3, 37, 251
    coords = random_coords(4096, 5, heads, q_len, stride, seed=state[1] % 13)
    # and whole rows of keys (the kernels' vectorized path draws runs of consecutive keys)
    rows = random_coords(6, 5, heads, q_len, 1, seed=state[1] % 7)
    rows[0] = 0  # row (0, 0, 0): its counters are offset + j (a low word that carries, for the last state)
    rows = rows.repeat_interleave(stride, 0)
    rows[:, 3] = torch.arange(stride).repeat(6)
    coords = torch.cat([coords, rows])
    philox = philox_state(*state)
    want = D.dropout_multiplier_at(philox, dropout_p, heads, q_len, stride, coords)
    assert set(want.unique().tolist()) == {0.0, D.dropout_scale(dropout_p)}
    assert torch.equal(dropout_mask(philox, dropout_p, heads, q_len, stride, coords), want), "triton"
    assert torch.equal(cpp_dropout_mask(philox, dropout_p, heads, q_len, stride, coords), want), "cpp"


def test_grid_and_elementwise_masks_agree():
    batch, heads, q_len, keys, stride = 2, 3, 5, 11, 17
    philox = philox_state(99, 12)
    key_index = torch.arange(keys).repeat(batch, 1) + torch.tensor([[0], [6]])  # row 1: a prefix of 6
    grid = D.dropout_multiplier(philox, 0.3, batch, heads, q_len, stride, key_index)
    b, h, i, c = torch.meshgrid(*(torch.arange(n) for n in (batch, heads, q_len, keys)), indexing="ij")
    coords = torch.stack([b, h, i, key_index[b, c]], dim=-1).reshape(-1, 4)
    torch.testing.assert_close(
        grid.flatten(), D.dropout_multiplier_at(philox, 0.3, heads, q_len, stride, coords)
    )


@pytest.mark.parametrize("dropout_p", [0.1, 0.5])
def test_kept_fraction_is_one_minus_p(dropout_p):
    batch, heads, q_len, keys = 4, 4, 64, 1024  # 2^20 elements
    key_index = torch.arange(keys).repeat(batch, 1)
    z = D.dropout_multiplier(philox_state(7, 0), dropout_p, batch, heads, q_len, keys, key_index)
    kept = (z > 0).double()
    sigma = (dropout_p * (1 - dropout_p) / kept.numel()) ** 0.5
    assert abs(kept.mean().item() - (1 - dropout_p)) < 5 * sigma
    assert abs(z.double().mean().item() - 1.0) < 5 * sigma / (1 - dropout_p)  # inverted dropout: E[z] = 1
    # neighbouring keys and neighbouring queries are uncorrelated
    for a, b in ((kept[..., 1:], kept[..., :-1]), (kept[:, :, 1:], kept[:, :, :-1])):
        corr = torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1].item()
        assert abs(corr) < 0.01


def test_seeds_and_offsets_give_different_masks():
    key_index = torch.arange(64).repeat(2, 1)
    masks = [
        D.dropout_multiplier(philox_state(s, o), 0.5, 2, 2, 8, 64, key_index)
        for s, o in ((1, 0), (2, 0), (1, 4))
    ]
    assert not torch.equal(masks[0], masks[1]) and not torch.equal(masks[0], masks[2])
    again = D.dropout_multiplier(philox_state(1, 0), 0.5, 2, 2, 8, 64, key_index)
    assert torch.equal(masks[0], again)


def test_threshold_and_scale():
    assert D.dropout_keep_threshold(0.5) == 2**31
    assert D.dropout_keep_threshold(0.1) == int(0.1 * 2**32)
    assert D.dropout_scale(0.1) == float(torch.tensor(1 / 0.9, dtype=torch.float32))
    for bad in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match="dropout_p must be in"):
            D.check_dropout_p(bad)


# -- the Philox state: from torch's generator ------------------------------------------------------------------
class FakeCudaGenerator:
    """initial_seed / get_offset / set_offset, like torch.cuda's default generators."""

    def __init__(self, seed, offset=0):
        self.seed, self.offset = seed, offset

    def initial_seed(self):
        return self.seed

    def get_offset(self):
        return self.offset

    def set_offset(self, offset):
        assert offset % 4 == 0, "torch requires a multiple of 4"
        self.offset = offset


def test_offset_generators_advance_by_the_increment():
    gen = FakeCudaGenerator((1 << 63) + 5, 8)
    first = D.advance_generator(gen, 10)
    second = D.advance_generator(gen, 4)
    assert D.philox_ints(first) == ((1 << 63) + 5, 8) and D.philox_ints(second) == ((1 << 63) + 5, 20)
    assert gen.offset == 24
    assert D.philox_increment(2, 3, 5, 7) == 212  # 210 counters, rounded up to a multiple of 4


def test_cpu_state_follows_manual_seed():
    torch.manual_seed(3)
    a, b = D.draw_philox_state("cpu", 100), D.draw_philox_state("cpu", 100)
    torch.manual_seed(3)
    assert torch.equal(D.draw_philox_state("cpu", 100), a)
    assert not torch.equal(a, b) and a[1] == 0 and a.dtype == torch.long


# -- the reference follows the definition ----------------------------------------------------------------------
def make_call(batch=4, heads=2, tq=5, tk=6, dim=8, lengths=(3, 0, 4), ids=(2, -1, 0, 2), seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, tq, dim, generator=g, dtype=torch.float64)
    k = torch.randn(batch, heads, tk, dim, generator=g, dtype=torch.float64)
    v = torch.randn(batch, heads, tk, dim, generator=g, dtype=torch.float64)
    bank_k = torch.randn(heads, sum(lengths), dim, generator=g, dtype=torch.float64)
    bank_v = torch.randn(heads, sum(lengths), dim, generator=g, dtype=torch.float64)
    offsets = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    mask = torch.ones(batch, tk, dtype=torch.bool)
    mask[1, :2] = False
    mask[batch - 1, -1] = False
    return q, k, v, bank_k, bank_v, torch.tensor(ids), offsets, mask


def naive_dropout_attention(q, k, v, bank_k, bank_v, ids, offsets, mask, causal, scale, p, philox):
    """One element at a time: key j of row b is prefix key j (j < P_b) or own key j - P_b, its counter
    offset + ((b H + h) Tq + i) L + j with L = S + Tk, kept iff tl.randint's word >= floor(p 2^32)."""
    batch, heads, tq, dim = q.shape
    tk, stride = k.shape[2], bank_k.shape[1] + k.shape[2]
    seed, offset = D.philox_ints(philox)
    out = torch.zeros(batch, heads, tq, dim, dtype=torch.float64)
    for b in range(batch):
        e = int(ids[b])
        lo, hi = (int(offsets[e]), int(offsets[e + 1])) if e >= 0 else (0, 0)
        for h in range(heads):
            for i in range(tq):
                keys = [(j, bank_k[h, lo + j], bank_v[h, lo + j]) for j in range(hi - lo)]
                keys += [
                    (hi - lo + t, k[b, h, t], v[b, h, t])
                    for t in range(tk)
                    if mask[b, t] and not (causal and t > i + tk - tq)
                ]
                if not keys:
                    continue  # sees nothing: output 0
                scores = torch.stack([(q[b, h, i] * kk).sum() * scale for _, kk, _ in keys])
                weights = torch.softmax(scores, 0)
                for (j, _, vv), w in zip(keys, weights, strict=True):
                    counter = (offset + ((b * heads + h) * tq + i) * stride + j) & MASK64
                    word = int(
                        D.randint(seed, torch.tensor([counter - (1 << 64) if counter >> 63 else counter]))
                    )
                    if word >= int(p * 2**32):
                        out[b, h, i] += w * D.dropout_scale(p) * vv
    return out


@pytest.mark.parametrize("causal", [False, True])
def test_reference_dropout_is_the_definition(causal):
    call = make_call()
    philox = philox_state(2024, 36)
    out, lse = prefix_attention_reference(*call, causal, 0.4, 0.5, philox)
    torch.testing.assert_close(out, naive_dropout_attention(*call, causal, 0.4, 0.5, philox))
    _, undropped_lse = prefix_attention_reference(*call, causal, 0.4)
    torch.testing.assert_close(lse, undropped_lse)  # lse of the undropped scores


def test_reference_backward_with_dropout_matches_autograd():
    q, k, v, bank_k, bank_v, ids, offsets, mask = make_call(ids=(2, 2, -1, 0))
    philox = philox_state(5, 0)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v, bank_k, bank_v)]
    out, _ = prefix_attention_reference(*leaves, ids, offsets, mask, True, 0.5, 0.3, philox)
    dout = torch.randn_like(out)
    want = torch.autograd.grad(out, leaves, dout)
    got = prefix_attention_reference_backward(dout, q, k, v, bank_k, bank_v, ids, offsets, mask, True, 0.5,
                                              0.3, philox)  # fmt: skip
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)
    with pytest.raises(ValueError, match="philox"):
        prefix_attention_reference_backward(dout, q, k, v, bank_k, bank_v, ids, offsets, mask, True, 0.5, 0.3)


# -- the op: fields, torch.library, autograd, the gradients asked for ------------------------------------------
def op_args(call, dropout_p=0.2, philox=None, scale=0.35):
    q, k, v, bank_k, bank_v, ids, offsets, mask = call
    plan = ops.StepPlan.build(ids, offsets.diff())
    return ops.AttentionArgs(q, k, v, ops.BankLayer(bank_k, bank_v, offsets), plan, mask, True, scale, dropout_p,
                             philox_state(9, 4) if philox is None else philox)  # fmt: skip


def test_gradcheck_with_a_fixed_mask():
    call = list(make_call(batch=3, heads=1, tq=3, tk=4, dim=4, ids=(0, -1, 2)))
    args = op_args(call, dropout_p=0.5)
    leaves = [t.requires_grad_(True) for t in call[:5]]

    def fn(*xs):
        bank = ops.BankLayer(xs[3], xs[4], args.bank.offsets)
        return run_op(args.with_tensors(*xs[:3], bank=bank), "reference")[0]

    assert torch.autograd.gradcheck(fn, leaves)


def test_library_op_with_dropout_passes_opcheck():
    call = [t.float() if t.is_floating_point() else t for t in make_call()]
    for t in call[:5]:
        t.requires_grad_(True)
    torch.library.opcheck(prefix_attention_op, (*op_args(call).op_inputs(), "reference"))


def test_dropout_needs_a_philox_state_and_a_valid_p():
    call = make_call()
    with pytest.raises(ValueError, match="philox must be a CPU LongTensor"):
        ops.check_attention_args(dataclasses.replace(op_args(call), philox=None))
    with pytest.raises(ValueError, match="dropout_p must be in"):
        q, k, v, bank_k, bank_v, ids, offsets, mask = call
        ops.prefix_attention(q, k, v, ops.BankLayer(bank_k, bank_v, offsets), ops.StepPlan.build(ids, offsets.diff()),
                             mask, dropout_p=1.0)  # fmt: skip


def backends():
    out = ["reference"]
    out += [b for b in ("cpp", "triton") if b in ops.available_backends()]
    return out


def public_op(call, backend, dropout_p, leaves=None):
    q, k, v, bank_k, bank_v, ids, offsets, mask = call
    q, k, v, bank_k, bank_v = leaves or (q, k, v, bank_k, bank_v)
    bank = ops.BankLayer(bank_k, bank_v, offsets)
    plan = ops.StepPlan.build(ids, offsets.diff())
    return ops.prefix_attention(q, k, v, bank, plan, mask, causal=True, dropout_p=dropout_p, backend=backend)[
        0
    ]


@pytest.mark.parametrize("backend", backends())
def test_manual_seed_reproduces_and_calls_draw_fresh_masks(backend):
    call = [t.float() if t.is_floating_point() else t for t in make_call(dim=16, lengths=(3, 0, 17))]
    torch.manual_seed(0)
    first, second = public_op(call, backend, 0.5), public_op(call, backend, 0.5)
    torch.manual_seed(0)
    assert torch.equal(public_op(call, backend, 0.5), first)
    assert not torch.allclose(first, second)


@pytest.mark.parametrize("backend", [b for b in backends() if b != "reference"])
def test_backends_equal_the_reference_with_the_same_seed(backend):
    """Through the public op and autograd: the same torch.manual_seed gives the same mask in every backend."""
    call = [t.float() if t.is_floating_point() else t for t in make_call(dim=16, lengths=(3, 0, 17))]
    results = []
    for name in ("reference", backend):
        leaves = [t.detach().clone().requires_grad_(True) for t in call[:5]]
        torch.manual_seed(123)
        out = public_op(call, name, 0.1, leaves)
        (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
        results.append([out.detach(), *(t.grad for t in leaves)])
    for what, got, want in zip(("out", "dq", "dk", "dv", "dbank_k", "dbank_v"), *results[::-1], strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4, msg=lambda m, w=what: f"{w}: {m}")


@pytest.mark.parametrize("backend", [b for b in backends() if b != "triton"])  # (triton: the same mask)
def test_dropout_is_identity_in_expectation(backend):
    call = [t.float() if t.is_floating_point() else t for t in make_call(dim=16, lengths=(3, 0, 17))]
    want = public_op(call, backend, 0.0)
    torch.manual_seed(1)
    mean = torch.stack([public_op(call, backend, 0.5) for _ in range(200)]).mean(0)
    torch.testing.assert_close(mean, want, atol=0.35, rtol=0.0)


GRADS_OF = {
    "all": ("q", "k", "v", "bank_k", "bank_v"),
    "bank-only": ("bank_k", "bank_v"),  # layer 0 of a prefix-tuned model: q, k, v come from frozen embeddings
    "kv-only": ("k", "v"),
    "q-only": ("q",),
}


@pytest.mark.parametrize(
    ("backend", "grad_of"),
    [(b, g) for b in backends() for g in GRADS_OF if b != "triton" or g == "bank-only"],  # interpreter time
)
def test_backward_is_asked_only_for_the_gradients_needed(backend, grad_of, monkeypatch):
    grad_of = GRADS_OF[grad_of]
    names = ("q", "k", "v", "bank_k", "bank_v")
    call = [t.float() if t.is_floating_point() else t for t in make_call(dim=16, lengths=(3, 0, 17))]
    seen = []
    chosen = get_backend(backend)
    real = chosen.backward

    def spy(args, dout, out, lse, needs):
        seen.append(tuple(needs))
        return real(args, dout, out, lse, needs)

    monkeypatch.setattr(chosen, "backward", spy)
    leaves = [t.detach().clone().requires_grad_(n in grad_of) for n, t in zip(names, call[:5], strict=True)]
    torch.manual_seed(4)
    public_op(call, backend, 0.1, leaves).sum().backward()
    assert seen == [tuple(n in grad_of for n in names)]
    for n, t in zip(names, leaves, strict=True):
        assert (t.grad is not None) == (n in grad_of), n
    # and the gradients that were computed are those of a full backward
    full = [t.detach().clone().requires_grad_(True) for t in call[:5]]
    torch.manual_seed(4)
    public_op(call, backend, 0.1, full).sum().backward()
    for n, t, f in zip(names, leaves, full, strict=True):
        if n in grad_of:
            torch.testing.assert_close(t.grad, f.grad, msg=lambda m, n=n: f"{n}: {m}")
