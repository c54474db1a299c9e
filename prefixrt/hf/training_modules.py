"""Faster stand-ins for a frozen HF model's elementwise modules while it trains (``prefixrt train``).

A GPT-2-small training step on the CPU spends about a sixth of its time outside the GEMMs in two kinds of
module that run unchanged in every prefix-tuning step:

* ``nn.Dropout`` (residual, embedding and MLP dropout): torch's CPU dropout draws from one mt19937 stream;
  :class:`PhiloxDropout` draws the same distribution from the Philox stream of
  :mod:`prefixrt.ops.elementwise_dropout`, vectorized, the mask regenerated in the backward;
* GPT-2's ``NewGELUActivation`` (the tanh GELU written as eight elementwise torch ops, each one a pass over
  ``[B, T, 4d]`` forward and backward): :class:`TanhGELU` is the same function as one fused op,
  ``gelu(x, approximate="tanh")`` (equal within 2.4e-7).

:func:`fast_training_modules` swaps them in for the duration of a ``with`` block and puts the originals back.
Nothing is swapped on CUDA, where torch's dropout is already fused; BART's dropout is a functional call and its
GELU is already torch's fused one, so BART is left as it is.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from prefixrt.ops.elementwise_dropout import philox_dropout

__all__ = ["PhiloxDropout", "TanhGELU", "fast_training_modules"]


class PhiloxDropout(nn.Dropout):
    """``nn.Dropout`` drawing its mask from prefixrt's Philox stream on the CPU (torch's dropout elsewhere).

    A subclass, so ``.p`` and ``isinstance(m, nn.Dropout)`` (HF reads ``attn_dropout.p``) keep working."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return philox_dropout(x, self.p, self.training)


class TanhGELU(nn.Module):
    """``0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3)))`` as one fused op (GPT-2's ``gelu_new``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.gelu(x, approximate="tanh")


def _replacement(module: nn.Module) -> nn.Module | None:
    if type(module) is nn.Dropout and not module.inplace:
        return PhiloxDropout(module.p)
    if type(module).__name__ == "NewGELUActivation":  # transformers.activations, the tanh GELU
        return TanhGELU()
    return None


@contextmanager
def fast_training_modules(model: nn.Module) -> Iterator[int]:
    """Within the block, ``model``'s plain ``nn.Dropout`` and tanh-GELU modules are replaced by
    :class:`PhiloxDropout` and :class:`TanhGELU` (CPU models only); yields how many were replaced. The
    originals are restored on exit, also on an exception. Weights and outputs' distribution are unchanged."""
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    on_cpu = all(p.device.type == "cpu" for p in model.parameters())
    sites = [(p, n, c) for p in model.modules() for n, c in p.named_children()] if on_cpu else []
    for parent, name, child in sites:
        new = _replacement(child)
        if new is not None:
            new.train(child.training)
            swapped.append((parent, name, child))
            setattr(parent, name, new)
    try:
        yield len(swapped)
    finally:
        for parent, name, original in reversed(swapped):
            original.train(getattr(parent, name).training)
            setattr(parent, name, original)
