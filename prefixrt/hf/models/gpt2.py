"""GPT-2 forward for the engine: prefill and one-token decode over the Hugging Face modules' own weights.

The modules (``ln_1``, ``c_attn``, ``c_proj``, ``mlp``, ``ln_f``, ``lm_head``) are called as they are; only the
attention and the K/V cache are ours. Prefill is one ``prefix_attention`` call per layer (causal, the row's bank
prefix, its key padding); decode is the merge of prefix, prompt and generated parts
(:func:`prefixrt.engine.attention.decode_attention`). The arithmetic follows ``GPT2Model.forward`` step for step
(same operand order in every addition) so greedy and beam search reproduce HF ``generate()``'s tokens.
"""

from __future__ import annotations

import torch
from torch import nn

from prefixrt import ops

__all__ = ["GPT2Runner"]


class GPT2Runner:
    """Runs a ``GPT2LMHeadModel`` for the engine.

    The prompt's K/V go to ``batch.prompt_store()``; see :mod:`prefixrt.engine.batch` for the layouts.
    """

    model_type = "gpt2"
    decode_sites = ("decoder",)
    item_stores = ("ctx",)

    def __init__(self, model: nn.Module):
        if not hasattr(model, "transformer") or not hasattr(model, "lm_head"):
            raise TypeError(f"expected a GPT2LMHeadModel, got {type(model).__name__}")
        config = model.config
        if getattr(config, "add_cross_attention", False):
            raise ValueError("GPT-2 with cross-attention (add_cross_attention=True) is not supported")
        self.model = model
        self.blocks = model.transformer.h
        self.heads = config.n_head
        self.hidden = config.n_embd
        self.head_dim = self.hidden // self.heads
        self.layers = len(self.blocks)
        self.scales = [self._scale(block.attn, i, config) for i, block in enumerate(self.blocks)]
        self.max_positions = config.n_positions
        param = next(model.parameters())
        self.dtype, self.device = param.dtype, param.device

    @staticmethod
    def _scale(attn, layer: int, config) -> float:
        if hasattr(attn, "scaling"):
            return float(attn.scaling)
        scale = (config.n_embd // config.n_head) ** -0.5 if config.scale_attn_weights else 1.0
        return scale / (layer + 1) if config.scale_attn_by_inverse_layer_idx else scale

    def _qkv(self, block, x: torch.Tensor):
        """``x [..., T, C]`` -> q, k, v ``[..., H, T, D]`` (views of one fused projection, like HF)."""
        q, k, v = block.attn.c_attn(x).split(self.hidden, dim=-1)
        shape = (*x.shape[:-1], self.heads, self.head_dim)
        return (t.view(shape).transpose(-3, -2) for t in (q, k, v))

    def prefill(
        self,
        batch,
        input_ids: torch.Tensor,
        mask: torch.Tensor | None,
        positions: torch.Tensor,
        prefix_ids: list[int],
        view_key: int,
        widths: list[int],
    ) -> torch.Tensor:
        """Run prompts and store their K/V as new items of ``batch``.

        Parameters
        ----------
        input_ids : LongTensor ``[R, T]`` (left-padded)
        mask : BoolTensor ``[R, T]`` or None (no padding)
        positions : LongTensor ``[R, T]``, position ids with each row's prefix shift added
        prefix_ids : list of R bank ids (``-1`` = none)
        view_key : the bank view (``batch.add_view``) the prefixes are read from
        widths : rows to open per item (beams / samples)

        Returns
        -------
        logits : Tensor ``[R, V]`` for the last position.
        """
        items, length = input_ids.shape
        view = batch.views[view_key]
        ctx = batch.prompt_store()
        rows = ctx.append_rows([length] * items, valid=mask)
        plan = view.plan("decoder", prefix_ids)  # once for every layer
        transformer = self.model.transformer
        h = transformer.wte(input_ids) + transformer.wpe(positions)  # [R, T, C]
        for layer, block in enumerate(self.blocks):
            q, k, v = self._qkv(block, block.ln_1(h))  # [R, H, T, D]
            ctx.write_block(layer, rows, k, v)
            out, _ = ops.prefix_attention(
                q,
                k,
                v,
                view.layer("decoder", layer),
                plan,
                key_padding_mask=mask,
                causal=True,
                scale=self.scales[layer],
                backend=batch.backend,
            )
            h = block.attn.c_proj(out.transpose(1, 2).reshape(items, length, self.hidden)) + h
            h = block.mlp(block.ln_2(h)) + h
        last_pos = (positions[:, -1] + 1).tolist()
        batch.add_items(prefix_ids, view_key, widths, last_pos)
        return self.model.lm_head(transformer.ln_f(h[:, -1]))

    def decode(self, batch, tokens: torch.Tensor, positions: torch.Tensor, slot, full: bool = False):
        """One token per row: ``tokens [n]``, ``positions [n]``; ``slot`` from ``gen.grow()``.
        Returns logits ``[n, V]``."""
        gen = batch.stores["gen"]
        transformer = self.model.transformer
        n = tokens.shape[0]
        h = transformer.wte(tokens) + transformer.wpe(positions)  # [n, C]
        for layer, block in enumerate(self.blocks):
            q, k, v = self._qkv(block, block.ln_1(h)[:, None])  # [n, H, 1, D]
            gen.write_token(layer, slot, k[:, :, 0], v[:, :, 0])
            out = batch.self_attention(q[:, :, 0], layer, self.scales[layer], full)
            h = block.attn.c_proj(out.reshape(n, self.hidden)) + h
            h = block.mlp(block.ln_2(h)) + h
        return self.model.lm_head(transformer.ln_f(h))
