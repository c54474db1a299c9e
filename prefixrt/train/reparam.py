"""The trainable parameterizations of one task's prefix at one attention site.

Both produce the site's prefix K/V, ``[layers, 2, heads, P, head_dim]`` (K then V), the shape a
:class:`~prefixrt.PrefixBank` entry has:

* :class:`MLPPrefix` -- the paper's reparameterization (Li & Liang 2021, section 4.3): a small matrix ``P'`` of
  shape ``[P, k]`` (an ``nn.Embedding`` of ``P`` rows, as in the original code) fed through
  ``Linear(k, mid_dim) -> tanh -> Linear(mid_dim, layers * 2 * heads * head_dim)``. The original BART code gives
  the encoder, decoder and cross-attention prefixes their own ``P'`` and MLP (``wte_enc``/``control_trans_enc``,
  ``wte``/``control_trans``, ``wte2``/``control_trans2``); one :class:`MLPPrefix` per (task, site) does the same.
* :class:`DirectPrefix` -- the K/V themselves as one parameter (``reparam="none"``; PEFT's
  ``prefix_projection=False``), initialized ``N(0, 1)`` like PEFT's embedding.

Both can be set so that they output given K/V (``fit``): the start "from real words' activations".
"""

from __future__ import annotations

import torch
from torch import nn

from prefixrt.bank.spec import SiteSpec

__all__ = ["MLPPrefix", "DirectPrefix"]


class MLPPrefix(nn.Module):
    """``P' [P, k] -> Linear(k, mid_dim) -> tanh -> Linear(mid_dim, L * 2 * H * D)`` -> K/V.

    Parameters
    ----------
    site : SiteSpec
        Shape of the site (layers ``L``, heads ``H``, head dim ``D``).
    length : int
        Prefix length ``P``.
    embed_dim : int
        Width ``k`` of ``P'`` (the original code uses the model's hidden size).
    mid_dim : int
        Hidden width of the MLP (paper and original code: 512).
    """

    def __init__(self, site: SiteSpec, length: int, embed_dim: int, mid_dim: int):
        super().__init__()
        self.site, self.length = site, length
        out_dim = site.num_layers * 2 * site.num_heads * site.head_dim
        self.embedding = nn.Embedding(length, embed_dim)  # P', N(0, 1) as in the original code
        self.mlp = nn.Sequential(nn.Linear(embed_dim, mid_dim), nn.Tanh(), nn.Linear(mid_dim, out_dim))

    def forward(self) -> torch.Tensor:
        """The prefix K/V, ``[L, 2, H, P, D]``."""
        s = self.site
        flat = self.mlp(self.embedding.weight)  # [P, L * 2 * H * D]
        return flat.view(self.length, s.num_layers, 2, s.num_heads, s.head_dim).permute(1, 2, 3, 0, 4)

    @torch.no_grad()
    def fit(self, kv: torch.Tensor) -> float:
        """Make the MLP output ``kv`` (``[L, 2, H, P, D]``); returns the largest remaining absolute error.

        The original code fits the MLP to real words' activations by regression (500 Adam steps on an MSE loss).
        Here ``P'`` and the first layer keep their random start and the last layer is solved in closed form
        (minimum-norm least squares, in float64): exact when ``P <= mid_dim + 1``, the least-squares best otherwise.
        """
        target = kv.detach().permute(3, 0, 1, 2, 4).reshape(self.length, -1).double()  # [P, L * 2 * H * D]
        first, last = self.mlp[0], self.mlp[2]
        hidden = torch.tanh(first(self.embedding.weight)).double()  # [P, mid]
        design = torch.cat([hidden, hidden.new_ones(self.length, 1)], dim=1)  # [P, mid + 1]
        solution = torch.linalg.pinv(design) @ target  # [mid + 1, out]
        last.weight.copy_(solution[:-1].T)
        last.bias.copy_(solution[-1])
        return float((self.forward().double() - kv.double()).abs().max())


class DirectPrefix(nn.Module):
    """The prefix K/V trained directly: one parameter ``[L, 2, H, P, D]``, initialized ``N(0, 1)``."""

    def __init__(self, site: SiteSpec, length: int):
        super().__init__()
        self.site, self.length = site, length
        self.kv = nn.Parameter(torch.randn(site.num_layers, 2, site.num_heads, length, site.head_dim))

    def forward(self) -> torch.Tensor:
        """The prefix K/V, ``[L, 2, H, P, D]``."""
        return self.kv

    @torch.no_grad()
    def fit(self, kv: torch.Tensor) -> float:
        """Set the K/V to ``kv`` (``[L, 2, H, P, D]``); returns 0.0 (exact)."""
        self.kv.copy_(kv)
        return 0.0
