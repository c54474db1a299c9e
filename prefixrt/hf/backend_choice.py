"""Which prefix-attention backend an attached model's calls run, said before they run (for logs and reports)."""

from __future__ import annotations

import torch
from torch import nn

from prefixrt.hf.attach import binding_of
from prefixrt.ops import AttentionCall, select_backend

__all__ = ["training_backend"]


def training_backend(model: nn.Module) -> str:
    """The backend a training step of the attached ``model`` runs: its dtype and device, the attention dropout
    its config sets (HF passes it while the model is in train mode), gradients needed."""
    binding = binding_of(model)
    site = next(iter(binding.bank.spec.sites.values()))
    param = next(model.parameters())
    query = torch.empty(1, site.num_heads, 2, site.head_dim, dtype=param.dtype, device=param.device)
    config = model.config
    dropout = float(getattr(config, "attn_pdrop", getattr(config, "attention_dropout", 0.0)) or 0.0)
    call = AttentionCall.of(query, query, True, dropout if model.training else 0.0, True)
    return select_backend(binding.backend, call).name
