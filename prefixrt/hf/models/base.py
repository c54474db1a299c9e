"""What a model family is to prefixrt: the engine's forward (a :class:`Runner`) and the facts ``attach`` needs.

A runner runs one frozen Hugging Face model over the modules' own weights; only attention and the K/V cache are
the caller's. It sees the cache through the small interfaces below (:class:`PrefillCache` for new sequences,
:class:`DecodeCache` for one token per row), which ``prefixrt.engine`` implements over its preallocated pool; a
runner never reaches into engine objects. Every family takes the same :class:`StepInputs`:

* the **decoder** side is always ``input_ids`` / ``positions`` (GPT-2: the prompt; BART: the decoder-start
  token), with the position ids already shifted by each row's prefix (``attach``'s ``position_offset``);
* a family with an encoder (``has_encoder``) also gets its ``source_ids`` at prefill, writes the source's
  cross-attention K/V with ``write_source`` and reads them back with ``cross_attention`` at each decode step.

Bank sites: ``"decoder"`` (decoder self-attention), ``"encoder"`` (encoder self-attention), ``"cross"``
(cross-attention); a runner names the site of each call and the cache reads that site's prefix from the bank.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

__all__ = ["DecodeCache", "ModelFamily", "PrefillCache", "Runner", "StepInputs"]


class PrefillCache(Protocol):
    """Where a prefill of ``R`` new sequences writes its K/V, and its attention (rows already reserved)."""

    def write_prompt(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Decoder self-attention K/V of the new rows, ``k, v [R, H, T, D]`` (``T`` = ``input_ids.shape[1]``)."""

    def write_source(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Cross-attention K/V of the new rows' sources, ``k, v [R, H, Ts, D]`` (families with an encoder)."""

    def attention(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        site: str,
        layer: int,
        scale: float,
        *,
        mask: torch.Tensor | None,
        causal: bool,
    ) -> torch.Tensor:
        """Each row's ``q [R, H, Tq, D]`` over ``[its bank prefix at (site, layer) ; k]``; ``k, v [R, H, Tk, D]``,
        ``mask [R, Tk]`` (True = real token) or None; ``causal``: bottom-right aligned on ``k``.
        Returns ``[R, H, Tq, D]``."""


class DecodeCache(Protocol):
    """The K/V of the rows being decoded (one new token each) and their attention."""

    def write_token(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Decoder self-attention K/V of this step's token, ``k, v [n, H, D]``."""

    def self_attention(self, q: torch.Tensor, layer: int, scale: float) -> torch.Tensor:
        """``q [n, H, D]`` over ``[decoder prefix ; prompt ; generated]`` (this step's K/V written) -> ``[n, H, D]``."""

    def cross_attention(self, q: torch.Tensor, layer: int, scale: float) -> torch.Tensor:
        """``q [n, H, D]`` over ``[cross prefix ; source]`` -> ``[n, H, D]`` (families with an encoder)."""


@dataclass
class StepInputs:
    """One forward: a prefill of ``R`` new sequences, or a decode step of ``n`` rows.

    Attributes
    ----------
    cache : PrefillCache (prefill) or DecodeCache (decode)
    input_ids : LongTensor -- decoder tokens: ``[R, T]`` (prefill; left-padded) or ``[n]`` (decode)
    positions : LongTensor -- decoder position ids, prefix shift included; ``input_ids``' shape
    attention_mask : BoolTensor ``[R, T]`` or None -- prefill: the decoder tokens' padding (True = real)
    source_ids : LongTensor ``[R, Ts]`` or None -- prefill, families with an encoder: the source
    source_mask : BoolTensor ``[R, Ts]`` or None -- the source's padding
    """

    cache: PrefillCache | DecodeCache
    input_ids: torch.Tensor
    positions: torch.Tensor
    attention_mask: torch.Tensor | None = None
    source_ids: torch.Tensor | None = None
    source_mask: torch.Tensor | None = None


class Runner(Protocol):
    """The engine's forward for one model (see the module docstring).

    Attributes
    ----------
    layers, heads, head_dim : the decoder's self-attention geometry (the engine's K/V pool is laid out by it)
    dtype, device : the model's
    max_positions : size of the decoder's position table
    has_encoder : whether prefill takes ``source_ids`` (and the cache keeps cross-attention K/V)
    decode_sites : bank sites a decode step reads (``("decoder",)``, plus ``"cross"`` with an encoder)
    """

    layers: int
    heads: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device
    max_positions: int
    has_encoder: bool
    decode_sites: tuple[str, ...]

    def decoder_length(self, input_length: int) -> int:
        """Decoder tokens before generation for an input (prompt or source) of ``input_length`` tokens."""

    def decoder_prompt(self, input_ids: torch.Tensor, config: Any) -> torch.Tensor:
        """The decoder's first tokens ``[B, decoder_length(T)]`` for inputs ``[B, T]`` under the final
        ``GenerationConfig`` (special-token tensors set): what generation starts from and returns first."""

    def prefill(self, step: StepInputs) -> torch.Tensor:
        """Run new sequences, writing their K/V through ``step.cache``; returns the last position's logits
        ``[R, V]``."""

    def decode(self, step: StepInputs) -> torch.Tensor:
        """Feed one token per row (``step.input_ids [n]``); returns the next-token logits ``[n, V]``."""


@dataclass(frozen=True)
class ModelFamily:
    """Everything prefixrt knows about one Hugging Face model family; each family is one folder under
    ``prefixrt/hf/models/`` and one line of the registry (:mod:`prefixrt.hf.models`).

    Attributes
    ----------
    model_type : transformers' ``config.model_type``
    name : for messages ("GPT-2")
    runner : ``runner(model, gemm="auto")`` -> the engine's :class:`Runner` (``gemm``: how its weight matmuls
        run, one of :data:`prefixrt.hf.models.gemm.GEMM_KINDS`)
    attention_sites : ``attention_sites(model)`` -> ``[(attention module, site, layer)]``, every attention module
        ``attach`` routes through the bank
    install_position_hooks : ``install_position_hooks(model, binding)`` -> hook handles that check ``prefix_ids``
        and shift positions past each row's prefix (:mod:`prefixrt.hf.positions`); ``detach`` removes them
    max_positions : ``max_positions(config)`` -> size of the position table
    text_prefix_kv : ``text_prefix_kv(model, ids [1, T], extra_kwargs)`` -> site -> ``[layers, 2, H, T, D]``,
        the K/V of a text through the model (:mod:`prefixrt.hf.text_prefix`)
    check_model : ``check_model(model)`` raises ``ValueError`` for a model of the family that ``attach`` cannot
        serve (called before ``attach`` changes anything)
    """

    model_type: str
    name: str
    runner: Callable[..., Runner]
    attention_sites: Callable[[nn.Module], list[tuple[nn.Module, str, int]]]
    install_position_hooks: Callable[[nn.Module, Any], list]
    max_positions: Callable[[Any], int]
    text_prefix_kv: Callable[[nn.Module, torch.Tensor, dict], dict[str, torch.Tensor]]
    check_model: Callable[[nn.Module], None] = lambda model: None
