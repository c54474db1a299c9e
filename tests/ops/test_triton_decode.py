"""The Triton decode path (grouped prefix + split-KV own cache + LSE merge) against the reference, and against
the last row of the Triton prefill."""

import pytest
import torch
from support.triton_cases import ENTRY_LENGTHS, TOLERANCES, assert_close, gpu, make_case, reference

from prefixrt.ops import AttentionArgs, StepPlan
from prefixrt.ops.triton.configs import DECODE_CONFIGS
from prefixrt.ops.triton.decode import prefix_decode
from prefixrt.ops.triton.launch import prefix_attention_fwd


def decode_case(ids, k_len, **kwargs):
    """One decode step: a single query per row against a cache of ``k_len`` own keys."""
    return make_case(ids, q_len=1, k_len=k_len, **kwargs)


def check_decode(case, plan=None, **kwargs):
    args = case.attention_args()
    if plan is not None:
        args = AttentionArgs(
            args.q, args.k, args.v, args.bank, plan, args.key_padding_mask, False, case.scale
        )
    out, lse = prefix_decode(args, **kwargs)
    ref_out, ref_lse = reference(case)
    tol = TOLERANCES[case.q.dtype]
    assert out.dtype == case.q.dtype
    assert_close(out, ref_out, tol.out, "out")
    assert_close(lse, ref_lse, tol.lse, "lse")
    return out, lse


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_every_entry_length_in_one_batch(dtype):
    ids = [6, 0, 1, 2, 3, -1, 4, 5, 6, 2]
    check_decode(
        decode_case(ids, k_len=9, entry_lengths=ENTRY_LENGTHS, heads=2, dtype=dtype, padding="mixed")
    )


@pytest.mark.parametrize(
    "ids",
    [[1] * 20, [0, 1, 2, 3], [3, 0, 3, 1, 3], [-1, 2, -1, 0], [3], [-1, -1]],
    ids=[
        "all-equal-two-groups",
        "all-distinct",
        "repeated-non-contiguous",
        "with-none",
        "largest-id",
        "all-none",
    ],
)
def test_id_patterns(ids):
    check_decode(decode_case(ids, k_len=6))


@pytest.mark.parametrize("k_len", [0, 1, 2, 17, 128])
@pytest.mark.parametrize("kv_splits", [1, 3])
def test_cache_lengths_and_splits(k_len, kv_splits):
    check_decode(
        decode_case([3, 0, -1, 3], k_len=k_len, padding="left" if k_len > 1 else None), kv_splits=kv_splits
    )


def test_empty_bank():
    check_decode(decode_case([-1, -1], k_len=4, entry_lengths=()))


def test_fully_padded_row_without_prefix_sees_nothing():
    out, lse = check_decode(decode_case([-1, 0, 3], k_len=5, padding="full"), kv_splits=2)
    assert torch.equal(out[0], torch.zeros_like(out[0])) and torch.isneginf(lse[0]).all()


def test_cross_attention_with_non_contiguous_views():
    # BART cross-attention at a decode step: one decoder query against all encoder states, no causal mask
    case = decode_case([3, 0, 3, -1], k_len=23, heads=2, causal=False, padding="right", fused_qkv=True)
    assert not case.k.is_contiguous() and not case.bank_k.is_contiguous()
    check_decode(case, kv_splits=2)


def test_strided_preallocated_cache():
    # a cache preallocated for 32 tokens, of which the first 11 are filled
    case = decode_case([1, 3, 1], k_len=32, heads=2, padding="right")
    case = case.with_(
        k=case.k[:, :, :11], v=case.v[:, :, :11], key_padding_mask=case.key_padding_mask[:, :11]
    )
    check_decode(case, kv_splits=2)


@pytest.mark.parametrize("causal", [True, False])
def test_equals_last_row_of_prefill(causal):
    case = make_case([3, 0, 3, -1, 1], q_len=12, heads=2, causal=causal, padding="left", dtype=torch.float16)
    out, lse = prefix_attention_fwd(case.attention_args())
    last = case.with_(q=case.q[:, :, -1:])
    dec_out, dec_lse = prefix_decode(last.attention_args(), kv_splits=2)
    tol = TOLERANCES[torch.float16]
    assert_close(dec_out, out[:, :, -1:], tol.out, "out")
    assert_close(dec_lse, lse[:, :, -1:], tol.lse, "lse")


@pytest.mark.parametrize("config", DECODE_CONFIGS, ids=lambda c: f"m{c.block_m}n{c.block_n}")
def test_every_config(config):
    # 18 rows of entry 2 make two groups of 16 (or one of 32/64); 17 keys cross a 16-key block
    ids = [2] * 18 + [0, -1, 4, 3]
    case = decode_case(ids, k_len=17, entry_lengths=(0, 1, 15, 16, 17), padding="mixed", dtype=torch.float16)
    check_decode(case, config=config, kv_splits=2)


def test_explicit_plan_is_reused_across_layers():
    case = decode_case([3, 0, 3, 1, 3], k_len=7, heads=2)
    plan = StepPlan.build(case.prefix_ids, case.bank_offsets.diff(), group_size=16)
    for layer_seed in range(2):  # two "layers": same ids and plan, different bank and cache
        layer = decode_case([3, 0, 3, 1, 3], k_len=7, heads=2, seed=layer_seed + 10)
        layer = layer.with_(prefix_ids=case.prefix_ids, bank_offsets=case.bank_offsets)
        check_decode(layer, plan=plan)


def test_refuses_more_than_one_query():
    case = make_case([0], q_len=2)
    with pytest.raises(ValueError, match="one query per row"):
        prefix_decode(case.attention_args())


def test_rejects_a_group_size_the_gpu_cannot_dot():
    with pytest.raises(ValueError, match="power of two >= 16"):
        StepPlan.build(torch.tensor([0]), [3], group_size=8)


@gpu
@pytest.mark.gpu
def test_bf16_with_default_splits():
    ids = [3] * 40 + [0, 1, -1] * 8
    check_decode(decode_case(ids, k_len=300, heads=4, head_dim=64, dtype=torch.bfloat16, padding="left",
                             entry_lengths=(5, 64, 0, 200)))  # fmt: skip
