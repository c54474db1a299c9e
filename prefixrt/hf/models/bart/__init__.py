"""BART (``BartForConditionalGeneration``; ``attach`` also takes ``BartModel``): the engine's runner and what
``attach`` needs, as one :class:`~prefixrt.hf.models.base.ModelFamily`."""

from prefixrt.hf.models.bart import integration
from prefixrt.hf.models.bart.runner import BartRunner
from prefixrt.hf.models.base import ModelFamily

__all__ = ["FAMILY", "BartRunner"]

FAMILY = ModelFamily(
    model_type="bart",
    name="BART",
    runner=BartRunner,
    attention_sites=integration.attention_sites,
    install_position_hooks=integration.install_position_hooks,
    max_positions=integration.max_positions,
    text_prefix_kv=integration.text_prefix_kv,
)
