"""``prefixrt::prefix_attention``: the one op every backend implements, registered with ``torch.library``.

Registering it as a custom op (with a fake implementation and an autograd formula) lets ``torch.compile``
treat prefix attention as a single opaque node, whatever backend runs inside. The backend is a string
argument, resolved by :mod:`prefixrt.ops.registry`.
"""

from __future__ import annotations

import torch

from prefixrt.ops.registry import get_backend


@torch.library.custom_op("prefixrt::prefix_attention", mutates_args=())
def prefix_attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bank_k: torch.Tensor,
    bank_v: torch.Tensor,
    prefix_ids: torch.Tensor,
    bank_offsets: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    causal: bool,
    scale: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward of prefix attention; returns ``(out [B, H, Tq, D], lse [B, H, Tq] fp32)``."""
    out, lse = get_backend(backend).forward(
        q, k, v, bank_k, bank_v, prefix_ids, bank_offsets, key_padding_mask, causal, scale
    )
    return out.contiguous(), lse.contiguous()


@prefix_attention_op.register_fake
def _(q, k, v, bank_k, bank_v, prefix_ids, bank_offsets, key_padding_mask, causal, scale, backend):
    batch, heads, tq, head_dim = q.shape
    return q.new_empty(batch, heads, tq, head_dim), q.new_empty(batch, heads, tq, dtype=torch.float32)


@torch.library.custom_op("prefixrt::prefix_attention_backward", mutates_args=())
def prefix_attention_backward_op(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bank_k: torch.Tensor,
    bank_v: torch.Tensor,
    prefix_ids: torch.Tensor,
    bank_offsets: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    causal: bool,
    scale: float,
    out: torch.Tensor,
    lse: torch.Tensor,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients ``(dq, dk, dv, dbank_k, dbank_v)``; the bank ones summed over rows that share an id."""
    grads = get_backend(backend).backward(
        dout, q, k, v, bank_k, bank_v, prefix_ids, bank_offsets, key_padding_mask, causal, scale, out, lse
    )
    return tuple(g.contiguous() for g in grads)


@prefix_attention_backward_op.register_fake
def _(
    dout,
    q,
    k,
    v,
    bank_k,
    bank_v,
    prefix_ids,
    bank_offsets,
    key_padding_mask,
    causal,
    scale,
    out,
    lse,
    backend,
):
    return tuple(
        torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v, bank_k, bank_v)
    )


def _setup_context(ctx, inputs, output):
    q, k, v, bank_k, bank_v, prefix_ids, bank_offsets, key_padding_mask, causal, scale, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, bank_k, bank_v, prefix_ids, bank_offsets, key_padding_mask, out, lse)
    ctx.causal, ctx.scale, ctx.backend = causal, scale, backend
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, _dlse):
    q, k, v, bank_k, bank_v, prefix_ids, bank_offsets, key_padding_mask, out, lse = ctx.saved_tensors
    dq, dk, dv, dbank_k, dbank_v = prefix_attention_backward_op(
        dout.contiguous(),
        q,
        k,
        v,
        bank_k,
        bank_v,
        prefix_ids,
        bank_offsets,
        key_padding_mask,
        ctx.causal,
        ctx.scale,
        out,
        lse,
        ctx.backend,
    )
    return dq, dk, dv, dbank_k, dbank_v, None, None, None, None, None, None


prefix_attention_op.register_autograd(_backward, setup_context=_setup_context)
