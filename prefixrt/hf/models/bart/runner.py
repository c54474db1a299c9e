"""BART forward for the engine: encoder once per sequence, cross-attention K/V once per sequence, then decode.

Over the Hugging Face modules' own weights (projections, layer norms, feed-forward, ``lm_head`` and
``final_logits_bias``); only attention and the cache are the engine's (:mod:`prefixrt.hf.models.base`). Sites:
the encoder's self-attention reads the ``encoder`` prefix; the decoder's self-attention the ``decoder`` prefix;
cross-attention the ``cross`` prefix. The decoder input is the decoder-start token; its positions arrive shifted
by the row's decoder-prefix length like ``prefixrt.attach`` does; encoder positions never are.
"""

from __future__ import annotations

import torch
from torch import nn

from prefixrt.hf.generation.config import UnsupportedGenerationArgument
from prefixrt.hf.models.bart.integration import max_positions
from prefixrt.hf.models.base import StepInputs
from prefixrt.hf.models.gemm import gemms_for, resolve_gemm

__all__ = ["BartRunner"]


class BartRunner:
    """Runs a ``BartForConditionalGeneration`` for the engine (a :class:`~prefixrt.hf.models.base.Runner`)."""

    has_encoder = True
    decode_sites = ("decoder", "cross")

    def __init__(self, model: nn.Module, gemm: str = "auto"):
        base = getattr(model, "model", None)
        if base is None or not hasattr(base, "encoder") or not hasattr(model, "lm_head"):
            raise TypeError(f"expected a BartForConditionalGeneration, got {type(model).__name__}")
        config = model.config
        self.model = model
        self.encoder, self.decoder = base.encoder, base.decoder
        self.heads = config.decoder_attention_heads
        self.hidden = config.d_model
        self.head_dim = self.hidden // self.heads
        self.enc_heads = config.encoder_attention_heads
        self.layers = len(self.decoder.layers)
        self.max_positions = max_positions(config)
        param = next(model.parameters())
        self.dtype, self.device = param.dtype, param.device
        self.gemm = gemms_for(model, self.linears(), resolve_gemm(gemm, self.device, self.dtype))

    def linears(self) -> list[nn.Module]:
        """Every weight GEMM the forward runs: each layer's projections and feed-forward, then the output layer."""
        found = [
            module
            for stack in (self.encoder, self.decoder)
            for layer in stack.layers
            for module in layer.modules()
            if isinstance(module, nn.Linear)
        ]
        return [*found, self.model.lm_head]

    def decoder_length(self, input_length: int) -> int:
        return 1

    def decoder_prompt(self, input_ids: torch.Tensor, config) -> torch.Tensor:
        """``[B, 1]``: the decoder-start token for every source of ``input_ids [B, Ts]``."""
        start = config._decoder_start_token_tensor
        if start.dim() > 0 and start.numel() > 1:
            raise UnsupportedGenerationArgument(
                "prefixrt.generate does not support per-row decoder_start_token_id"
            )
        return torch.full((input_ids.shape[0], 1), int(start), dtype=torch.long, device=input_ids.device)

    @staticmethod
    def _split(x: torch.Tensor, heads: int) -> torch.Tensor:
        """``[..., T, C]`` -> ``[..., H, T, D]``."""
        return x.view(*x.shape[:-1], heads, x.shape[-1] // heads).transpose(-3, -2)

    def _ffn(self, layer, h: torch.Tensor) -> torch.Tensor:
        residual = h
        h = self.gemm(layer.fc2, self.gemm(layer.fc1, h, layer.activation_fn))
        return layer.final_layer_norm(residual + h)

    def _encode(self, cache, input_ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Encoder output ``[R, Ts, C]`` for ``input_ids [R, Ts]`` (``mask [R, Ts]`` bool or None)."""
        items, length = input_ids.shape
        enc = self.encoder
        h = enc.embed_tokens(input_ids) + enc.embed_positions(input_ids)
        h = enc.layernorm_embedding(h)
        for i, layer in enumerate(enc.layers):
            attn = layer.self_attn
            q, k, v = (
                self._split(self.gemm(proj, h), self.enc_heads)
                for proj in (attn.q_proj, attn.k_proj, attn.v_proj)
            )
            out = cache.attention(q, k, v, "encoder", i, attn.scaling, mask=mask, causal=False)
            h = layer.self_attn_layer_norm(
                h + self.gemm(attn.out_proj, out.transpose(1, 2).reshape(items, length, -1))
            )
            h = self._ffn(layer, h)
            if h.dtype == torch.float16 and not torch.isfinite(h).all():
                clamp = torch.finfo(h.dtype).max - 1000
                h = torch.clamp(h, min=-clamp, max=clamp)
        return h

    def _positions(self, positions: torch.Tensor) -> torch.Tensor:
        table = self.decoder.embed_positions
        return nn.functional.embedding(positions + table.offset, table.weight)

    def prefill(self, step: StepInputs) -> torch.Tensor:
        """Encode ``step.source_ids [R, Ts]`` (``step.source_mask``), write the cross K/V, run the decoder
        tokens ``step.input_ids [R, T]`` (the start token); returns logits ``[R, V]`` of the last position."""
        cache, tokens = step.cache, step.input_ids
        items, length = tokens.shape
        mask = step.source_mask
        enc = self._encode(cache, step.source_ids, mask)
        dec = self.decoder
        h = dec.layernorm_embedding(dec.embed_tokens(tokens) + self._positions(step.positions))  # [R, T, C]
        for i, layer in enumerate(dec.layers):
            attn, cross = layer.self_attn, layer.encoder_attn
            q, k, v = (
                self._split(self.gemm(proj, h), self.heads)
                for proj in (attn.q_proj, attn.k_proj, attn.v_proj)
            )
            cache.write_prompt(i, k, v)
            out = cache.attention(q, k, v, "decoder", i, attn.scaling, mask=step.attention_mask, causal=True)
            h = layer.self_attn_layer_norm(
                h + self.gemm(attn.out_proj, out.transpose(1, 2).reshape(items, length, -1))
            )
            ks = self._split(self.gemm(cross.k_proj, enc), self.heads)
            vs = self._split(self.gemm(cross.v_proj, enc), self.heads)
            cache.write_source(i, ks, vs)
            q = self._split(self.gemm(cross.q_proj, h), self.heads)
            out = cache.attention(q, ks, vs, "cross", i, cross.scaling, mask=mask, causal=False)
            h = layer.encoder_attn_layer_norm(
                h + self.gemm(cross.out_proj, out.transpose(1, 2).reshape(items, length, -1))
            )
            h = self._ffn(layer, h)
        return self._logits(h[:, -1])

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        logits = self.gemm(self.model.lm_head, h)
        return logits + self.model.final_logits_bias.to(logits.device)

    def decode(self, step: StepInputs) -> torch.Tensor:
        """One token per row: ``step.input_ids [n]``, ``step.positions [n]``; returns logits ``[n, V]``."""
        cache, tokens = step.cache, step.input_ids
        dec = self.decoder
        n = tokens.shape[0]
        h = dec.layernorm_embedding(dec.embed_tokens(tokens) + self._positions(step.positions))  # [n, C]
        for i, layer in enumerate(dec.layers):
            attn, cross = layer.self_attn, layer.encoder_attn
            q, k, v = (
                self.gemm(proj, h).view(n, self.heads, self.head_dim)
                for proj in (attn.q_proj, attn.k_proj, attn.v_proj)
            )
            cache.write_token(i, k, v)
            out = cache.self_attention(q, i, attn.scaling)
            h = layer.self_attn_layer_norm(h + self.gemm(attn.out_proj, out.reshape(n, self.hidden)))
            q = self.gemm(cross.q_proj, h).view(n, self.heads, self.head_dim)
            out = cache.cross_attention(q, i, cross.scaling)
            h = layer.encoder_attn_layer_norm(h + self.gemm(cross.out_proj, out.reshape(n, self.hidden)))
            h = self._ffn(layer, h)
        return self._logits(h)
