"""transformers' KV caches: which ones an attached model runs, and reading them into plain tensors.

An attached model's attention reads the prefix from the bank and the real tokens from the cache, so a cache
works when its layers hand attention the keys it stored, exactly: ``DynamicLayer`` (``DynamicCache``,
``cache_implementation`` None or ``"dynamic"``) and ``StaticLayer`` (``StaticCache``: ``"static"`` and the
deprecated ``"sliding_window"``, ``"hybrid"``, ``"hybrid_chunked"``, which build the same static layers for GPT-2
and BART), and an ``EncoderDecoderCache`` of them (BART). :func:`check_cache` refuses every other cache at the
model's first forward, naming it. (``cache_implementation="paged"``, continuous batching, is refused by
:mod:`prefixrt.hf.generation.prepare` before any cache is made.)
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import DynamicLayer, EncoderDecoderCache, QuantizedCache, StaticLayer

__all__ = ["UnsupportedCache", "check_cache", "output_cache", "stack_layers"]


class UnsupportedCache(ValueError):
    """A KV cache an attached model does not run (the message names it and says why)."""


def check_cache(cache: Any) -> None:
    """Raise :class:`UnsupportedCache` unless ``cache`` is None or holds only dynamic or static layers, without
    offloading (an ``EncoderDecoderCache``: both of its caches)."""
    if cache is None:
        return
    if isinstance(cache, EncoderDecoderCache):
        check_cache(cache.self_attention_cache)
        check_cache(cache.cross_attention_cache)
        return
    name = type(cache).__name__
    if isinstance(cache, QuantizedCache):
        raise UnsupportedCache(
            f"prefixrt does not run a {name} (cache_implementation='quantized'): its keys and values are "
            "quantized, so the logits would not be the dynamic cache's; use cache_implementation='dynamic' or "
            "'static'"
        )
    if getattr(cache, "offloading", False):
        if _has(cache, StaticLayer):
            which = "'offloaded_static', 'offloaded_hybrid' or 'offloaded_hybrid_chunked'"
        else:
            which = "'offloaded'"
        raise UnsupportedCache(
            f"prefixrt does not run an offloading {name} (cache_implementation={which}): not verified with "
            "prefix attention (offloading needs CUDA); use cache_implementation='dynamic' or 'static'"
        )
    layers = list(getattr(cache, "layers", None) or [])
    replicated = getattr(cache, "layer_class_to_replicate", None)
    kinds = {type(layer) for layer in layers} | ({replicated} if replicated is not None else set())
    other = sorted(k.__name__ for k in kinds if k not in (DynamicLayer, StaticLayer))
    if other or not hasattr(cache, "layers"):
        raise UnsupportedCache(
            f"prefixrt does not run a {name} with {other or 'no'} layers: an attached model runs DynamicCache, "
            "StaticCache and EncoderDecoderCache of them (cache_implementation None, 'dynamic' or 'static')"
        )


def _has(cache: Any, kind: type) -> bool:
    return any(isinstance(layer, kind) for layer in getattr(cache, "layers", []) or [])


def cache_keyword(model: Any) -> str:
    """The keyword that hands ``model.forward`` / ``generate`` a KV cache: ``cache`` in transformers >= 5.2x
    (``past_key_values`` is deprecated there), ``past_key_values`` before."""
    import inspect

    return "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"


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
