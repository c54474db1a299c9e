"""Generate for a task's sources and score the outputs: what ``prefixrt eval`` and the dev generations of
``prefixrt train`` run.

Multi-reference data are generated for once per unique source (:func:`prefixrt.tasks.collapse` groups the rows of
a source and gathers its references) and scored against all of that source's references. Decoding is Hugging
Face ``generate()`` on the model -- attached to a bank or a tuner, with one ``prefix_ids`` entry per row, or a
plain (e.g. fine-tuned) model -- with the paper's settings per task kind by default
(:data:`prefixrt.tasks.KIND_DEFAULTS`). Sources are batched by length (less padding) and the outputs put back in
the sources' order.

>>> decoding = Decoding.for_kind("table-to-text")                     # beam 5, <= 100 new tokens
>>> decoding.num_beams, decoding.max_new_tokens
(5, 100)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from prefixrt.tasks import (
    KIND_DEFAULTS,
    Collator,
    Example,
    collapse,
    decode_generated,
    encode_prompt,
    encode_seq2seq,
    layout_for,
    pad_token_id_for,
    score,
)

__all__ = ["Decoding", "TaskEval", "evaluate_examples", "generate_texts"]


@dataclass(frozen=True)
class Decoding:
    """Decoding settings of :func:`generate_texts`.

    Attributes
    ----------
    num_beams : int
        Beam width (1: greedy).
    length_penalty : float
        Hugging Face's exponent on the length in the beam score (the paper's "length normalization").
    max_new_tokens, min_new_tokens : int
        Bounds on the generated tokens (BART's decoder start token not counted).
    no_repeat_ngram_size : int, optional
        Forbid repeating n-grams of this size (default: the model's generation config).
    batch_size : int
        Sources per ``generate()`` call.
    """

    num_beams: int = 1
    length_penalty: float = 1.0
    max_new_tokens: int = 100
    min_new_tokens: int = 0
    no_repeat_ngram_size: int | None = None
    batch_size: int = 8

    @classmethod
    def for_kind(cls, kind: str, **overrides: Any) -> Decoding:
        """The paper's decoding for a task kind (``None`` overrides are ignored)."""
        if kind not in KIND_DEFAULTS:
            raise ValueError(f"kind must be one of {sorted(KIND_DEFAULTS)}, got {kind!r}")
        d = KIND_DEFAULTS[kind]
        base = cls(d.num_beams, d.length_penalty, d.max_new_tokens, d.min_new_tokens)
        return dataclasses.replace(base, **{k: v for k, v in overrides.items() if v is not None})

    def generate_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "num_beams": self.num_beams,
            "max_new_tokens": self.max_new_tokens,
            "do_sample": False,
        }
        if self.num_beams > 1:
            kwargs["length_penalty"] = self.length_penalty
        if self.min_new_tokens > 0:
            kwargs["min_new_tokens"] = self.min_new_tokens
        if self.no_repeat_ngram_size is not None:
            kwargs["no_repeat_ngram_size"] = self.no_repeat_ngram_size
        return kwargs


@torch.no_grad()
def generate_texts(
    model: nn.Module,
    tokenizer: Any,
    sources: Sequence[str],
    *,
    prefix_id: int | None,
    decoding: Decoding,
    max_source_tokens: int | None = None,
    progress: bool = False,
) -> list[str]:
    """One output text per source.

    Parameters
    ----------
    model : GPT-2 or BART
        Attached to a bank or a tuner when ``prefix_id`` is given; a plain model otherwise.
    tokenizer : the model's tokenizer
    sources : sequence of str
        Linearized tables or documents.
    prefix_id : int or None
        The bank entry (or tuner task) id every row uses (``-1``: no prefix, on an attached model); None: no
        ``prefix_ids`` at all (a plain model).
    decoding : Decoding
    max_source_tokens : int, optional
        Truncate sources (BART: the encoder input, special tokens included).
    progress : bool
        A tqdm bar over the batches (stderr).

    Returns
    -------
    list of str
        Outputs in the order of ``sources``, whitespace collapsed to single spaces (one line each).
    """
    layout = layout_for(model)
    pad = pad_token_id_for(tokenizer)
    if layout == "causal":
        rows = [encode_prompt(s, tokenizer, max_source_tokens=max_source_tokens) for s in sources]
        collate = Collator(pad, padding_side="left")
    else:
        rows = [encode_seq2seq(s, None, tokenizer, max_source_tokens=max_source_tokens) for s in sources]
        collate = Collator(pad, layout="seq2seq")
    order = sorted(range(len(rows)), key=lambda i: len(rows[i].input_ids))
    batches = [order[i : i + decoding.batch_size] for i in range(0, len(order), decoding.batch_size)]
    device = next(model.parameters()).device
    kwargs = {**decoding.generate_kwargs(), "pad_token_id": pad, "eos_token_id": tokenizer.eos_token_id}
    outputs: list[str | None] = [None] * len(rows)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(rows), desc="generating", unit="source", leave=False)
    was_training = model.training
    model.eval()
    try:
        for indices in batches:
            batch = collate([rows[i] for i in indices])
            input_ids = batch["input_ids"].to(device)
            extra = {}
            if prefix_id is not None:
                extra["prefix_ids"] = torch.full((len(indices),), prefix_id, dtype=torch.long, device=device)
            out = model.generate(
                input_ids, attention_mask=batch["attention_mask"].to(device), **extra, **kwargs
            )  # [B, S]
            texts = decode_generated(out, tokenizer, layout, prompt_width=input_ids.shape[1])
            for i, text in zip(indices, texts, strict=True):
                outputs[i] = " ".join(text.split())
            if bar is not None:
                bar.update(len(indices))
    finally:
        model.train(was_training)
        if bar is not None:
            bar.close()
    return outputs  # type: ignore[return-value]


@dataclass
class TaskEval:
    """The outcome of :func:`evaluate_examples`.

    Attributes
    ----------
    scores : dict of str to float
        :func:`prefixrt.tasks.score` of the outputs.
    sources : list of Example
        The unique sources generated for, with all their references.
    hyps : list of str
        One output per source.
    """

    scores: dict[str, float]
    sources: list[Example]
    hyps: list[str]

    @property
    def refs(self) -> list[list[str]]:
        return [list(ex.refs) for ex in self.sources]

    @property
    def num_references(self) -> int:
        return sum(len(ex.refs) for ex in self.sources)


def evaluate_examples(
    model: nn.Module,
    tokenizer: Any,
    examples: Sequence[Example],
    kind: str,
    *,
    prefix_id: int | None,
    decoding: Decoding,
    max_sources: int | None = None,
    max_source_tokens: int | None = None,
    progress: bool = False,
) -> TaskEval:
    """Generate once per unique source of ``examples`` and score against all of its references.

    Parameters
    ----------
    examples : sequence of Example
        A loader's rows (one per reference); sources without references are skipped.
    kind : {"table-to-text", "summarization"}
        Which metrics (:func:`prefixrt.tasks.score`).
    max_sources : int, optional
        Evaluate the first this many sources (file order).
    Other parameters as :func:`generate_texts`.
    """
    sources = [ex for ex in collapse(examples) if ex.refs]
    if max_sources is not None:
        sources = sources[:max_sources]
    if not sources:
        raise ValueError("no source with references to evaluate")
    hyps = generate_texts(
        model,
        tokenizer,
        [ex.src for ex in sources],
        prefix_id=prefix_id,
        decoding=decoding,
        max_source_tokens=max_source_tokens,
        progress=progress,
    )
    return TaskEval(score(kind, hyps, [list(ex.refs) for ex in sources]), sources, hyps)
