"""Pick the engine's forward for a model (GPT-2 or BART)."""

from __future__ import annotations

from torch import nn

from prefixrt.hf.models.bart import BartRunner
from prefixrt.hf.models.gpt2 import GPT2Runner

__all__ = ["runner_for"]


def runner_for(model: nn.Module) -> GPT2Runner | BartRunner:
    """The runner for ``model``; raises for anything but ``GPT2LMHeadModel`` / ``BartForConditionalGeneration``."""
    model_type = getattr(model.config, "model_type", None)
    if model_type == "gpt2":
        return GPT2Runner(model)
    if model_type == "bart":
        return BartRunner(model)
    raise ValueError(f"prefixrt's engine runs GPT-2 and BART models, got model_type={model_type!r}")
