"""Position shifts and the per-forward check: what every family's hooks share (each family installs its own, see
``ModelFamily``).

PEFT and the original code put the prefix in the KV cache, so real tokens get positions ``P .. P+T-1``. Our cache
holds only real tokens, so a family's forward hooks (``install_position_hooks`` in its folder under
:mod:`prefixrt.hf.models`) check ``prefix_ids`` and the cache once per forward, plan the forward's attention
(:meth:`~prefixrt.hf.attach.PrefixBinding.plan_step`, passed down under
:data:`~prefixrt.hf.attention.PLANS_KWARG`) and add each row's prefix length (the binding's
:meth:`~prefixrt.hf.attach.PrefixBinding.position_shift`) to the positions the model would have used. The hooks
read the forward's arguments with the helpers below; a forward's signature is read once, when the hook is
installed.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch

from prefixrt.hf.attention import PLANS_KWARG
from prefixrt.hf.kv_cache import check_cache

__all__ = ["ForwardArguments", "batch_and_length", "cache_length", "checked_prefix_ids", "planned_kwargs"]


class ForwardArguments:
    """All arguments of a forward call by name (positional ones included), from a signature read once.

    >>> read = ForwardArguments(lambda input_ids, attention_mask=None, **kwargs: None)
    >>> read((1,), {"attention_mask": 2, "prefix_ids": 3})
    {'input_ids': 1, 'attention_mask': 2, 'prefix_ids': 3}
    """

    def __init__(self, forward: Callable):
        positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        parameters = inspect.signature(forward).parameters
        self.names = [name for name, p in parameters.items() if p.kind in positional]

    def __call__(self, args: tuple, kwargs: dict) -> dict:
        arguments = dict(zip(self.names, args, strict=False))
        arguments.update(kwargs)
        return arguments

    def index(self, name: str) -> int:
        """Position of parameter ``name`` (to replace an argument given positionally)."""
        return self.names.index(name)


def batch_and_length(arguments: dict, ids_key: str, embeds_key: str) -> tuple[int, int, torch.device]:
    """``(batch, length, device)`` of the call's ``ids_key`` tensor, else of its ``embeds_key`` tensor."""
    tensor = arguments.get(ids_key)
    if tensor is None:
        tensor = arguments.get(embeds_key)
    if tensor is None:
        raise ValueError(f"expected {ids_key} or {embeds_key}")
    return tensor.shape[0], tensor.shape[1], tensor.device


def cache_length(arguments: dict) -> int | torch.Tensor:
    """Tokens already in the call's KV cache (0 without one; a 0-d tensor for a static cache)."""
    cache = _cache_of(arguments)
    return cache.get_seq_length() if cache is not None and hasattr(cache, "get_seq_length") else 0


def _cache_of(arguments: dict):
    cache = arguments.get("cache")
    return cache if cache is not None else arguments.get("past_key_values")


def checked_prefix_ids(arguments: dict) -> torch.Tensor:
    """The call's ``prefix_ids`` (``ValueError`` when missing)."""
    prefix_ids = arguments.get("prefix_ids")
    if prefix_ids is None:
        raise ValueError(
            "this model is attached to a prefix bank: pass prefix_ids=LongTensor[batch] (one bank id per row, -1 "
            "for no prefix) to forward() or generate()"
        )
    return prefix_ids


def planned_kwargs(
    arguments: dict, kwargs: dict, binding, batch: int, sites=None
) -> tuple[torch.Tensor, dict]:
    """Check the call (its ``prefix_ids`` against the bank and the batch, its KV cache) and plan ``sites`` for
    this forward; returns ``(prefix_ids, kwargs with the plans under PLANS_KWARG)``."""
    prefix_ids = checked_prefix_ids(arguments)
    check_cache(_cache_of(arguments))
    plans = binding.plan_step(prefix_ids, batch, sites)
    return prefix_ids, {**kwargs, PLANS_KWARG: plans}
