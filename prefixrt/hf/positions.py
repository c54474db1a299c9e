"""Position shifts: what every family's hooks share (each family installs its own, see ``ModelFamily``).

PEFT and the original code put the prefix in the KV cache, so real tokens get positions ``P .. P+T-1``. Our cache
holds only real tokens, so a family's forward hooks (``install_position_hooks`` in its folder under
:mod:`prefixrt.hf.models`) check ``prefix_ids`` once per forward and add each row's prefix length (the binding's
:meth:`~prefixrt.hf.attach.PrefixBinding.position_shift`) to the positions the model would have used. The hooks
read the forward's arguments with the helpers below.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

__all__ = ["batch_and_length", "bound_arguments", "cache_length", "checked_prefix_ids"]


def bound_arguments(module: nn.Module, args: tuple, kwargs: dict) -> dict:
    """All arguments of a forward call by name (positional ones included)."""
    try:
        bound = inspect.signature(module.forward).bind_partial(*args, **kwargs)
    except TypeError:
        return dict(kwargs)
    arguments = dict(bound.arguments)
    arguments.update(arguments.pop("kwargs", {}) or {})
    return arguments


def batch_and_length(arguments: dict, ids_key: str, embeds_key: str) -> tuple[int, int, torch.device]:
    """``(batch, length, device)`` of the call's ``ids_key`` tensor, else of its ``embeds_key`` tensor."""
    tensor = arguments.get(ids_key)
    if tensor is None:
        tensor = arguments.get(embeds_key)
    if tensor is None:
        raise ValueError(f"expected {ids_key} or {embeds_key}")
    return tensor.shape[0], tensor.shape[1], tensor.device


def cache_length(arguments: dict) -> int:
    """Tokens already in the call's KV cache (0 without one)."""
    cache = arguments.get("cache", arguments.get("past_key_values"))
    return cache.get_seq_length() if cache is not None and hasattr(cache, "get_seq_length") else 0


def checked_prefix_ids(arguments: dict, binding, batch: int) -> torch.Tensor:
    """The call's ``prefix_ids`` LongTensor ``[batch]``, validated against the binding's bank."""
    prefix_ids = arguments.get("prefix_ids")
    if prefix_ids is None:
        raise ValueError(
            "this model is attached to a prefix bank: pass prefix_ids=LongTensor[batch] (one bank id per row, -1 "
            "for no prefix) to forward() or generate()"
        )
    binding.plan_step(prefix_ids, batch)
    return prefix_ids
