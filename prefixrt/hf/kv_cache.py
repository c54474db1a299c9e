"""Reading transformers' KV caches (``DynamicCache``, ``EncoderDecoderCache``) into plain tensors."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["output_cache", "stack_layers"]


def output_cache(outputs: Any) -> Any:
    """The KV cache of a model output (``cache`` in transformers >= 5.2x, ``past_key_values`` before)."""
    for key in ("cache", "past_key_values"):
        cache = outputs.get(key) if hasattr(outputs, "get") else getattr(outputs, key, None)
        if cache is not None:
            return cache
    raise RuntimeError("the model returned no KV cache although use_cache=True was passed")


def stack_layers(cache: Any) -> torch.Tensor:
    """``[layers, 2, heads, T, head_dim]`` from a ``DynamicCache`` of batch 1."""
    return torch.stack([torch.stack([layer.keys[0], layer.values[0]]) for layer in cache.layers])
