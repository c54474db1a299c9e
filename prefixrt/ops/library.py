"""``prefixrt::prefix_attention``: the one op every backend implements, registered with ``torch.library``.

Registering it as a custom op (with a fake implementation and an autograd formula) lets ``torch.compile``
treat prefix attention as a single opaque node, whatever backend runs inside. Its flat inputs are
:data:`prefixrt.ops.args.OP_FIELDS` plus the backend's name; :class:`~prefixrt.ops.args.AttentionArgs` packs and
unpacks them, so the argument list is written once.

The backward takes ``needs`` (which of ``dq, dk, dv, dbank_k, dbank_v`` autograd wants, from
``ctx.needs_input_grad``) and passes it to the backend, which may skip the work for the others (the Triton
backend skips the dQ launch, the bank launch, ...); a gradient that is not needed comes back as an empty tensor
``[0]`` (and as None to autograd). The Philox state of a dropout call is a CPU tensor input saved for the
backward, so the backward regenerates the forward's mask.
"""

from __future__ import annotations

import torch

from prefixrt.ops.args import OP_FIELDS, AttentionArgs
from prefixrt.ops.registry import get_backend

__all__ = ["prefix_attention_op", "prefix_attention_backward_op", "run_op"]

_INPUTS = ", ".join(f"{kind} {name}" for name, kind in OP_FIELDS) + ", str backend"
_FORWARD_SCHEMA = f"({_INPUTS}) -> (Tensor, Tensor)"
_BACKWARD_SCHEMA = f"(Tensor dout, {_INPUTS}, Tensor out, Tensor lse, bool[] needs) -> (Tensor, Tensor, Tensor, Tensor, Tensor)"
_N = len(OP_FIELDS)
ALL_GRADS = (True, True, True, True, True)


def _lse_dtype(q: torch.Tensor) -> torch.dtype:
    """The reference keeps fp64 for fp64 inputs (oracle tests); every other call returns an fp32 lse."""
    return torch.float64 if q.dtype == torch.float64 else torch.float32


@torch.library.custom_op("prefixrt::prefix_attention", mutates_args=(), schema=_FORWARD_SCHEMA)
def prefix_attention_op(*inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward of prefix attention; returns ``(out [B, H, Tq, D], lse [B, H, Tq])``."""
    args, backend = AttentionArgs.from_op_inputs(*inputs[:_N]), inputs[_N]
    out, lse = get_backend(backend).forward(args)
    return out.contiguous(), lse.to(_lse_dtype(args.q)).contiguous()


@prefix_attention_op.register_fake
def _(*inputs):
    q = inputs[0]
    batch, heads, tq, head_dim = q.shape
    return q.new_empty(batch, heads, tq, head_dim), q.new_empty(batch, heads, tq, dtype=_lse_dtype(q))


@torch.library.custom_op("prefixrt::prefix_attention_backward", mutates_args=(), schema=_BACKWARD_SCHEMA)
def prefix_attention_backward_op(*inputs) -> tuple[torch.Tensor, ...]:
    """Gradients ``(dq, dk, dv, dbank_k, dbank_v)``; the bank ones summed over rows that share an id; those
    ``needs`` leaves out are empty tensors ``[0]``."""
    dout, fields, backend = inputs[0], inputs[1 : _N + 1], inputs[_N + 1]
    out, lse, needs = inputs[_N + 2], inputs[_N + 3], tuple(bool(n) for n in inputs[_N + 4])
    grads = get_backend(backend).backward(AttentionArgs.from_op_inputs(*fields), dout, out, lse, needs)
    return tuple(
        g.contiguous() if need else like.new_empty(0)
        for g, like, need in zip(grads, inputs[1:6], needs, strict=True)
    )


@prefix_attention_backward_op.register_fake
def _(*inputs):
    needs = inputs[_N + 4]
    return tuple(
        torch.empty_like(t, memory_format=torch.contiguous_format) if need else t.new_empty(0)
        for t, need in zip(inputs[1:6], needs, strict=True)
    )


def _setup_context(ctx, inputs, output):
    out, lse = output
    ctx.slots = [i for i, x in enumerate(inputs) if isinstance(x, torch.Tensor)]
    ctx.save_for_backward(*(inputs[i] for i in ctx.slots), out, lse)
    ctx.inputs = [None if isinstance(x, torch.Tensor) else x for x in inputs]  # the non-tensor inputs
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, _dlse):
    *saved, out, lse = ctx.saved_tensors
    inputs = list(ctx.inputs)
    for slot, tensor in zip(ctx.slots, saved, strict=True):
        inputs[slot] = tensor
    needs = [bool(n) for n in ctx.needs_input_grad[:5]]  # q, k, v, bank_k, bank_v
    if not any(needs):
        return (None,) * len(inputs)
    grads = prefix_attention_backward_op(dout.contiguous(), *inputs, out, lse, needs)
    grads = [g if need else None for g, need in zip(grads, needs, strict=True)]
    return (*grads, *([None] * (len(inputs) - len(grads))))


prefix_attention_op.register_autograd(_backward, setup_context=_setup_context)


def run_op(args: AttentionArgs, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``args`` through the registered op with the named backend."""
    return prefix_attention_op(*args.op_inputs(), backend)
