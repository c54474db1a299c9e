"""What ``attach`` and ``text_prefix`` need to know about GPT-2.

* Attention sites: every block's ``attn`` is the ``decoder`` site of its layer.
* Positions: a pre-hook on ``GPT2Model`` checks ``prefix_ids`` and the cache, plans the forward's attention, and
  rewrites its ``position_ids`` argument (``[B, T]``) -- whatever the model would have computed (``arange + cache
  length``) or was given (generation's padding-aware ids), plus ``P_b``.
* Refused at ``attach``: ``add_cross_attention=True`` (the cross-attention layers have no prefix site).
* Text prefixes: the self-attention K/V of one forward from position 0, read from the model's KV cache.
"""

from __future__ import annotations

import torch
from torch import nn

from prefixrt.hf.kv_cache import output_cache, stack_layers
from prefixrt.hf.positions import ForwardArguments, batch_and_length, cache_length, planned_kwargs

__all__ = ["attention_sites", "check_model", "install_position_hooks", "max_positions", "text_prefix_kv"]


def max_positions(config) -> int:
    return config.n_positions


def _blocks(model: nn.Module) -> nn.ModuleList:
    for module in model.modules():
        if isinstance(getattr(module, "h", None), nn.ModuleList):
            return module.h
    raise ValueError(f"could not find the transformer blocks ('h') in {type(model).__name__}")


def check_model(model: nn.Module) -> None:
    """Refuse a GPT-2 that ``attach`` cannot serve: one with cross-attention layers."""
    if getattr(model.config, "add_cross_attention", False):
        raise ValueError(
            "prefixrt does not support GPT-2 with add_cross_attention=True: its cross-attention layers have no "
            "prefix site in the bank (only the self-attention 'decoder' site has)"
        )


def attention_sites(model: nn.Module) -> list[tuple[nn.Module, str, int]]:
    """``(block.attn, "decoder", layer)`` for every block of a ``GPT2LMHeadModel`` / ``GPT2Model``."""
    return [(block.attn, "decoder", i) for i, block in enumerate(_blocks(model))]


def install_position_hooks(model: nn.Module, binding) -> list:
    """The ``GPT2Model`` pre-hook (see the module docstring); returns its handle."""
    base = next(m for m in model.modules() if hasattr(m, "wpe") and hasattr(m, "h"))
    read = ForwardArguments(base.forward)  # the signature, once
    index = read.index("position_ids")

    def shift_positions(module, args, kwargs):
        arguments = read(args, kwargs)
        batch, length, device = batch_and_length(arguments, "input_ids", "inputs_embeds")
        prefix_ids, kwargs = planned_kwargs(arguments, kwargs, binding, batch)
        position_ids = arguments.get("position_ids")
        if position_ids is None:
            position_ids = torch.arange(length, device=device)[None, :] + cache_length(arguments)
        shift = binding.position_shift(prefix_ids, "decoder", device)
        kwargs = {**kwargs, "position_ids": position_ids + shift[:, None]}
        if len(args) > index:  # given positionally: replace it there instead
            args = (*args[:index], kwargs.pop("position_ids"), *args[index + 1 :])
        return args, kwargs

    return [base.register_forward_pre_hook(shift_positions, with_kwargs=True)]


def text_prefix_kv(model: nn.Module, ids: torch.Tensor, extra: dict) -> dict[str, torch.Tensor]:
    """``{"decoder": [layers, 2, H, T, D]}`` for ``ids [1, T]``."""
    outputs = model(input_ids=ids, use_cache=True, **extra)
    return {"decoder": stack_layers(output_cache(outputs)).contiguous()}
