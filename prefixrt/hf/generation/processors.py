"""Logits processing: transformers' own processors, applied to the rows that are still running.

We build the processor list with the model's ``_get_logits_processor`` from the final generation config, exactly
as HF ``generate()`` does, so repetition penalty, ``min_new_tokens``, ``bad_words_ids``, forced BOS/EOS, and the
sampling warpers (temperature, top-k -- 50 unless set, as in HF --, top-p, ...) are HF's code, not a re-write.

Our loop drops finished rows from the batch, so a processor sees only the running rows. Every processor we accept
is row-wise; the one that keeps per-row state (``RepetitionPenaltyLogitsProcessor.prompt_ignore_length``, the
left-padding length of each row) is given the entries of the running rows at each call. A processor type not in
:data:`ROW_WISE` means a setting we have not vetted: it raises.
"""

from __future__ import annotations

import inspect

import torch
from transformers.generation import logits_process as lp

from prefixrt.hf.generation.config import UnsupportedGenerationArgument

__all__ = ["RowProcessors", "build_processors"]

ROW_WISE = tuple(
    getattr(lp, name)
    for name in (
        "MinLengthLogitsProcessor",
        "MinNewTokensLengthLogitsProcessor",
        "TemperatureLogitsWarper",
        "TopKLogitsWarper",
        "TopPLogitsWarper",
        "MinPLogitsWarper",
        "TypicalLogitsWarper",
        "EpsilonLogitsWarper",
        "EtaLogitsWarper",
        "RepetitionPenaltyLogitsProcessor",
        "NoRepeatNGramLogitsProcessor",
        "NoBadWordsLogitsProcessor",
        "SequenceBiasLogitsProcessor",
        "ForcedBOSTokenLogitsProcessor",
        "ForcedEOSTokenLogitsProcessor",
        "InfNanRemoveLogitsProcessor",
        "ExponentialDecayLengthPenalty",
        "SuppressTokensLogitsProcessor",
        "SuppressTokensAtBeginLogitsProcessor",
        "LogitNormalization",
    )
    if hasattr(lp, name)
)


class RowProcessors:
    """A processor list applied to a subset of the original rows.

    ``__call__(input_ids [n, L], scores [n, V], rows)`` where ``rows`` (LongTensor ``[n]`` or None for all rows in
    order) are the running rows' indices among the rows the list was built for.
    """

    def __init__(self, processors):
        for p in processors:
            if not isinstance(p, ROW_WISE):
                raise UnsupportedGenerationArgument(
                    f"prefixrt.generate does not support the logits processor {type(p).__name__} that these "
                    "generation settings create"
                )
        self.processors = list(processors)
        self._row_state = []
        for p in self.processors:
            state = getattr(p, "prompt_ignore_length", None)
            if isinstance(p, lp.RepetitionPenaltyLogitsProcessor) and isinstance(state, torch.Tensor):
                self._row_state.append((p, state))

    def __bool__(self) -> bool:
        return bool(self.processors)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, rows: torch.Tensor | None = None):
        for p, state in self._row_state:
            p.prompt_ignore_length = state if rows is None else state.to(rows.device)[rows]
        for p in self.processors:
            scores = p(input_ids, scores)
        return scores


def build_processors(
    model, config, input_length: int, encoder_input_ids, attention_mask, device
) -> RowProcessors:
    """HF's processor list for ``config`` (final lengths and special-token tensors already set).

    ``attention_mask`` is what HF passes as the model's mask at that point of ``generate()``: for decoder-only
    models the expanded ``[rows, T]`` prompt mask, or None when it had no padding.
    """
    key = "decoder_attention_mask" if model.config.is_encoder_decoder else "attention_mask"
    arguments = dict(
        generation_config=config,
        input_ids_seq_length=input_length,
        encoder_input_ids=encoder_input_ids,
        prefix_allowed_tokens_fn=None,
        logits_processor=lp.LogitsProcessorList(),
        device=device,
        model_kwargs={key: None if model.config.is_encoder_decoder else attention_mask},
        negative_prompt_ids=None,
        negative_prompt_attention_mask=None,
    )
    accepted = inspect.signature(model._get_logits_processor).parameters
    arguments = {k: v for k, v in arguments.items() if k in accepted}
    return RowProcessors(model._get_logits_processor(**arguments))
