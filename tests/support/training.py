"""Tiny seeded models and toy rows for the training tests (prefix-tuning, fine-tuning, several processes).

A task's rows have random sources and one fixed target: a pattern that a prefix (or the whole model) learns in a
few steps. The models are the CLI's built-in ``gpt2-tiny`` / ``bart-tiny`` narrowed to width 32.
"""

import torch

from prefixrt.tasks import Encoded
from prefixrt.train.models import build_model

VOCAB = 64
PAD = 1


def tiny_model(kind: str, *, dropout: float = 0.0, seed: int = 0, **overrides):
    """``"gpt2"`` or ``"bart"`` (one encoder and one decoder layer) with init scale 0.3: a random model whose
    outputs a prefix can make peaked. ``overrides`` are further config fields."""
    if kind == "gpt2":
        name = "gpt2-tiny"
        config = dict(n_embd=32, n_head=2, resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout)
        config["initializer_range"] = 0.3
    else:
        name = "bart-tiny"
        config = dict(
            d_model=32, encoder_layers=1, decoder_layers=1, dropout=dropout, attention_dropout=dropout
        )
        config["init_std"] = 0.3
    config.update(overrides)
    return build_model(name, seed=seed, vocab_size=VOCAB, **config)


def task_rows(kind: str, target: list[int], n: int, seed: int, source_lengths=(2, 6)) -> list[Encoded]:
    """``n`` rows with a random source (length drawn from ``range(*source_lengths)``) and the fixed ``target``,
    in the model's layout: GPT-2 ``src <sep> target <eos>`` (loss on the target and end), BART ``<s> src </s>``
    with labels ``<s> target </s>``."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(*source_lengths, (1,), generator=g))
        src = torch.randint(3, VOCAB - 1, (length,), generator=g).tolist()
        if kind == "gpt2":
            sep = eos = VOCAB - 1
            out.append(Encoded([*src, sep, *target, eos], [-100] * (len(src) + 1) + [*target, eos]))
        else:
            out.append(Encoded([0, *src, 2], [0, *target, 2]))
    return out
