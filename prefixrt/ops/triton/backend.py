"""The Triton backend: registers the Triton kernels as the ``"triton"`` prefix-attention backend.

Importing this module imports ``triton``; on a machine without it the import fails and
:mod:`prefixrt.ops` records why (``explain_backends`` shows it). ``"auto"`` picks Triton for CUDA tensors
only. On CPU it runs only in Triton's interpreter (``TRITON_INTERPRET=1`` set before prefixrt is imported),
for tests, and only when asked for by name.

Routing: a call with one query per row (``Tq == 1``: a decode step, self- or cross-attention) goes to the
decode kernels (grouped prefix + split-KV + merge, see :mod:`prefixrt.ops.triton.decode`); everything else
to the prefill/training kernel. Both return the same ``(out, lse)``, so the backward is the same.
Attention dropout (training) runs in the prefill/training kernels, forward and backward; a ``Tq == 1`` call
with dropout (a training batch of one-token rows: decode itself is inference and has none) goes to the
prefill kernel too, since the decode kernels have no dropout.
"""

from __future__ import annotations

import torch
from triton.runtime.interpreter import InterpretedFunction

from prefixrt.kernels.prefix_attention_fwd import prefix_attention_fwd_kernel
from prefixrt.ops.args import AttentionArgs
from prefixrt.ops.registry import AttentionCall, Backend, register_backend
from prefixrt.ops.triton.configs import SUPPORTED_DTYPES, SUPPORTED_HEAD_DIMS
from prefixrt.ops.triton.decode import prefix_decode
from prefixrt.ops.triton.launch import prefix_attention_bwd, prefix_attention_fwd

__all__ = ["triton_forward", "triton_backward", "refuse", "INTERPRETED"]

# Triton decides at decoration time whether a kernel runs in its CPU interpreter.
INTERPRETED = isinstance(prefix_attention_fwd_kernel, InterpretedFunction)


def refuse(call: AttentionCall) -> str | None:
    """None when the Triton kernels can run ``call``, else why not."""
    if call.device_type == "cpu" and not INTERPRETED:
        return (
            "Triton runs on CUDA tensors; on CPU only in its interpreter (TRITON_INTERPRET=1 before import)"
        )
    if call.device_type not in ("cuda", "cpu"):
        return f"Triton runs on CUDA tensors, got {call.device_type}"
    if call.dtype not in SUPPORTED_DTYPES:
        return f"dtype {call.dtype} is not one of {SUPPORTED_DTYPES}"
    if call.dtype == torch.bfloat16 and INTERPRETED:
        return "Triton's CPU interpreter computes bf16 arithmetic wrongly (bf16 needs a GPU)"
    if call.head_dim not in SUPPORTED_HEAD_DIMS:
        return f"head dim {call.head_dim} is not one of {SUPPORTED_HEAD_DIMS}"
    return None


def triton_forward(args: AttentionArgs) -> tuple[torch.Tensor, torch.Tensor]:
    """Backend forward: ``(out [B, H, Tq, D], lse [B, H, Tq] fp32)``; ``Tq == 1`` without dropout takes the
    decode kernels."""
    if args.q.shape[2] == 1 and not args.dropout:
        return prefix_decode(args)
    return prefix_attention_fwd(args)


def triton_backward(args: AttentionArgs, dout, out, lse, needs=(True,) * 5):
    """Backend backward: ``(dq, dk, dv, dbank_k, dbank_v)``, deterministic; launches only what ``needs`` asks."""
    return prefix_attention_bwd(args, dout, out, lse, needs=needs)


register_backend(
    Backend(
        name="triton",
        forward=triton_forward,
        backward=triton_backward,
        refuse=refuse,
        priority={"cuda": 100},
    )
)
