"""First case of the suite: prefixrt's reference path vs HF eager attention with each row's prefix
concatenated into its keys (what PEFT does: the prefix copied into every sequence's cache).

Shapes: GPT-2-small attention (12 heads, head dim 64), 8 rows over 4 prefixes, P=200, T=128, one layer.
Both paths gather the prefix per row: the reference exists to be the oracle, so this case is the baseline that
the Triton and C++ cases (bench_triton_*.py, bench_cpp_*.py) are measured against. Workload and baseline are
``attention_workload.py``'s.
"""

import pytest
import torch
from attention_workload import eager_concat, make_args, public_op

HEADS, HEAD_DIM, ROWS, PREFIXES, P, T = 12, 64, 8, 4, 200, 128


def make_inputs(device, dtype=torch.float32):
    return make_args(rows=ROWS, prefixes=PREFIXES, prefix_len=P, q_len=T, k_len=T, heads=HEADS,
                     head_dim=HEAD_DIM, dtype=dtype, device=device, causal=True)  # fmt: skip


@pytest.mark.benchmark(group="prefill-attention-one-layer")
def test_eager_concatenated_baseline(record_device, device):
    args = make_inputs(device)
    with torch.no_grad():
        record_device(eager_concat, args, P)


@pytest.mark.benchmark(group="prefill-attention-one-layer")
def test_prefixrt_reference(record_device, device):
    args = make_inputs(device)
    with torch.no_grad():
        out = public_op(args, "reference")[0]
        torch.testing.assert_close(out, eager_concat(args, P), atol=1e-4, rtol=1e-4)
        record_device(public_op, args, "reference")
