"""Pad a list of :class:`~prefixrt.tasks.encode.Encoded` rows into a batch, with one task (prefix) id per row."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from prefixrt.tasks.encode import LAYOUTS, Encoded

__all__ = ["Collator", "pad_token_id_for"]


def pad_token_id_for(tokenizer: Any) -> int:
    """The tokenizer's pad id, or its eos id when it has none (GPT-2); padded positions are masked anyway."""
    tid = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if tid is None:
        raise ValueError("the tokenizer has neither a pad_token nor an eos_token to pad with")
    return int(tid)


def _pad(rows: Sequence[Sequence[int]], value: int, left: bool) -> torch.Tensor:
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            if left:
                out[i, width - len(r) :] = torch.as_tensor(r, dtype=torch.long)
            else:
                out[i, : len(r)] = torch.as_tensor(r, dtype=torch.long)
    return out


class Collator:
    """Turn rows into a padded batch; usable as a ``DataLoader`` ``collate_fn``.

    Parameters
    ----------
    pad_token_id : int
        Id written at padded input positions (see :func:`pad_token_id_for`).
    layout : {"causal", "seq2seq"}
        ``"causal"``: labels are aligned with ``input_ids`` and padded on the same side. ``"seq2seq"``: labels
        are the decoder targets, padded on the right to their own length.
    padding_side : {"right", "left"}
        Side of the input padding. Right for training; left for causal generation prompts, so every prompt ends
        at the last column.
    task_ids : mapping of str to int, optional
        Task name -> prefix id (e.g. ``{name: i for i, name in enumerate(bank.names)}``); when given, the batch
        has ``task_ids`` and every row must carry a task in the mapping. Map a name to ``-1`` for rows that run
        without a prefix.

    Returns (from ``__call__``)
    ---------------------------
    dict
        ``input_ids`` LongTensor [B, T]; ``attention_mask`` LongTensor [B, T] (1 on real tokens);
        ``labels`` LongTensor [B, T] (causal) or [B, L] (seq2seq), ``-100`` on padding, present when every row
        has labels; ``task_ids`` LongTensor [B] when ``task_ids`` was given; ``tasks`` and ``groups`` (lists of
        str or None, per row; not tensors -- drop them before calling the model).
    """

    def __init__(
        self,
        pad_token_id: int,
        *,
        layout: str = "causal",
        padding_side: str = "right",
        task_ids: Mapping[str, int] | None = None,
    ):
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        self.pad_token_id = int(pad_token_id)
        self.layout = layout
        self.padding_side = padding_side
        self.task_ids = dict(task_ids) if task_ids is not None else None

    def __call__(self, rows: Sequence[Encoded]) -> dict[str, Any]:
        if not rows:
            raise ValueError("cannot collate an empty batch")
        left = self.padding_side == "left"
        ids = [r.input_ids for r in rows]
        if any(len(x) == 0 for x in ids):
            raise ValueError("a row has no input tokens")
        batch: dict[str, Any] = {
            "input_ids": _pad(ids, self.pad_token_id, left),
            "attention_mask": _pad([[1] * len(x) for x in ids], 0, left),
        }
        with_labels = [r.labels is not None for r in rows]
        if all(with_labels):
            if self.layout == "causal":
                for i, r in enumerate(rows):
                    if len(r.labels) != len(r.input_ids):
                        raise ValueError(
                            f"row {i}: causal labels ({len(r.labels)}) and input_ids ({len(r.input_ids)}) differ in length"
                        )
                batch["labels"] = _pad([r.labels for r in rows], -100, left)
            else:
                batch["labels"] = _pad([r.labels for r in rows], -100, False)
        elif any(with_labels):
            raise ValueError("a batch mixes rows with and without labels")
        if self.task_ids is not None:
            missing = sorted({str(r.task) for r in rows if r.task not in self.task_ids})
            if missing:
                raise KeyError(
                    f"rows of task(s) {missing} have no id; task_ids knows {sorted(self.task_ids)}"
                )
            batch["task_ids"] = torch.tensor([self.task_ids[r.task] for r in rows], dtype=torch.long)
        batch["tasks"] = [r.task for r in rows]
        batch["groups"] = [r.group for r in rows]
        return batch
