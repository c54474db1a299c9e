"""Models and tokenizers for the command line: a local checkpoint, or a built-in config with seeded random weights.

No pretrained weights are needed: ``"gpt2-tiny"``, ``"gpt2-small"``, ``"gpt2-medium"``, ``"bart-tiny"``,
``"bart-base"`` and ``"bart-large"`` build the architecture from a config, with weights drawn from a seed (the same
name and seed always give the same model, so a bank trained on one can be used with it later). Tokenizers come from
a directory (``--tokenizer``), the model's own directory, or the shared data folder (``PREFIXRT_SHARED_DATA``,
default ``../shared/data`` next to the repository).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "BUILTIN_MODELS",
    "build_model",
    "byte_level_tokenizer",
    "load_model",
    "load_model_and_tokenizer",
    "load_tokenizer",
    "parse_overrides",
    "shared_data_dir",
]

# name -> (model type, config fields). Vocabulary sizes are GPT-2's (50257) and BART's (50265) unless a
# tokenizer of another size is given.
BUILTIN_MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    "gpt2-tiny": ("gpt2", {"n_layer": 2, "n_head": 4, "n_embd": 64, "n_positions": 512}),
    "gpt2-small": ("gpt2", {"n_layer": 12, "n_head": 12, "n_embd": 768, "n_positions": 1024}),
    "gpt2-medium": ("gpt2", {"n_layer": 24, "n_head": 16, "n_embd": 1024, "n_positions": 1024}),
    "bart-tiny": (
        "bart",
        {
            "d_model": 64,
            "encoder_layers": 2,
            "decoder_layers": 2,
            "encoder_attention_heads": 4,
            "decoder_attention_heads": 4,
            "encoder_ffn_dim": 128,
            "decoder_ffn_dim": 128,
            "max_position_embeddings": 512,
        },
    ),
    "bart-base": (
        "bart",
        {
            "d_model": 768,
            "encoder_layers": 6,
            "decoder_layers": 6,
            "encoder_attention_heads": 12,
            "decoder_attention_heads": 12,
            "encoder_ffn_dim": 3072,
            "decoder_ffn_dim": 3072,
            "max_position_embeddings": 1024,
        },
    ),
    "bart-large": (
        "bart",
        {
            "d_model": 1024,
            "encoder_layers": 12,
            "decoder_layers": 12,
            "encoder_attention_heads": 16,
            "decoder_attention_heads": 16,
            "encoder_ffn_dim": 4096,
            "decoder_ffn_dim": 4096,
            "max_position_embeddings": 1024,
        },
    ),
}

_DEFAULT_VOCAB = {"gpt2": 50257, "bart": 50265}
_TOKENIZER_DIRS = {"gpt2": "gpt2-tokenizer", "bart": "bart-tokenizer"}


def shared_data_dir() -> Path | None:
    """The shared data folder: ``$PREFIXRT_SHARED_DATA``, else ``../shared/data`` next to the repository or the
    working directory; None when none exists."""
    env = os.environ.get("PREFIXRT_SHARED_DATA")
    candidates = [Path(env)] if env else []
    repo = Path(__file__).resolve().parents[2]
    candidates += [repo.parent / "shared" / "data", Path.cwd().parent / "shared" / "data"]
    return next((p for p in candidates if p.is_dir()), None)


def build_model(name: str, *, seed: int = 0, vocab_size: int | None = None, **overrides: Any) -> nn.Module:
    """A built-in architecture with seeded random weights (the global RNG is left as it was).

    Parameters
    ----------
    name : str
        One of :data:`BUILTIN_MODELS`.
    seed : int
        Weight seed.
    vocab_size : int, optional
        Defaults to GPT-2's / BART's vocabulary.
    **overrides
        Further config fields (e.g. ``resid_pdrop=0.0``).
    """
    if name not in BUILTIN_MODELS:
        raise ValueError(f"unknown built-in model {name!r}; built-in models are {sorted(BUILTIN_MODELS)}")
    model_type, fields = BUILTIN_MODELS[name]
    fields = {**fields, "vocab_size": vocab_size or _DEFAULT_VOCAB[model_type], **overrides}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if model_type == "gpt2":
            from transformers import GPT2Config, GPT2LMHeadModel

            bos = eos = fields["vocab_size"] - 1
            model = GPT2LMHeadModel(GPT2Config(bos_token_id=bos, eos_token_id=eos, **fields))
        else:
            from transformers import BartConfig, BartForConditionalGeneration

            model = BartForConditionalGeneration(BartConfig(**fields))
    model.config.name_or_path = f"prefixrt:{name}:seed={seed}"
    return model.eval()


def load_model(name_or_path: str, *, seed: int = 0, vocab_size: int | None = None) -> nn.Module:
    """A built-in config name (:func:`build_model`) or a local directory (``from_pretrained``), in eval mode."""
    if name_or_path in BUILTIN_MODELS:
        return build_model(name_or_path, seed=seed, vocab_size=vocab_size)
    path = Path(name_or_path)
    if not path.is_dir():
        raise FileNotFoundError(
            f"{name_or_path!r} is neither a built-in model ({', '.join(sorted(BUILTIN_MODELS))}) nor a local "
            "model directory"
        )
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    config = AutoConfig.from_pretrained(path)
    if config.model_type not in _DEFAULT_VOCAB:
        raise ValueError(f"{path}: prefixrt supports GPT-2 and BART, got model_type={config.model_type!r}")
    auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    return auto.from_pretrained(path).eval()


def load_tokenizer(
    model_type: str, path: str | os.PathLike | None = None, model_path: str | None = None
) -> Any:
    """The tokenizer from ``path``, else the model's directory, else the shared data folder.

    Raises ``FileNotFoundError`` naming the places it looked.
    """
    looked = []
    candidates = [Path(path)] if path is not None else []
    if path is None and model_path is not None and Path(model_path).is_dir():
        candidates.append(Path(model_path))
    shared = shared_data_dir()
    if path is None and shared is not None:
        candidates.append(shared / _TOKENIZER_DIRS[model_type])
    for directory in candidates:
        looked.append(str(directory))
        if (directory / "vocab.json").is_file() or (directory / "tokenizer.json").is_file():
            if model_type == "gpt2":
                from transformers import GPT2TokenizerFast

                return GPT2TokenizerFast.from_pretrained(str(directory))
            from transformers import BartTokenizer

            return BartTokenizer.from_pretrained(str(directory))
    raise FileNotFoundError(
        f"no {model_type} tokenizer found (looked in {looked or 'nowhere'}); pass --tokenizer DIR or set "
        "PREFIXRT_SHARED_DATA to the folder holding gpt2-tokenizer/ and bart-tokenizer/"
    )


def load_model_and_tokenizer(
    name_or_path: str,
    *,
    seed: int = 0,
    tokenizer: str | os.PathLike | None = None,
    overrides: dict[str, Any] | None = None,
) -> tuple[nn.Module, Any]:
    """A model (built-in name with ``seed``, or a local directory) and its tokenizer (:func:`load_tokenizer`).

    A built-in model gets the tokenizer's vocabulary size, so the same name, seed, ``overrides`` (config fields,
    e.g. ``{"initializer_range": 0.1}``) and tokenizer always give the same weights (what a bank trained on it
    needs). ``overrides`` apply to built-in models only.
    """
    if name_or_path in BUILTIN_MODELS:
        tok = load_tokenizer(BUILTIN_MODELS[name_or_path][0], tokenizer)
        return build_model(name_or_path, seed=seed, vocab_size=len(tok), **(overrides or {})), tok
    if overrides:
        raise ValueError(
            f"config overrides {sorted(overrides)} apply to built-in models only, not to the local model "
            f"{name_or_path}"
        )
    model = load_model(name_or_path)
    return model, load_tokenizer(model.config.model_type, tokenizer, model_path=name_or_path)


def parse_overrides(specs: list[str] | None) -> dict[str, Any]:
    """``["initializer_range=0.1", "resid_pdrop=0"]`` -> ``{"initializer_range": 0.1, "resid_pdrop": 0}``.

    Values are read as JSON (numbers, true/false, null, quoted strings), else kept as strings.
    """
    import json

    out: dict[str, Any] = {}
    for spec in specs or []:
        key, sep, value = spec.partition("=")
        if not sep or not key:
            raise ValueError(f"--model-config {spec!r}: expected KEY=VALUE")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def byte_level_tokenizer() -> Any:
    """A GPT-2-style byte-level tokenizer without merges (257 ids: 256 bytes and ``<|endoftext|>``), built in
    memory: the demo's fallback when no GPT-2 tokenizer files are at hand."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab["<|endoftext|>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>"
    )
