"""``prefixrt.generate``: the drop-in for Hugging Face ``generate()`` on an attached model, with our own loop.

Same arguments, same result: ``generate(model, input_ids, attention_mask, prefix_ids, **kwargs)`` returns the
tensor ``model.generate(...)`` returns (GPT-2: the prompt as given, then the new tokens; BART: the
decoder-start token, then the new tokens; finished rows filled with ``pad_token_id``; beam search's
``num_return_sequences`` best hypotheses per input, best first). Greedy and beam search give HF's tokens; sampling
follows HF's processors and warpers with a per-row generator (see :mod:`prefixrt.engine.sampling`).

What is different is the loop: preallocated K/V (:mod:`prefixrt.engine.kv`), prompts stored once per input and
shared by its beams, prefixes read from the bank in place and once per distinct id per step
(:mod:`prefixrt.engine.attention`), finished rows and finished beam-search inputs removed from the batch.
"""

from __future__ import annotations

import torch
from transformers import GenerationConfig

from prefixrt.engine.bankview import BankView
from prefixrt.engine.batch import Batch
from prefixrt.engine.beam import BeamSearch
from prefixrt.engine.capture import maybe_graphed_decode
from prefixrt.engine.sampling import base_seed, row_generators, select
from prefixrt.hf import binding_of
from prefixrt.hf.generation import config as cfg
from prefixrt.hf.generation.processors import build_processors
from prefixrt.hf.models import runner_for

__all__ = ["generate"]


@torch.no_grad()
def generate(
    model,
    input_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    prefix_ids: torch.Tensor | None = None,
    generation_config: GenerationConfig | None = None,
    *,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    gemm: str = "auto",
    **kwargs,
) -> torch.LongTensor:
    """Generate for a batch of mixed-prefix rows, returning exactly what ``model.generate`` returns.

    Parameters
    ----------
    model : GPT2LMHeadModel or BartForConditionalGeneration, attached with ``prefixrt.attach(model, bank)``
    input_ids : LongTensor ``[B, T]``
        GPT-2: prompts, left-padded. BART: sources.
    attention_mask : Tensor ``[B, T]`` or None
        1 for real tokens. GPT-2 infers it from ``pad_token_id`` like HF when None.
    prefix_ids : LongTensor ``[B]``
        Bank id per row (``bank.ids([...])``), ``-1`` for no prefix.
    generation_config : GenerationConfig, optional
    seed, generator : sampling only; output row ``r`` draws from a generator seeded with ``seed + r`` (``seed``
        itself drawn from ``generator`` or torch's global generator when not given).
    gemm : how the model's weight matmuls run, as for :class:`prefixrt.Engine` (``"auto"``, ``"packed"``,
        ``"plain"``); the packed weights are made once per model (:mod:`prefixrt.hf.models.gemm`).
    **kwargs :
        Generation settings (``max_new_tokens``, ``min_new_tokens``, ``do_sample``, ``temperature``, ``top_k``,
        ``top_p``, ``repetition_penalty``, ``num_beams``, ``length_penalty``, ``early_stopping``,
        ``num_return_sequences``, ``bad_words_ids``, ``eos_token_id``, ``pad_token_id``, ...; see
        :data:`prefixrt.hf.generation.config.HONORED`). Anything else raises
        :class:`~prefixrt.hf.generation.config.UnsupportedGenerationArgument` naming it.

    Returns
    -------
    LongTensor ``[B * num_return_sequences, L]``

    >>> out = prefixrt.generate(model, ids, attention_mask=mask, prefix_ids=bank.ids(["e2e", None]),
    ...                         max_new_tokens=20, num_beams=4)          # doctest: +SKIP
    """
    binding = binding_of(model)
    runner = runner_for(model, gemm)
    if input_ids is None:
        input_ids = kwargs.pop("inputs", None)
    if input_ids is None:
        raise cfg.UnsupportedGenerationArgument(
            "prefixrt.generate needs input_ids (a BOS-only start is unsupported)"
        )
    resolved = cfg.resolve(model, generation_config, kwargs)
    config = resolved.config
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point():
        raise ValueError(
            f"input_ids must be a LongTensor [batch, length], got {getattr(input_ids, 'shape', None)}"
        )
    device = runner.device
    input_ids = input_ids.to(device)
    batch_size, length = input_ids.shape
    if prefix_ids is None:
        raise ValueError(
            "this model is attached to a prefix bank: pass prefix_ids=LongTensor[batch] (one bank id per row, -1 "
            "for no prefix) to forward() or generate()"
        )
    binding.check_ids(prefix_ids, batch_size)
    cfg.special_tokens(model, config, attention_mask is not None, device, batch_size)
    if attention_mask is not None:
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask must have input_ids' shape {tuple(input_ids.shape)}, got {tuple(attention_mask.shape)}"
            )
        attention_mask = attention_mask.to(device)

    view = BankView.of(binding.bank, runner.dtype, device)
    pids = prefix_ids.tolist()
    num_beams, num_return = config.num_beams, config.num_return_sequences
    width = num_beams if resolved.mode == "beam" else num_return
    expand = max(num_beams, num_return)
    shift_of = (
        (lambda pid: view.length("decoder", pid)) if binding.position_offset == "prefix" else (lambda pid: 0)
    )

    if attention_mask is None and not runner.has_encoder:  # HF infers a prompt's padding from pad_token_id
        attention_mask = model._prepare_attention_mask_for_generation(input_ids, config, {})
    padded = attention_mask is not None and not bool((attention_mask == 1).all())
    start = runner.decoder_prompt(input_ids, config)  # [B, T']: the prompt, or the decoder-start token
    decoder_length = start.shape[1]
    cfg.prepare_lengths(model, resolved, decoder_length)
    # What HF passes its processors as the model's mask (encoder-decoder models: none, see build_processors)
    proc_mask = attention_mask.long().repeat_interleave(expand, dim=0) if padded else None
    processors = build_processors(model, config, decoder_length, input_ids, proc_mask, device)
    batch = Batch(
        runner,
        items=batch_size,
        rows=batch_size * width,
        context=decoder_length,
        generated=config.max_length - decoder_length,
        source=length,
        backend=binding.backend,
        fused=width == 1,
    )
    key = batch.add_view(view)
    logits = batch.prefill(
        input_ids,
        attention_mask.bool() if padded else None,
        start,
        [shift_of(p) for p in pids],
        pids,
        key,
        [width] * batch_size,
    )

    decode = maybe_graphed_decode(batch)
    if resolved.mode == "beam":
        return _beam(batch, decode, logits, config, processors, start)
    seeds = None
    if resolved.mode == "sample":
        first = base_seed(seed, generator)
        seeds = [first + r for r in range(batch_size * width)]
    return _greedy_or_sample(
        batch, decode, logits, config, processors, start.repeat_interleave(width, dim=0), width, seeds
    )


def _greedy_or_sample(batch, decode, logits, config, processors, start, width, seeds):
    """HF ``_sample`` semantics; finished rows leave the batch and are padded in the output."""
    rows, cur_len = start.shape
    device = start.device
    pad, eos = config._pad_token_tensor, config._eos_token_tensor
    sequences = torch.full(
        (rows, config.max_length), int(pad) if pad is not None else 0, dtype=torch.long, device=device
    )
    sequences[:, :cur_len] = start
    generators = row_generators(seeds, device) if seeds is not None else None
    active = list(range(rows))
    if width > 1:
        logits = logits.repeat_interleave(width, dim=0)
    while True:
        index = torch.tensor(active, dtype=torch.long, device=device)
        scores = logits.float()
        if processors:
            scores = processors(sequences[index, :cur_len], scores, index)
        tokens = select(scores, seeds is not None, [generators[r] for r in active] if generators else None)
        sequences[index, cur_len] = tokens
        cur_len += 1
        if cur_len >= config.max_length:
            break
        if eos is not None:
            finished = torch.isin(tokens, eos).tolist()
            keep = [i for i, f in enumerate(finished) if not f]
            if not keep:
                break
            if len(keep) < len(active):
                batch.keep(keep)
                active = [active[i] for i in keep]
                tokens = tokens[torch.tensor(keep, device=device)]
        logits = decode(tokens)
    return sequences[:, :cur_len]


def _beam(batch, decode, logits, config, processors, start):
    search = BeamSearch(config, start)
    logits = logits.repeat_interleave(config.num_beams, dim=0)
    while True:
        tokens, rows = search.step(logits, processors)
        if search.active == 0:
            break
        batch.keep(rows)
        logits = decode(tokens)
    return search.output()
