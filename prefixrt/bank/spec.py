"""Model architecture as a prefix bank sees it: which attention sites exist and their shapes.

Learned from a model's config (GPT-2 or BART), never from transformers' module internals, so the bank and the
op layer can be used without transformers (a serving stack can embed them alone).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["SiteSpec", "ModelSpec", "SITES_BY_MODEL"]

# GPT-2 has one site (decoder self-attention); BART has three.
SITES_BY_MODEL = {"gpt2": ("decoder",), "bart": ("encoder", "decoder", "cross")}


@dataclass(frozen=True)
class SiteSpec:
    """Shape of one attention site: its entries are ``[num_layers, 2, num_heads, P, head_dim]`` (K then V)."""

    num_layers: int
    num_heads: int
    head_dim: int


@dataclass(frozen=True)
class ModelSpec:
    """The architecture a bank is built for: model type and the shape of each attention site."""

    model_type: str
    sites: dict[str, SiteSpec]

    @staticmethod
    def from_config(config: Any) -> ModelSpec:
        """Read the sites from a ``GPT2Config`` or ``BartConfig`` (or anything with the same fields)."""
        model_type = getattr(config, "model_type", None)
        if model_type == "gpt2":
            heads = config.n_head
            site = SiteSpec(config.n_layer, heads, config.n_embd // heads)
            return ModelSpec("gpt2", {"decoder": site})
        if model_type == "bart":
            enc_heads, dec_heads = config.encoder_attention_heads, config.decoder_attention_heads
            encoder = SiteSpec(config.encoder_layers, enc_heads, config.d_model // enc_heads)
            decoder = SiteSpec(config.decoder_layers, dec_heads, config.d_model // dec_heads)
            return ModelSpec("bart", {"encoder": encoder, "decoder": decoder, "cross": decoder})
        raise ValueError(
            f"prefixrt supports GPT-2 and BART; got a config with model_type={model_type!r}. "
            f"Supported model types: {sorted(SITES_BY_MODEL)}"
        )

    def to_json(self) -> str:
        return json.dumps(
            {"model_type": self.model_type, "sites": {k: asdict(v) for k, v in self.sites.items()}}
        )

    @staticmethod
    def from_json(text: str) -> ModelSpec:
        data = json.loads(text)
        return ModelSpec(data["model_type"], {k: SiteSpec(**v) for k, v in data["sites"].items()})

    def describe(self) -> str:
        parts = [
            f"{name}: {s.num_layers} layers x {s.num_heads} heads x {s.head_dim} dims"
            for name, s in self.sites.items()
        ]
        return f"{self.model_type} ({'; '.join(parts)})"
