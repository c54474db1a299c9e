"""BART forward for the engine: encoder once per item, cross-attention K/V once per item, then decode.

Over the Hugging Face modules' own weights (projections, layer norms, feed-forward, ``lm_head`` and
``final_logits_bias``); only attention and the cache are ours. Sites: the encoder's self-attention reads the
``encoder`` prefix; the decoder's self-attention the ``decoder`` prefix; cross-attention the ``cross`` prefix.
Decoder positions are shifted by the row's decoder-prefix length like ``prefixrt.attach`` does; encoder positions
never are.

The decoder-start token's K/V go to ``batch.prompt_store()``, the source's cross-attention K/V (one per decoder
layer) to ``batch.stores["src"]``; see :mod:`prefixrt.engine.batch` for the layouts.
"""

from __future__ import annotations

import torch
from torch import nn

from prefixrt import ops

__all__ = ["BartRunner"]


class BartRunner:
    """Runs a ``BartForConditionalGeneration`` for the engine."""

    model_type = "bart"
    decode_sites = ("decoder", "cross")
    item_stores = ("ctx", "src")

    def __init__(self, model: nn.Module):
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
        self.max_positions = config.max_position_embeddings
        param = next(model.parameters())
        self.dtype, self.device = param.dtype, param.device

    @staticmethod
    def _split(x: torch.Tensor, heads: int) -> torch.Tensor:
        """``[..., T, C]`` -> ``[..., H, T, D]``."""
        return x.view(*x.shape[:-1], heads, x.shape[-1] // heads).transpose(-3, -2)

    def _ffn(self, layer, h: torch.Tensor) -> torch.Tensor:
        residual = h
        h = layer.fc2(layer.activation_fn(layer.fc1(h)))
        return layer.final_layer_norm(residual + h)

    def encode(self, batch, input_ids, mask, prefix_ids: list[int], view_key: int) -> torch.Tensor:
        """Encoder output ``[R, Ts, C]`` for ``input_ids [R, Ts]`` (``mask [R, Ts]`` bool or None)."""
        view = batch.views[view_key]
        plan = view.plan("encoder", prefix_ids)
        items, length = input_ids.shape
        enc = self.encoder
        h = enc.embed_tokens(input_ids) + enc.embed_positions(input_ids)
        h = enc.layernorm_embedding(h)
        for i, layer in enumerate(enc.layers):
            attn = layer.self_attn
            q, k, v = (
                self._split(proj(h), self.enc_heads) for proj in (attn.q_proj, attn.k_proj, attn.v_proj)
            )
            out, _ = ops.prefix_attention(
                q,
                k,
                v,
                view.layer("encoder", i),
                plan,
                key_padding_mask=mask,
                causal=False,
                scale=attn.scaling,
                backend=batch.backend,
            )
            h = layer.self_attn_layer_norm(h + attn.out_proj(out.transpose(1, 2).reshape(items, length, -1)))
            h = self._ffn(layer, h)
            if h.dtype == torch.float16 and not torch.isfinite(h).all():
                clamp = torch.finfo(h.dtype).max - 1000
                h = torch.clamp(h, min=-clamp, max=clamp)
        return h

    def _positions(self, positions: torch.Tensor) -> torch.Tensor:
        table = self.decoder.embed_positions
        return nn.functional.embedding(positions + table.offset, table.weight)

    def prefill(
        self,
        batch,
        input_ids: torch.Tensor,
        mask: torch.Tensor | None,
        start_token: int,
        shifts: list[int],
        prefix_ids: list[int],
        view_key: int,
        widths: list[int],
    ) -> torch.Tensor:
        """Encode sources, store cross K/V, run the decoder-start token; new items of ``batch``.

        Parameters
        ----------
        input_ids : LongTensor ``[R, Ts]``; mask : BoolTensor ``[R, Ts]`` or None
        start_token : the decoder-start token id
        shifts : decoder position shift per item (its decoder-prefix length, or 0)
        prefix_ids, view_key, widths : as in :meth:`GPT2Runner.prefill`

        Returns
        -------
        logits : Tensor ``[R, V]``
        """
        items, src_len = input_ids.shape
        view = batch.views[view_key]
        enc = self.encode(batch, input_ids, mask, prefix_ids, view_key)
        plans = {site: view.plan(site, prefix_ids) for site in ("decoder", "cross")}
        src, ctx = batch.stores["src"], batch.prompt_store()
        src_rows = src.append_rows([src_len] * items, valid=mask)
        ctx_rows = ctx.append_rows([1] * items)
        tokens = torch.full((items, 1), start_token, dtype=torch.long, device=self.device)
        positions = torch.tensor(shifts, dtype=torch.long, device=self.device)[:, None]
        dec = self.decoder
        h = dec.layernorm_embedding(dec.embed_tokens(tokens) + self._positions(positions))  # [R, 1, C]
        for i, layer in enumerate(dec.layers):
            attn, cross = layer.self_attn, layer.encoder_attn
            q, k, v = (self._split(proj(h), self.heads) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
            ctx.write_block(i, ctx_rows, k, v)
            out, _ = ops.prefix_attention(
                q,
                k,
                v,
                view.layer("decoder", i),
                plans["decoder"],
                causal=True,
                scale=attn.scaling,
                backend=batch.backend,
            )
            h = layer.self_attn_layer_norm(h + attn.out_proj(out.transpose(1, 2).reshape(items, 1, -1)))
            ks, vs = self._split(cross.k_proj(enc), self.heads), self._split(cross.v_proj(enc), self.heads)
            src.write_block(i, src_rows, ks, vs)
            q = self._split(cross.q_proj(h), self.heads)
            out, _ = ops.prefix_attention(
                q,
                ks,
                vs,
                view.layer("cross", i),
                plans["cross"],
                key_padding_mask=mask,
                causal=False,
                scale=cross.scaling,
                backend=batch.backend,
            )
            h = layer.encoder_attn_layer_norm(h + cross.out_proj(out.transpose(1, 2).reshape(items, 1, -1)))
            h = self._ffn(layer, h)
        batch.add_items(prefix_ids, view_key, widths, [s + 1 for s in shifts])
        return self._logits(h[:, -1])

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        logits = self.model.lm_head(h)
        return logits + self.model.final_logits_bias.to(logits.device)

    def decode(self, batch, tokens: torch.Tensor, positions: torch.Tensor, slot, full: bool = False):
        """One token per row: ``tokens [n]``, ``positions [n]``; returns logits ``[n, V]``."""
        gen = batch.stores["gen"]
        dec = self.decoder
        n = tokens.shape[0]
        h = dec.layernorm_embedding(dec.embed_tokens(tokens) + self._positions(positions))  # [n, C]
        for i, layer in enumerate(dec.layers):
            attn, cross = layer.self_attn, layer.encoder_attn
            q, k, v = (
                proj(h).view(n, self.heads, self.head_dim) for proj in (attn.q_proj, attn.k_proj, attn.v_proj)
            )
            gen.write_token(i, slot, k, v)
            out = batch.self_attention(q, i, attn.scaling, full)
            h = layer.self_attn_layer_norm(h + attn.out_proj(out.reshape(n, self.hidden)))
            q = cross.q_proj(h).view(n, self.heads, self.head_dim)
            out = batch.cross_attention(q, i, cross.scaling, full)
            h = layer.encoder_attn_layer_norm(h + cross.out_proj(out.reshape(n, self.hidden)))
            h = self._ffn(layer, h)
        return self._logits(h)
