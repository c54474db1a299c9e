"""Generation arguments: merge them exactly as Hugging Face ``generate()`` does, and refuse what we do not run.

``resolve`` builds the final :class:`~transformers.GenerationConfig` with the model's own
``_prepare_generation_config`` (argument > ``generation_config`` > ``model.generation_config`` > defaults), then:

* every keyword that is not a generation-config field (``token_type_ids``, ``decoder_input_ids``, ...) and every
  generate() parameter we do not implement (``logits_processor``, ``streamer``, ``assistant_model``, ...) raises
  :class:`UnsupportedGenerationArgument` naming it;
* every config field outside :data:`HONORED` must hold its neutral value (None, False, or the library default),
  whoever set it (the caller or the model's ``generation_config``), else the same error names it.

Nothing is ignored silently; ``use_cache`` is accepted because results do not depend on it (we always cache), and
so is a ``cache_implementation`` that an attached model runs with the dynamic cache's results (``"dynamic"``,
``"static"`` and the deprecated names that build static layers).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from transformers import GenerationConfig
from transformers.generation.configuration_utils import GenerationMode

__all__ = ["HONORED", "ResolvedConfig", "UnsupportedGenerationArgument", "resolve", "special_tokens"]


class UnsupportedGenerationArgument(ValueError):
    """A generation argument prefixrt's engine does not implement (the message names it)."""


# Generation-config fields whose values we implement (the logits processors come from transformers itself).
HONORED = frozenset(
    {
        "max_length",
        "max_new_tokens",
        "min_length",
        "min_new_tokens",
        "early_stopping",
        "do_sample",
        "num_beams",
        "temperature",
        "top_k",
        "top_p",
        "min_p",
        "typical_p",
        "epsilon_cutoff",
        "eta_cutoff",
        "repetition_penalty",
        "length_penalty",
        "no_repeat_ngram_size",
        "bad_words_ids",
        "sequence_bias",
        "renormalize_logits",
        "forced_bos_token_id",
        "forced_eos_token_id",
        "remove_invalid_values",
        "exponential_decay_length_penalty",
        "suppress_tokens",
        "begin_suppress_tokens",
        "num_return_sequences",
        "pad_token_id",
        "bos_token_id",
        "eos_token_id",
        "decoder_start_token_id",
        "use_cache",
    }
)

# generate() parameters other than generation-config fields; each must be absent or None.
UNSUPPORTED_PARAMETERS = (
    "logits_processor",
    "stopping_criteria",
    "prefix_allowed_tokens_fn",
    "synced_gpus",
    "assistant_model",
    "streamer",
    "negative_prompt_ids",
    "negative_prompt_attention_mask",
    "custom_generate",
    "tokenizer",
    "assistant_tokenizer",
    "trust_remote_code",
)

_NEUTRAL_EXTRA = {
    "guidance_scale": (1, 1.0),
    # The caches an attached model runs with the dynamic cache's tokens (prefixrt.hf.kv_cache): our loop's own
    # preallocated cache gives those tokens too. The others (offloaded, quantized, paged) stay refused.
    "cache_implementation": ("dynamic", "static", "sliding_window", "hybrid", "hybrid_chunked"),
}


@dataclass
class ResolvedConfig:
    """The merged config and what the caller left at its default (HF's ``has_default_*`` flags)."""

    config: GenerationConfig
    has_default_max_length: bool
    has_default_min_length: bool
    mode: str  # "greedy", "sample" or "beam"


def _global_defaults(model) -> dict:
    getter = getattr(model.generation_config, "_get_default_generation_params", None)
    return dict(getter()) if getter is not None else {}


def resolve(model, generation_config: GenerationConfig | None, kwargs: dict[str, Any]) -> ResolvedConfig:
    """Merge ``generation_config`` and ``kwargs`` like HF ``generate()``; raise for anything unsupported."""
    bad = [name for name in UNSUPPORTED_PARAMETERS if kwargs.get(name) is not None]
    kwargs = {k: v for k, v in kwargs.items() if k not in UNSUPPORTED_PARAMETERS}
    if generation_config is not None and not isinstance(generation_config, GenerationConfig):
        raise TypeError(
            f"generation_config must be a GenerationConfig, got {type(generation_config).__name__}"
        )
    has_default_max_length = (
        kwargs.get("max_length") is None
        and (generation_config is None or generation_config.max_length is None)
        and model.generation_config.max_length is None
    )
    has_default_min_length = (
        kwargs.get("min_length") is None
        and (generation_config is None or generation_config.min_length is None)
        and model.generation_config.min_length is None
    )
    config, model_kwargs = model._prepare_generation_config(copy.deepcopy(generation_config), **kwargs)
    bad += [name for name, value in model_kwargs.items() if value is not None]
    defaults = _global_defaults(model)
    for name, value in config.to_dict().items():
        if name in HONORED or name.startswith("_") or name == "transformers_version":
            continue
        neutral = value is None or value is False or value == defaults.get(name, None)
        if not neutral and value in _NEUTRAL_EXTRA.get(name, ()):
            neutral = True
        if not neutral:
            bad.append(name)
    if bad:
        raise UnsupportedGenerationArgument(
            f"prefixrt.generate does not support {sorted(set(bad))} (set by the call or by the model's "
            f"generation_config); supported generation settings: {sorted(HONORED)}"
        )
    mode = config.get_generation_mode()
    if mode == GenerationMode.GREEDY_SEARCH:
        name = "greedy"
    elif mode == GenerationMode.SAMPLE:
        name = "sample"
    elif mode == GenerationMode.BEAM_SEARCH:
        name = "beam"
    elif mode == GenerationMode.BEAM_SAMPLE:
        raise UnsupportedGenerationArgument(
            "prefixrt.generate does not support beam sampling (do_sample=True with num_beams > 1)"
        )
    else:
        raise UnsupportedGenerationArgument(f"prefixrt.generate does not support the generation mode {mode}")
    return ResolvedConfig(config, has_default_max_length, has_default_min_length, name)


def special_tokens(
    model, config: GenerationConfig, has_attention_mask: bool, device, batch_size: int
) -> None:
    """Set ``config._{bos,eos,pad,decoder_start}_token_tensor`` exactly as HF ``generate()`` does."""
    model._prepare_special_tokens(config, has_attention_mask, device=device, batch_size=batch_size)


def prepare_lengths(model, resolved: ResolvedConfig, input_length: int) -> GenerationConfig:
    """Final ``max_length`` / ``min_length`` as HF's ``_prepare_generated_length`` (input ids, not embeddings),
    and its check that the input is shorter than ``max_length``."""
    config = resolved.config
    if config.max_new_tokens is not None:
        config.max_length = config.max_new_tokens + input_length
    elif resolved.has_default_max_length:
        config.max_length = config.max_length + input_length
        limit = getattr(model.config, "max_position_embeddings", None)
        if limit is not None:
            config.max_length = min(config.max_length, limit)
    if config.min_new_tokens is not None:
        config.min_length = config.min_new_tokens + input_length
    if input_length >= config.max_length:
        name = "decoder_input_ids" if model.config.is_encoder_decoder else "input_ids"
        raise ValueError(
            f"Input length of {name} is {input_length}, but `max_length` is set to {config.max_length}. This can "
            "lead to unexpected behavior. You should consider increasing `max_length` or, better yet, setting "
            "`max_new_tokens`."
        )
    return config


def eos_ids(config: GenerationConfig) -> torch.Tensor | None:
    return getattr(config, "_eos_token_tensor", None)
