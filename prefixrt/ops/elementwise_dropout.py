"""Elementwise dropout for training on the CPU: the model's own (residual, embedding, MLP) dropouts drawn from
the attention dropout's Philox stream, in C++, 8 lanes at a time on every core.

torch's CPU dropout draws every element from one mt19937 stream (``bernoulli_``: ~15 ns an element on one
core, ~20 ms for one ``[32, 64, 768]`` activation); a GPT-2-small training step calls it 25 times (0.53 s of
``bernoulli_`` in a profiled 8.3 s step on 2 cores). Philox words are independent of each other, so they vectorize and parallelize.

Definition
----------
A call with probability ``p`` takes a Philox state ``(seed, offset)`` from torch's generator
(:func:`prefixrt.ops.dropout.draw_philox_state`, so ``torch.manual_seed`` reproduces it). Element ``n`` of the
flattened input (row-major) draws ``word = randint(seed, offset + n)`` (:func:`prefixrt.ops.dropout.randint`:
Philox 4x32-10, Triton's ``tl.randint``) and is kept iff ``word >= floor(p * 2^32)``; kept elements are scaled
by ``1 / (1 - p)`` (fp32). The backward applies the same mask to the gradient, regenerated, never stored.

:func:`dropout_reference` is that definition in plain torch (the oracle); :func:`philox_dropout` runs the C++
kernel (``csrc/elementwise_dropout.cpp``) where it applies and torch's own dropout elsewhere (CUDA, whose fused
dropout is already Philox-based; a machine without the C++ kernels).
"""

from __future__ import annotations

import torch

from prefixrt.ops.dropout import (
    check_dropout_p,
    draw_philox_state,
    dropout_keep_threshold,
    dropout_scale,
    randint,
)

__all__ = ["philox_dropout", "dropout_reference", "philox_dropout_applies"]

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def dropout_reference(x: torch.Tensor, dropout_p: float, philox: torch.Tensor) -> torch.Tensor:
    """``x`` (any shape) with the mask of the definition above for the Philox state ``philox`` (CPU int64
    ``[2]``, bit patterns of ``(seed, offset)``) applied: same shape and dtype."""
    seed, offset = philox.tolist()  # int64 bit patterns: int64 addition wraps the counters mod 2^64
    counters = torch.arange(x.numel(), dtype=torch.long, device=x.device) + offset
    keep = randint(seed, counters) >= dropout_keep_threshold(dropout_p)
    scale = keep.to(torch.float32) * dropout_scale(dropout_p)
    return (x.float() * scale.view(x.shape)).to(x.dtype)


def _kernels():
    from prefixrt.ops.cpp.build import kernels_or_reason

    return kernels_or_reason()[0]


def philox_dropout_applies(x: torch.Tensor) -> bool:
    """Whether :func:`philox_dropout` runs the C++ kernel for ``x`` (a CPU float tensor, kernels built)."""
    return x.device.type == "cpu" and x.dtype in _DTYPES and _kernels() is not None


def _apply(x: torch.Tensor, dropout_p: float, philox: torch.Tensor) -> torch.Tensor:
    seed, offset = philox.tolist()
    threshold = dropout_keep_threshold(dropout_p)
    return _kernels().philox_dropout(x, seed, offset, threshold, dropout_scale(dropout_p))


class _PhiloxDropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, dropout_p: float, philox: torch.Tensor) -> torch.Tensor:
        ctx.dropout_p = dropout_p
        ctx.philox = philox
        return _apply(x, dropout_p, philox)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _apply(grad, ctx.dropout_p, ctx.philox), None, None


def philox_dropout(x: torch.Tensor, dropout_p: float, training: bool = True) -> torch.Tensor:
    """Dropout with probability ``dropout_p`` (``torch.nn.functional.dropout``'s contract: identity when not
    ``training`` or ``p == 0``). ``x``: any shape; returns a new tensor of its shape and dtype."""
    p = check_dropout_p(dropout_p)
    if not training or p == 0.0:
        return x
    if not philox_dropout_applies(x):
        return torch.nn.functional.dropout(x, p, True)
    philox = draw_philox_state(x.device, x.numel())
    return _PhiloxDropout.apply(x, p, philox)
