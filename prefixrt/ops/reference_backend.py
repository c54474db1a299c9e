"""The reference backend: the plain-torch oracle wrapped as a :class:`~prefixrt.ops.registry.Backend`.

Its backward is the explicit softmax backward of the oracle (tested against autograd through the oracle).
It accepts every call (any device, dtype, head dim; dropout too).
"""

from __future__ import annotations

import torch

from prefixrt.ops.reference import prefix_attention_reference, prefix_attention_reference_backward
from prefixrt.ops.registry import AttentionCall, Backend, register_backend


def reference_forward(q, k, v, bank_k, bank_v, prefix_ids, bank_offsets, key_padding_mask, causal, scale):
    with torch.no_grad():
        return prefix_attention_reference(
            q, k, v, bank_k, bank_v, prefix_ids, bank_offsets, key_padding_mask, causal, scale
        )


def reference_backward(
    dout, q, k, v, bank_k, bank_v, prefix_ids, bank_offsets, key_padding_mask, causal, scale, out, lse
):
    return prefix_attention_reference_backward(
        dout, q, k, v, bank_k, bank_v, prefix_ids, bank_offsets, key_padding_mask, causal, scale
    )


def _accept_everything(call: AttentionCall) -> str | None:
    return None


register_backend(
    Backend(
        name="reference",
        forward=reference_forward,
        backward=reference_backward,
        refuse=_accept_everything,
        priority={"cpu": 0, "cuda": 0},
    )
)
