"""The reference backend: the plain-torch oracle wrapped as a :class:`~prefixrt.ops.registry.Backend`.

Its backward is the explicit softmax backward of the oracle (tested against autograd through the oracle).
It accepts every call (any device, dtype, head dim; dropout too, with the mask of :mod:`prefixrt.ops.dropout`).
"""

from __future__ import annotations

import torch

from prefixrt.ops.args import AttentionArgs
from prefixrt.ops.reference import prefix_attention_reference, prefix_attention_reference_backward
from prefixrt.ops.registry import AttentionCall, Backend, register_backend


def _oracle_inputs(args: AttentionArgs) -> tuple:
    """The oracle's positional arguments for this call."""
    return (args.q, args.k, args.v, args.bank.k, args.bank.v, args.prefix_ids, args.bank.offsets,
            args.key_padding_mask, args.causal, args.scale, args.dropout_p, args.philox)  # fmt: skip


def reference_forward(args: AttentionArgs) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return prefix_attention_reference(*_oracle_inputs(args))


def reference_backward(args: AttentionArgs, dout, out, lse, needs=(True,) * 5) -> tuple[torch.Tensor, ...]:
    """All five gradients (the oracle computes them together; ``needs`` is honoured by the op layer)."""
    return prefix_attention_reference_backward(dout, *_oracle_inputs(args))


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
