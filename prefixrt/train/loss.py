"""The training objective: cross-entropy over the target tokens only, with the LM head applied at those
positions alone."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["lm_loss", "target_tokens"]


def lm_loss(
    model: nn.Module,
    batch: Mapping[str, torch.Tensor],
    prefix_ids: torch.Tensor | None,
    reduction: str = "mean",
    **model_kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cross-entropy over the target tokens of a batch, and its per-row sums.

    Parameters
    ----------
    model : attached GPT-2 or BART (``GPT2LMHeadModel`` / ``BartForConditionalGeneration``)
    batch : dict
        ``input_ids`` [B, T], ``attention_mask`` [B, T], ``labels`` ([B, T] causal, aligned with the inputs and
        ``-100`` on source and padding; [B, L] seq2seq decoder targets).
    prefix_ids : LongTensor [B] or None
        The rows' prefix ids on an attached model; None for a plain (e.g. fine-tuned) model.
    reduction : ``"mean"`` or ``"sum"``
        Mean over the batch's target tokens, or their sum.
    **model_kwargs
        Passed to the model (e.g. ``prefix_source``).

    Returns
    -------
    loss : Tensor []
        Mean (what ``model(..., labels=...).loss`` gives) or sum over all target tokens of the batch.
    row_loss : Tensor [B]
        Summed cross-entropy per row (detached).
    row_tokens : Tensor [B]
        Target tokens per row.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    labels = batch["labels"]
    kwargs: dict[str, Any] = {"attention_mask": batch["attention_mask"], **model_kwargs}
    if prefix_ids is not None:
        kwargs["prefix_ids"] = prefix_ids
    # The base model, then the LM head at target positions only: the [B, T, vocab] logits of every position
    # (most of them source or padding) are never built.
    base = model.base_model
    if model.config.is_encoder_decoder:
        from transformers.models.bart.modeling_bart import shift_tokens_right

        kwargs["decoder_input_ids"] = shift_tokens_right(
            labels, model.config.pad_token_id, model.config.decoder_start_token_id
        )
        hidden = base(batch["input_ids"], use_cache=False, **kwargs).last_hidden_state  # [B, L, d]
        targets = labels
    else:
        hidden = base(batch["input_ids"], use_cache=False, **kwargs).last_hidden_state[:, :-1]  # [B, T-1, d]
        targets = labels[:, 1:]
    valid = targets != -100  # [B, T']
    rows = valid.nonzero()[:, 0]  # [N] row of each target token
    logits = model.get_output_embeddings()(hidden[valid])  # [N, vocab]
    bias = getattr(model, "final_logits_bias", None)  # BART
    if bias is not None:
        logits = logits + bias[0].to(logits.dtype)
    if logits.dtype not in (torch.float32, torch.float64):
        logits = logits.float()
    token_loss = nn.functional.cross_entropy(logits, targets[valid], reduction="none")  # [N]
    row_tokens = valid.sum(dim=1)
    row_loss = torch.zeros(labels.shape[0], dtype=token_loss.dtype, device=token_loss.device)
    row_loss.index_add_(0, rows, token_loss.detach())
    loss = token_loss.sum()
    if reduction == "mean":
        loss = loss / row_tokens.sum().clamp(min=1)
    return loss, row_loss, row_tokens


def target_tokens(labels: torch.Tensor, layout: str) -> torch.Tensor:
    """Target tokens per row, ``[B]``: what :func:`lm_loss` averages over (causal labels are shifted by one)."""
    targets = labels[:, 1:] if layout == "causal" else labels
    return (targets != -100).sum(dim=1)
