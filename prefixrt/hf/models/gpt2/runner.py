"""GPT-2 forward for the engine: prefill and one-token decode over the Hugging Face modules' own weights.

The modules (``wte``, ``wpe``, ``ln_1``, ``c_attn``, ``c_proj``, ``mlp``, ``ln_2``, ``ln_f``, ``lm_head``) are
called as they are; only the attention and the K/V cache are the engine's (:mod:`prefixrt.hf.models.base`). The
decoder input is the prompt itself. The arithmetic follows ``GPT2Model.forward`` step for step (same operand
order in every addition) so greedy and beam search reproduce HF ``generate()``'s tokens.
"""

from __future__ import annotations

import torch
from torch import nn

from prefixrt.hf.models.base import StepInputs
from prefixrt.hf.models.gemm import gemms_for, resolve_gemm
from prefixrt.hf.models.gpt2.integration import max_positions

__all__ = ["GPT2Runner"]


class GPT2Runner:
    """Runs a ``GPT2LMHeadModel`` for the engine (a :class:`~prefixrt.hf.models.base.Runner`)."""

    has_encoder = False
    decode_sites = ("decoder",)

    def __init__(self, model: nn.Module, gemm: str = "auto"):
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
        self.max_positions = max_positions(config)
        param = next(model.parameters())
        self.dtype, self.device = param.dtype, param.device
        self.gemm = gemms_for(model, self.linears(), resolve_gemm(gemm, self.device, self.dtype))

    def linears(self) -> list[nn.Module]:
        """Every weight GEMM the forward runs (the blocks' four, then the output layer)."""
        convs = [(b.attn.c_attn, b.attn.c_proj, b.mlp.c_fc, b.mlp.c_proj) for b in self.blocks]
        return [conv for four in convs for conv in four] + [self.model.lm_head]

    @staticmethod
    def _scale(attn, layer: int, config) -> float:
        if hasattr(attn, "scaling"):
            return float(attn.scaling)
        scale = (config.n_embd // config.n_head) ** -0.5 if config.scale_attn_weights else 1.0
        return scale / (layer + 1) if config.scale_attn_by_inverse_layer_idx else scale

    def decoder_length(self, input_length: int) -> int:
        return input_length

    def decoder_prompt(self, input_ids: torch.Tensor, config) -> torch.Tensor:
        """The prompt is the decoder input: ``input_ids [B, T]`` as given."""
        return input_ids

    def _qkv(self, block, x: torch.Tensor):
        """``x [..., T, C]`` -> q, k, v ``[..., H, T, D]`` (views of one fused projection, like HF)."""
        q, k, v = self.gemm(block.attn.c_attn, x).split(self.hidden, dim=-1)
        shape = (*x.shape[:-1], self.heads, self.head_dim)
        return (t.view(shape).transpose(-3, -2) for t in (q, k, v))

    def prefill(self, step: StepInputs) -> torch.Tensor:
        """Prompts ``step.input_ids [R, T]`` (left-padded, ``step.attention_mask``); returns logits ``[R, V]``
        of the last position. One causal attention call per layer over ``[bank prefix ; prompt]``."""
        cache, input_ids, mask = step.cache, step.input_ids, step.attention_mask
        items, length = input_ids.shape
        transformer = self.model.transformer
        h = transformer.wte(input_ids) + transformer.wpe(step.positions)  # [R, T, C]
        for layer, block in enumerate(self.blocks):
            q, k, v = self._qkv(block, block.ln_1(h))  # [R, H, T, D]
            cache.write_prompt(layer, k, v)
            out = cache.attention(q, k, v, "decoder", layer, self.scales[layer], mask=mask, causal=True)
            h = self.gemm(block.attn.c_proj, out.transpose(1, 2).reshape(items, length, self.hidden)) + h
            h = self._mlp(block, h) + h
        return self.gemm(self.model.lm_head, transformer.ln_f(h[:, -1]))

    def _mlp(self, block, h: torch.Tensor) -> torch.Tensor:
        """``GPT2MLP`` (eval: its dropout is the identity) through the runner's GEMMs."""
        mlp = block.mlp
        return self.gemm(mlp.c_proj, self.gemm(mlp.c_fc, block.ln_2(h), mlp.act))

    def decode(self, step: StepInputs) -> torch.Tensor:
        """One token per row: ``step.input_ids [n]``, ``step.positions [n]``; returns logits ``[n, V]``."""
        cache, tokens = step.cache, step.input_ids
        transformer = self.model.transformer
        n = tokens.shape[0]
        h = transformer.wte(tokens) + transformer.wpe(step.positions)  # [n, C]
        for layer, block in enumerate(self.blocks):
            q, k, v = self._qkv(block, block.ln_1(h)[:, None])  # [n, H, 1, D]
            cache.write_token(layer, k[:, :, 0], v[:, :, 0])
            out = cache.self_attention(q[:, :, 0], layer, self.scales[layer])
            h = self.gemm(block.attn.c_proj, out.reshape(n, self.hidden)) + h
            h = self._mlp(block, h) + h
        return self.gemm(self.model.lm_head, transformer.ln_f(h))
