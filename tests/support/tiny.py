"""Tiny GPT-2 and BART models with seeded random weights, and random banks for them (shared by the tests)."""

import torch
from transformers import BartConfig, BartForConditionalGeneration, GPT2Config, GPT2LMHeadModel

import prefixrt

VOCAB = 120


def _seeded_model(model_class, config_class, seed: int, config: dict, overrides: dict):
    """``model_class`` on ``config`` updated with ``overrides``, its weights drawn after ``torch.manual_seed(seed)``;
    in eval mode, with no parameter requiring grad."""
    torch.manual_seed(seed)
    model = model_class(config_class(**{**config, **overrides})).eval()
    model.requires_grad_(False)
    return model


def tiny_gpt2(seed: int = 0, **overrides) -> GPT2LMHeadModel:
    config = dict(
        n_layer=2,
        n_head=2,
        n_embd=32,
        vocab_size=VOCAB,
        n_positions=128,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    return _seeded_model(GPT2LMHeadModel, GPT2Config, seed, config, overrides)


def tiny_bart(seed: int = 0, **overrides) -> BartForConditionalGeneration:
    config = dict(
        vocab_size=VOCAB, d_model=32,
        encoder_layers=2, decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=4,
        encoder_ffn_dim=48, decoder_ffn_dim=48, max_position_embeddings=128,
        pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2,
        forced_eos_token_id=None, forced_bos_token_id=None,
        dropout=0.0, attention_dropout=0.0,
    )  # fmt: skip
    return _seeded_model(BartForConditionalGeneration, BartConfig, seed, config, overrides)


def random_kv(spec, length: int, generator: torch.Generator, sites=None, scale: float = 1.0) -> dict:
    return {
        site: scale * torch.randn(s.num_layers, 2, s.num_heads, length, s.head_dim, generator=generator)
        for site, s in spec.sites.items()
        if sites is None or site in sites
    }


def random_bank(model, lengths: dict, seed: int = 0, **kwargs) -> prefixrt.PrefixBank:
    """A bank with one random entry per ``name -> prefix length``."""
    bank = prefixrt.PrefixBank.for_model(model)
    g = torch.Generator().manual_seed(seed)
    for name, length in lengths.items():
        bank.add(name, random_kv(bank.spec, length, g, **kwargs))
    return bank


def random_ids(batch: int, length: int, seed: int = 0, low: int = 3) -> torch.Tensor:
    return torch.randint(low, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def left_padded(lengths, total: int, seed: int = 0, pad: int = 1):
    """(input_ids, attention_mask) for rows of the given real lengths, left-padded to ``total``."""
    ids = random_ids(len(lengths), total, seed)
    mask = torch.zeros(len(lengths), total, dtype=torch.long)
    for row, n in enumerate(lengths):
        mask[row, total - n :] = 1
        ids[row, : total - n] = pad
    return ids, mask


def left_padded_prompts(prompts, pad: int = 1):
    """(input_ids, attention_mask) of the given 1-D prompts, left-padded with ``pad`` to the longest one (as
    ``generate`` wants)."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = prompt
        mask[row, width - len(prompt) :] = 1
    return ids, mask
