"""The attention and mask functions prefixrt registers in transformers' registries under the name "prefixrt".

transformers calls ``prefixrt_attention(module, q, k, v, mask, ...)`` from every attention module of a model
whose ``config._attn_implementation == "prefixrt"``. ``attach`` tags each attention module with its site
(``encoder`` / ``decoder`` / ``cross``), its layer and the binding (bank, backend); ``prefix_ids`` arrives in
``kwargs`` because transformers forwards the model's extra keyword arguments down to attention.

The mask function returns the 2-D key padding mask ``[B, Tk]`` (True = attend) or None: causality is implied by
the site, so no ``[B, 1, Tq, Tk]`` mask is ever built.
"""

from __future__ import annotations

import torch

from prefixrt import ops
from prefixrt.ops import BankLayer

__all__ = ["ATTN_IMPLEMENTATION", "prefixrt_attention", "prefixrt_mask", "register"]

ATTN_IMPLEMENTATION = "prefixrt"
CAUSAL_SITES = {"decoder": True, "encoder": False, "cross": False}


class MissingPrefixIds(ValueError):
    pass


def prefixrt_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Prefix attention for one HF attention module.

    Parameters
    ----------
    query : Tensor ``[B, H, Tq, D]``; key, value : Tensor ``[B, H, Tk, D]`` (the cache's real tokens only)
    attention_mask : BoolTensor ``[B, Tk]`` or None, from :func:`prefixrt_mask`
    kwargs : must hold ``prefix_ids`` LongTensor ``[B]`` (``-1`` = no prefix); may hold ``prefix_source`` (a
        ``PrefixSource`` with the bound bank's ids and lengths) to read this call's K/V from instead of the bank

    Returns
    -------
    (Tensor ``[B, Tq, H, D]``, None) -- transformers' attention-interface convention.
    """
    site_layer = getattr(module, "_prefixrt_site", None)
    binding = getattr(module, "_prefixrt_binding", None)
    if site_layer is None or binding is None:
        raise RuntimeError(
            f"{type(module).__name__} uses attn_implementation='prefixrt' but was not prepared by prefixrt.attach()"
        )
    site, layer = site_layer
    prefix_ids = kwargs.get("prefix_ids")
    if prefix_ids is None:
        raise MissingPrefixIds(
            "this model is attached to a prefix bank: pass prefix_ids=LongTensor[batch] (one bank id per row, -1 for "
            "no prefix) to forward() or generate()"
        )
    # A per-call source (``prefix_source=`` in the model's kwargs) overrides the bound one for this forward only;
    # PrefixTuner passes its K/V this way so a gradient-checkpointing replay reads the same tensors.
    bank = kwargs.get("prefix_source")
    if bank is None:
        bank = binding.bank
    bank_k, bank_v = bank.layer_kv(site, layer)
    layer_bank = BankLayer(bank_k, bank_v, bank.offsets(site))
    if bank_k.dtype != query.dtype:
        layer_bank = layer_bank.to(query.dtype)
    key_padding_mask = attention_mask
    if key_padding_mask is not None and key_padding_mask.dim() != 2:
        raise RuntimeError(
            f"prefixrt expects a 2-D key padding mask, got shape {tuple(key_padding_mask.shape)}"
        )
    out, _ = ops.prefix_attention(
        query,
        key,
        value,
        layer_bank,
        binding.plan(site, prefix_ids),
        key_padding_mask=key_padding_mask,
        causal=CAUSAL_SITES[site],
        scale=scaling,
        dropout_p=dropout,
        backend=binding.backend,
    )
    return out.transpose(1, 2), None


def prefixrt_mask(
    batch_size: int,
    kv_length: int | None = None,
    kv_offset: int = 0,
    attention_mask: torch.Tensor | None = None,
    **kwargs,
) -> torch.Tensor | None:
    """The key padding mask ``[B, kv_length]`` (bool, True = attend), or None when nothing is padded."""
    if attention_mask is None:
        return None
    mask = attention_mask.bool()
    if kv_length is not None:
        if (missing := kv_length + kv_offset - mask.shape[-1]) > 0:
            mask = torch.nn.functional.pad(mask, (0, missing), value=True)
        mask = mask[:, kv_offset : kv_offset + kv_length]
    return None if bool(mask.all()) else mask


def register() -> None:
    """Register the attention and mask functions under ``"prefixrt"`` (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, prefixrt_attention)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, prefixrt_mask)
