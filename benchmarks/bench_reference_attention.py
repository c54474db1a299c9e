"""First case of the suite: prefixrt's reference path vs HF eager attention with each row's prefix
concatenated into its keys (what PEFT does: the prefix copied into every sequence's cache).

Shapes: GPT-2-small attention (12 heads, head dim 64), 8 rows over 4 prefixes, P=200, T=128, one layer.
Both paths gather the prefix per row: the reference exists to be the oracle, so this case is the baseline that
the Triton and C++ cases (bench_triton_*.py, bench_cpp_*.py) are measured against.
"""

import pytest
import torch

from prefixrt import ops

HEADS, HEAD_DIM, ROWS, PREFIXES, P, T = 12, 64, 8, 4, 200, 128


def make_inputs(device, dtype=torch.float32):
    g = torch.Generator(device="cpu").manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype).to(device)

    q, k, v = (randn(ROWS, HEADS, T, HEAD_DIM) for _ in range(3))
    bank_k, bank_v = randn(HEADS, PREFIXES * P, HEAD_DIM), randn(HEADS, PREFIXES * P, HEAD_DIM)
    offsets = torch.arange(PREFIXES + 1, device=device) * P
    prefix_ids = torch.arange(ROWS, device=device) % PREFIXES
    return q, k, v, bank_k, bank_v, prefix_ids, offsets


def eager_concatenated(q, k, v, bank_k, bank_v, prefix_ids, offsets):
    """HF's eager attention on [prefix ; keys] with the prefix copied per row and a 4-D additive mask."""
    index = offsets[prefix_ids][:, None] + torch.arange(P, device=q.device)  # [B, P]
    keys = torch.cat([bank_k[:, index].transpose(0, 1), k], dim=2)
    values = torch.cat([bank_v[:, index].transpose(0, 1), v], dim=2)
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    visible = torch.cat([torch.ones(T, P, dtype=torch.bool, device=q.device), causal], dim=1)
    mask = torch.zeros(visible.shape, dtype=q.dtype, device=q.device).masked_fill(
        ~visible, torch.finfo(q.dtype).min
    )
    scores = q @ keys.transpose(-1, -2) * HEAD_DIM**-0.5 + mask
    return torch.softmax(scores, dim=-1) @ values


@pytest.mark.benchmark(group="prefill-attention-one-layer")
def test_eager_concatenated_baseline(record_device, device):
    inputs = make_inputs(device)
    with torch.no_grad():
        record_device(eager_concatenated, *inputs)


@pytest.mark.benchmark(group="prefill-attention-one-layer")
def test_prefixrt_reference(record_device, device):
    inputs = make_inputs(device)
    with torch.no_grad():
        out = ops.prefix_attention(*inputs, causal=True, backend="reference")[0]
        torch.testing.assert_close(out, eager_concatenated(*inputs), atol=1e-4, rtol=1e-4)
        record_device(lambda: ops.prefix_attention(*inputs, causal=True, backend="reference"))
