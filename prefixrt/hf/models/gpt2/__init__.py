"""GPT-2 (``GPT2LMHeadModel``; ``attach`` also takes ``GPT2Model``): the engine's runner and what ``attach``
needs, as one :class:`~prefixrt.hf.models.base.ModelFamily`."""

from prefixrt.hf.models.base import ModelFamily
from prefixrt.hf.models.gpt2 import integration
from prefixrt.hf.models.gpt2.runner import GPT2Runner

__all__ = ["FAMILY", "GPT2Runner"]

FAMILY = ModelFamily(
    model_type="gpt2",
    name="GPT-2",
    runner=GPT2Runner,
    attention_sites=integration.attention_sites,
    install_position_hooks=integration.install_position_hooks,
    max_positions=integration.max_positions,
    text_prefix_kv=integration.text_prefix_kv,
    check_model=integration.check_model,
)
