"""The K/V of a real text prompt, computed once through the frozen model, as a prefix-bank entry.

A discrete prompt ("Summarize the table:") is then cached and shared across rows exactly like a learned prefix,
and the same activations are the paper's "initialize from real words" start for training (Li & Liang 2021, 5.2).

What is stored, per site (each ``[layers, 2, heads, T, head_dim]``, K then V):

GPT-2 ``decoder``
    The self-attention K/V of every layer after one forward of the ids from position 0 (read from the model's
    KV cache). With the default position offset an attached model given this prefix and an input ``x`` computes
    exactly what the base model computes for the ``x`` positions of ``text ++ x``.
BART (one forward with the text as both the encoder input and the decoder input, positions from 0)
    ``encoder``: each encoder layer's self-attention K/V of the text (captured from ``k_proj`` / ``v_proj``);
    ``decoder``: each decoder layer's self-attention K/V with the text as decoder input (its cross-attention
    reads the encoder output of the text);
    ``cross``: each decoder layer's cross-attention K/V of the encoder output of the text.
    Encoder attention is bidirectional, so no single forward of a longer input reproduces these exactly: this is
    the paper's initialization from real words, not a lossless prompt cache.

Strings are tokenized with ``add_special_tokens=False`` (the prompt is continued by the input, so no BOS/EOS is
added); pass ids to control the tokens exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from prefixrt.hf.models import family_names, find_family

__all__ = ["add_text_prefix", "text_prefix_kv", "text_ids"]


def text_ids(text_or_ids: Any, tokenizer: Any = None, vocab_size: int | None = None) -> torch.Tensor:
    """LongTensor ``[T]`` of token ids from a string (needs ``tokenizer``), ``list[int]``, or a LongTensor
    ``[T]`` / ``[1, T]``; raises ``ValueError`` naming ``text_or_ids`` or ``tokenizer`` on bad input."""
    if isinstance(text_or_ids, str):
        if tokenizer is None:
            raise ValueError(
                "text_or_ids is a string: pass tokenizer=... to turn it into ids (or pass the ids themselves)"
            )
        if not callable(tokenizer):
            raise ValueError(
                f"tokenizer must be a Hugging Face tokenizer (callable), got {type(tokenizer).__name__}"
            )
        ids = tokenizer(text_or_ids, add_special_tokens=False)["input_ids"]
        ids = torch.as_tensor(ids, dtype=torch.long)
    elif isinstance(text_or_ids, torch.Tensor):
        if text_or_ids.is_floating_point() or text_or_ids.is_complex() or text_or_ids.dtype == torch.bool:
            raise ValueError(f"text_or_ids must hold integer token ids, got dtype {text_or_ids.dtype}")
        if text_or_ids.dim() == 2 and text_or_ids.shape[0] == 1:
            text_or_ids = text_or_ids[0]
        if text_or_ids.dim() != 1:
            raise ValueError(
                f"text_or_ids must be a LongTensor [T] or [1, T] (one prompt), got shape {list(text_or_ids.shape)}"
            )
        ids = text_or_ids.long()
    elif isinstance(text_or_ids, Sequence) and all(
        isinstance(i, int) and not isinstance(i, bool) for i in text_or_ids
    ):
        ids = torch.tensor(list(text_or_ids), dtype=torch.long)
    else:
        raise ValueError(
            "text_or_ids must be a string, a list of int token ids, or a LongTensor [T] / [1, T]; got "
            f"{type(text_or_ids).__name__}"
        )
    if ids.dim() == 2 and ids.shape[0] == 1:  # tokenizers that return a batch of one
        ids = ids[0]
    if ids.numel() == 0:
        raise ValueError("text_or_ids is empty: a text prefix needs at least one token")
    if vocab_size is not None and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        raise ValueError(
            f"text_or_ids holds ids outside the model's vocabulary [0, {vocab_size}): "
            f"min {int(ids.min())}, max {int(ids.max())}"
        )
    return ids


def text_prefix_kv(model: nn.Module, text_or_ids: Any, tokenizer: Any = None) -> dict[str, torch.Tensor]:
    """The K/V of a text prompt through the frozen ``model``, one tensor per attention site.

    Parameters
    ----------
    model : GPT-2 (``GPT2LMHeadModel`` / ``GPT2Model``) or BART (``BartForConditionalGeneration`` / ``BartModel``);
        attached or not (an attached model runs with ``prefix_ids=-1``: no prefix, no position shift). Run in
        eval mode (no dropout) under ``torch.no_grad``; the model's training flag is restored.
    text_or_ids : str (needs ``tokenizer``), list[int], or LongTensor ``[T]`` / ``[1, T]``
    tokenizer : a Hugging Face tokenizer, required for a string

    Returns
    -------
    dict site -> Tensor ``[layers, 2, heads, T, head_dim]`` in the model's dtype and device:
    GPT-2 ``{"decoder"}``; BART ``{"encoder", "decoder", "cross"}`` (see the module docstring for what each is).
    """
    config = getattr(model, "config", None)
    family = find_family(config)
    if family is None:
        model_type = getattr(config, "model_type", None)
        raise ValueError(f"model must be a {family_names('or')} model, got model_type={model_type!r}")
    ids = text_ids(text_or_ids, tokenizer, vocab_size=config.vocab_size)
    max_positions = family.max_positions(config)
    if ids.numel() > max_positions:
        raise ValueError(
            f"text_or_ids has {ids.numel()} tokens, more than the model's {max_positions} positions"
        )
    device = next(model.parameters()).device
    ids = ids.to(device)[None, :]  # [1, T]
    extra = {}
    if getattr(model, "_prefixrt_binding", None) is not None:
        extra["prefix_ids"] = torch.full((1,), -1, dtype=torch.long, device=device)

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return family.text_prefix_kv(model, ids, extra)
    finally:
        model.train(was_training)


def add_text_prefix(
    bank: Any, name: str, text_or_ids: Any, model: nn.Module, tokenizer: Any = None, replace: bool = False
) -> int:
    """Add to ``bank`` the K/V of a real text prompt computed once through the frozen ``model`` (a cached discrete
    prompt, shared like a learned prefix; also the paper's "initialize from real words"); returns its id."""
    return bank.add(name, text_prefix_kv(model, text_or_ids, tokenizer), replace=replace)
