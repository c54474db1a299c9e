"""The paper's token layouts: ``src <bos> tgt <eos>`` for GPT-2, an encoder/decoder split for BART.

GPT-2 (``layout="causal"``), as the original prefix-tuning code builds it::

    input_ids  =  tok(" " + src)          <bos>   tok(tgt)   <eos>
    labels     =  -100 ... -100           -100    tok(tgt)   <eos>

The separator is the tokenizer's ``bos_token`` and the end is its ``eos_token`` (both ``<|endoftext|>``, id
50256, for GPT-2). The original wrote the row as the text ``" {src} {bos} {tgt} {eos}"`` and its tokenizer
stripped the spaces around special tokens, so the source keeps a leading space and the target has none; that
is reproduced here. The loss covers the target and the end token only. A generation prompt is the same row cut
after the separator: ``tok(" " + src) <bos>``.

BART (``layout="seq2seq"``)::

    input_ids  =  <s> tok(src) </s>      (the encoder)
    labels     =  <s> tok(tgt) </s>      (the decoder's targets; the model shifts them right for its inputs)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from prefixrt.tasks.examples import Example

__all__ = [
    "LAYOUTS",
    "Encoded",
    "decode_generated",
    "encode_causal",
    "encode_examples",
    "encode_prompt",
    "encode_seq2seq",
    "layout_for",
]

LAYOUTS = ("causal", "seq2seq")


@dataclass(frozen=True)
class Encoded:
    """One tokenized row, before padding.

    Attributes
    ----------
    input_ids : list of int
        Causal: source, separator, target, end (training) or source, separator (prompt). Seq2seq: the encoder input.
    labels : list of int or None
        Causal: same length as ``input_ids``, ``-100`` on the source and separator. Seq2seq: the decoder targets.
        None for a generation prompt.
    task : str or None
        The task (prefix) name this row belongs to; the collator maps it to an id.
    group : str or None
        The source's group key (:class:`prefixrt.tasks.examples.Example`), to align generations with references.
    """

    input_ids: list[int]
    labels: list[int] | None
    task: str | None = None
    group: str | None = None


def layout_for(model_or_config: Any) -> str:
    """``"seq2seq"`` for an encoder-decoder model (BART) or its config, else ``"causal"`` (GPT-2)."""
    config = getattr(model_or_config, "config", model_or_config)
    return "seq2seq" if getattr(config, "is_encoder_decoder", False) else "causal"


def _special(tokenizer: Any, name: str) -> int:
    tid = getattr(tokenizer, f"{name}_token_id", None)
    if tid is None:
        raise ValueError(
            f"the tokenizer has no {name}_token; the causal layout needs bos (separator) and eos"
        )
    return int(tid)


def _cut(ids: list[int], limit: int | None) -> list[int]:
    return ids if limit is None else ids[:limit]


def encode_causal(
    src: str,
    tgt: str,
    tokenizer: Any,
    *,
    max_source_tokens: int | None = None,
    max_target_tokens: int | None = None,
    task: str | None = None,
    group: str | None = None,
) -> Encoded:
    """Training row ``src <bos> tgt <eos>`` with the loss on ``tgt <eos>`` only (see the module docstring).

    Parameters
    ----------
    src, tgt : str
        Source and target text.
    tokenizer : PreTrainedTokenizerBase
        A GPT-2 tokenizer (any tokenizer with ``bos_token_id`` and ``eos_token_id``).
    max_source_tokens, max_target_tokens : int, optional
        Keep at most this many source / target tokens (the separator and end token are always added).
    """
    s = _cut(tokenizer.encode(" " + src, add_special_tokens=False), max_source_tokens)
    t = _cut(tokenizer.encode(tgt, add_special_tokens=False), max_target_tokens)
    sep, eos = _special(tokenizer, "bos"), _special(tokenizer, "eos")
    ids = [*s, sep, *t, eos]
    labels = [-100] * (len(s) + 1) + [*t, eos]
    return Encoded(ids, labels, task, group)


def encode_prompt(
    src: str,
    tokenizer: Any,
    *,
    max_source_tokens: int | None = None,
    task: str | None = None,
    group: str | None = None,
) -> Encoded:
    """Generation prompt for the causal layout: ``tok(" " + src) <bos>``; the model continues with the target."""
    s = _cut(tokenizer.encode(" " + src, add_special_tokens=False), max_source_tokens)
    return Encoded([*s, _special(tokenizer, "bos")], None, task, group)


def encode_seq2seq(
    src: str,
    tgt: str | None,
    tokenizer: Any,
    *,
    max_source_tokens: int | None = None,
    max_target_tokens: int | None = None,
    task: str | None = None,
    group: str | None = None,
) -> Encoded:
    """BART row: encoder ``<s> src </s>``, labels ``<s> tgt </s>`` (None when ``tgt`` is None: a prompt).

    ``max_*_tokens`` bound the full sequences, special tokens included (the tokenizer's own truncation).
    """

    def tok(text: str, limit: int | None) -> list[int]:
        if limit is None:
            return list(tokenizer(text)["input_ids"])
        return list(tokenizer(text, truncation=True, max_length=limit)["input_ids"])

    labels = tok(tgt, max_target_tokens) if tgt is not None else None
    return Encoded(tok(src, max_source_tokens), labels, task, group)


def encode_examples(
    examples: Sequence[Example],
    tokenizer: Any,
    layout: str,
    *,
    task: str | None = None,
    prompts: bool = False,
    max_source_tokens: int | None = None,
    max_target_tokens: int | None = None,
) -> list[Encoded]:
    """Encode a list of examples in one layout.

    Parameters
    ----------
    examples : sequence of Example
        Training rows (``prompts=False``; every row needs a ``tgt``), or sources to generate for
        (``prompts=True``; usually :func:`prefixrt.tasks.examples.collapse`'s output).
    tokenizer : PreTrainedTokenizerBase
        The model's tokenizer.
    layout : {"causal", "seq2seq"}
        See :func:`layout_for`.
    task : str, optional
        Task name stored on every row (for mixed-task batches).
    prompts : bool
        Build generation inputs (no labels) instead of training rows.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    lim = {"max_source_tokens": max_source_tokens}
    out = []
    for i, ex in enumerate(examples):
        if prompts:
            if layout == "causal":
                out.append(encode_prompt(ex.src, tokenizer, task=task, group=ex.group, **lim))
            else:
                out.append(encode_seq2seq(ex.src, None, tokenizer, task=task, group=ex.group, **lim))
            continue
        if ex.tgt is None:
            raise ValueError(f"example {i} (group {ex.group!r}) has no target; it cannot be a training row")
        enc = encode_causal if layout == "causal" else encode_seq2seq
        out.append(
            enc(
                ex.src,
                ex.tgt,
                tokenizer,
                task=task,
                group=ex.group,
                max_target_tokens=max_target_tokens,
                **lim,
            )
        )
    return out


def decode_generated(sequences: Any, tokenizer: Any, layout: str, *, prompt_width: int = 0) -> list[str]:
    """Text of generated rows: the inverse of the layouts, for scoring ``model.generate`` output.

    Parameters
    ----------
    sequences : LongTensor [B, S] or list of list of int
        ``generate``'s output (several rows per source when ``num_return_sequences > 1``, in that order).
    tokenizer : PreTrainedTokenizerBase
        The model's tokenizer.
    layout : {"causal", "seq2seq"}
        Causal: each row is the (left-padded) prompt followed by the continuation; the first ``prompt_width``
        columns (the padded prompt batch's width) are dropped. Seq2seq: the first column, the decoder start
        token, is dropped.
    prompt_width : int
        Width of the prompt batch (causal only).

    Returns
    -------
    list of str
        Per row, the tokens up to the first eos token, decoded without special tokens and stripped.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    start = prompt_width if layout == "causal" else 1
    eos = tokenizer.eos_token_id
    out = []
    for row in sequences.tolist() if hasattr(sequences, "tolist") else sequences:
        gen = list(row[start:])
        if eos is not None and eos in gen:
            gen = gen[: gen.index(eos)]
        out.append(tokenizer.decode(gen, skip_special_tokens=True).strip())
    return out
