"""Model families, one folder each (runner + what ``attach`` needs), and the registry that picks one for a model.

Adding a family: a folder like ``gpt2/`` with its ``FAMILY`` (:class:`~prefixrt.hf.models.base.ModelFamily`) and
one line in :data:`FAMILIES`.
"""

from __future__ import annotations

from torch import nn

from prefixrt.hf.models import bart, gpt2
from prefixrt.hf.models.base import ModelFamily, Runner, StepInputs

__all__ = [
    "FAMILIES",
    "ModelFamily",
    "Runner",
    "StepInputs",
    "family_for",
    "family_names",
    "find_family",
    "runner_for",
]

FAMILIES: dict[str, ModelFamily] = {family.model_type: family for family in (gpt2.FAMILY, bart.FAMILY)}


def find_family(config) -> ModelFamily | None:
    """The family of a model config (by ``config.model_type``), or None."""
    return FAMILIES.get(getattr(config, "model_type", None))


def family_names(joiner: str = "and") -> str:
    """``"GPT-2 and BART"``: the supported families, for messages."""
    names = [family.name for family in FAMILIES.values()]
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} {joiner} {names[-1]}"


def family_for(model: nn.Module) -> ModelFamily:
    """The family of ``model``; raises ``ValueError`` naming the supported ones."""
    family = find_family(getattr(model, "config", None))
    if family is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        raise ValueError(f"prefixrt supports {family_names()} models, got model_type={model_type!r}")
    return family


def runner_for(model: nn.Module, gemm: str = "auto") -> Runner:
    """The engine's forward for ``model`` (``GPT2LMHeadModel``, ``BartForConditionalGeneration``, ...);
    ``gemm`` picks how its weight matmuls run (:mod:`prefixrt.hf.models.gemm`)."""
    return family_for(model).runner(model, gemm=gemm)
