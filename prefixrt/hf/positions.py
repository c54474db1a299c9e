"""Forward hooks that check ``prefix_ids`` once per forward and move each row's positions past its prefix.

PEFT and the original code put the prefix in the KV cache, so real tokens get positions ``P .. P+T-1``. Our cache
holds only real tokens, so we add each row's prefix length to the positions the model would have used:

* GPT-2: a pre-hook on ``GPT2Model`` rewrites its ``position_ids`` argument (``[B, T]``) -- whatever the model
  would have computed (``arange + cache length``) or was given (generation's padding-aware ids), plus ``P_b``.
* BART: the decoder computes its positions internally and takes no per-row ids, so a pre-hook on the decoder
  records the per-row shift for the duration of that forward and a hook on ``decoder.embed_positions`` looks
  the shifted positions up. Encoder positions are never shifted.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

__all__ = ["install"]


def install(model: nn.Module, binding) -> list:
    """Register the hooks for ``model`` (GPT-2 or BART); returns their handles (``detach`` removes them)."""
    if model.config.model_type == "gpt2":
        return _install_gpt2(model, binding)
    return _install_bart(model, binding)


def _bound_arguments(module: nn.Module, args: tuple, kwargs: dict) -> dict:
    """All arguments of a forward call by name (positional ones included)."""
    try:
        bound = inspect.signature(module.forward).bind_partial(*args, **kwargs)
    except TypeError:
        return dict(kwargs)
    arguments = dict(bound.arguments)
    arguments.update(arguments.pop("kwargs", {}) or {})
    return arguments


def _batch_and_length(arguments: dict, ids_key: str, embeds_key: str) -> tuple[int, int, torch.device]:
    tensor = arguments.get(ids_key)
    if tensor is None:
        tensor = arguments.get(embeds_key)
    if tensor is None:
        raise ValueError(f"expected {ids_key} or {embeds_key}")
    return tensor.shape[0], tensor.shape[1], tensor.device


def _cache_length(arguments: dict) -> int:
    cache = arguments.get("cache", arguments.get("past_key_values"))
    return cache.get_seq_length() if cache is not None and hasattr(cache, "get_seq_length") else 0


def _prefix_ids(arguments: dict, binding, batch: int) -> torch.Tensor:
    prefix_ids = arguments.get("prefix_ids")
    if prefix_ids is None:
        raise ValueError(
            "this model is attached to a prefix bank: pass prefix_ids=LongTensor[batch] (one bank id per row, -1 "
            "for no prefix) to forward() or generate()"
        )
    binding.plan_step(prefix_ids, batch)
    return prefix_ids


def _install_gpt2(model: nn.Module, binding) -> list:
    base = next(m for m in model.modules() if hasattr(m, "wpe") and hasattr(m, "h"))
    positional_names = list(inspect.signature(base.forward).parameters)

    def shift_positions(module, args, kwargs):
        arguments = _bound_arguments(module, args, kwargs)
        batch, length, device = _batch_and_length(arguments, "input_ids", "inputs_embeds")
        prefix_ids = _prefix_ids(arguments, binding, batch)
        position_ids = arguments.get("position_ids")
        if position_ids is None:
            position_ids = torch.arange(length, device=device)[None, :] + _cache_length(arguments)
        shift = binding.position_shift(prefix_ids, "decoder", device)
        kwargs = {**kwargs, "position_ids": position_ids + shift[:, None]}
        index = positional_names.index("position_ids")
        if len(args) > index:  # given positionally: replace it there instead
            args = (*args[:index], kwargs.pop("position_ids"), *args[index + 1 :])
        return args, kwargs

    return [base.register_forward_pre_hook(shift_positions, with_kwargs=True)]


def _install_bart(model: nn.Module, binding) -> list:
    base = getattr(model, "model", model)
    encoder, decoder = base.encoder, base.decoder
    state = {"shift": None}

    def check_encoder_ids(module, args, kwargs):
        arguments = _bound_arguments(module, args, kwargs)
        batch, _, _ = _batch_and_length(arguments, "input_ids", "inputs_embeds")
        _prefix_ids(arguments, binding, batch)

    def record_decoder_shift(module, args, kwargs):
        arguments = _bound_arguments(module, args, kwargs)
        batch, _, device = _batch_and_length(arguments, "input_ids", "inputs_embeds")
        prefix_ids = _prefix_ids(arguments, binding, batch)
        state["shift"] = binding.position_shift(prefix_ids, "decoder", device)

    def forget_decoder_shift(module, args, kwargs, output):
        state["shift"] = None

    def shifted_positions(module, args, kwargs, output):
        shift = state["shift"]
        if shift is None or not bool(shift.any()):
            return output
        arguments = _bound_arguments(module, args, kwargs)
        position_ids = arguments.get("position_ids")
        if position_ids is None:
            length = arguments["input_ids"].shape[1]
            past = arguments.get("cache_length", arguments.get("past_key_values_length", 0)) or 0
            position_ids = torch.arange(length, device=shift.device) + past
        position_ids = position_ids.reshape(-1, position_ids.shape[-1])  # [1 or B, T]
        return nn.functional.embedding(position_ids + shift[:, None] + module.offset, module.weight)

    return [
        encoder.register_forward_pre_hook(check_encoder_ids, with_kwargs=True),
        decoder.register_forward_pre_hook(record_decoder_shift, with_kwargs=True),
        decoder.register_forward_hook(forget_decoder_shift, with_kwargs=True, always_call=True),
        decoder.embed_positions.register_forward_hook(shifted_positions, with_kwargs=True),
    ]
