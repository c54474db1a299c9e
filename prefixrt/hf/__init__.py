"""The Hugging Face integration: attach a prefix bank to a frozen GPT-2 or BART through transformers' own
extension points (attention and mask registries, ``prepare_inputs_for_generation``)."""

from prefixrt.hf.attach import PrefixSource, attach, attention_sites, binding_of, detach, is_attached
from prefixrt.hf.attention import UnsupportedMask
from prefixrt.hf.backend_choice import training_backend
from prefixrt.hf.generation.prepare import UnsupportedContinuousBatching
from prefixrt.hf.kv_cache import UnsupportedCache
from prefixrt.hf.text_prefix import add_text_prefix
from prefixrt.hf.training_modules import fast_training_modules

__all__ = [
    "PrefixSource",
    "UnsupportedCache",
    "UnsupportedContinuousBatching",
    "UnsupportedMask",
    "add_text_prefix",
    "attach",
    "attention_sites",
    "binding_of",
    "detach",
    "fast_training_modules",
    "is_attached",
    "training_backend",
]
