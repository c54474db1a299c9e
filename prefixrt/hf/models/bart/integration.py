"""What ``attach`` and ``text_prefix`` need to know about BART.

* Attention sites: each encoder layer's ``self_attn`` (``encoder``), each decoder layer's ``self_attn``
  (``decoder``) and ``encoder_attn`` (``cross``).
* Checks and plans: the encoder's and the decoder's pre-hooks check ``prefix_ids`` (and the decoder's cache) and
  plan their sites' attention for the forward.
* Positions: only the decoder is shifted (by the row's decoder-prefix length). The decoder computes its positions
  internally and takes no per-row ids, so a pre-hook on the decoder records the per-row shift for the duration of
  that forward and a hook on ``decoder.embed_positions`` looks the shifted positions up. Encoder positions are
  never shifted (the encoder's pre-hook only checks ``prefix_ids``).
* Text prefixes: one forward with the text as both the encoder input and the decoder input, positions from 0;
  the encoder's K/V captured from ``k_proj`` / ``v_proj``, the decoder's and the cross-attention's read from
  the ``EncoderDecoderCache``.
"""

from __future__ import annotations

import torch
from torch import nn

from prefixrt.hf.kv_cache import output_cache, stack_layers
from prefixrt.hf.positions import ForwardArguments, batch_and_length, planned_kwargs

__all__ = ["attention_sites", "install_position_hooks", "max_positions", "text_prefix_kv"]


def max_positions(config) -> int:
    return config.max_position_embeddings


def attention_sites(model: nn.Module) -> list[tuple[nn.Module, str, int]]:
    """Every attention module of a ``BartForConditionalGeneration`` / ``BartModel`` with its site and layer."""
    base = getattr(model, "model", model)
    sites = [(layer.self_attn, "encoder", i) for i, layer in enumerate(base.encoder.layers)]
    for i, layer in enumerate(base.decoder.layers):
        sites.append((layer.self_attn, "decoder", i))
        sites.append((layer.encoder_attn, "cross", i))
    return sites


def install_position_hooks(model: nn.Module, binding) -> list:
    """The encoder check, the decoder shift and the position-table lookup (see the module docstring)."""
    base = getattr(model, "model", model)
    encoder, decoder = base.encoder, base.decoder
    read_encoder, read_decoder = ForwardArguments(encoder.forward), ForwardArguments(decoder.forward)
    read_positions = ForwardArguments(decoder.embed_positions.forward)  # the signatures, once
    state = {"shift": None}

    def check_encoder_ids(module, args, kwargs):
        arguments = read_encoder(args, kwargs)
        batch, _, _ = batch_and_length(arguments, "input_ids", "inputs_embeds")
        _, kwargs = planned_kwargs(arguments, kwargs, binding, batch, sites=["encoder"])
        return args, kwargs

    def record_decoder_shift(module, args, kwargs):
        arguments = read_decoder(args, kwargs)
        batch, _, device = batch_and_length(arguments, "input_ids", "inputs_embeds")
        prefix_ids, kwargs = planned_kwargs(arguments, kwargs, binding, batch, sites=["decoder", "cross"])
        state["shift"] = binding.position_shift(prefix_ids, "decoder", device)
        return args, kwargs

    def forget_decoder_shift(module, args, kwargs, output):
        state["shift"] = None

    def shifted_positions(module, args, kwargs, output):
        shift = state["shift"]
        if shift is None:
            return output
        arguments = read_positions(args, kwargs)
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


def text_prefix_kv(model: nn.Module, ids: torch.Tensor, extra: dict) -> dict[str, torch.Tensor]:
    """``{"encoder", "decoder", "cross"}`` -> ``[layers, 2, H, T, D]`` for ``ids [1, T]``."""
    base = getattr(model, "model", model)
    captured: dict[tuple[int, str], torch.Tensor] = {}

    def capture(layer: int, kind: str, attention: nn.Module):
        def hook(module, args, output):
            # [1, T, H*D] -> [H, T, D], as BartAttention reshapes it
            captured[(layer, kind)] = output.view(1, -1, attention.num_heads, attention.head_dim)[
                0
            ].transpose(0, 1)

        return hook

    handles = []
    for i, layer in enumerate(base.encoder.layers):
        attention = layer.self_attn
        handles.append(attention.k_proj.register_forward_hook(capture(i, "k", attention)))
        handles.append(attention.v_proj.register_forward_hook(capture(i, "v", attention)))
    try:
        outputs = model(
            input_ids=ids, attention_mask=torch.ones_like(ids), decoder_input_ids=ids, use_cache=True, **extra
        )
    finally:
        for handle in handles:
            handle.remove()
    encoder = torch.stack(
        [torch.stack([captured[(i, "k")], captured[(i, "v")]]) for i in range(len(base.encoder.layers))]
    )
    cache = output_cache(outputs)  # EncoderDecoderCache
    return {
        "encoder": encoder.contiguous(),
        "decoder": stack_layers(cache.self_attention_cache).contiguous(),
        "cross": stack_layers(cache.cross_attention_cache).contiguous(),
    }
