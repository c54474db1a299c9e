"""Pass ``prefix_ids`` through Hugging Face ``generate()``.

``generate`` validates its keyword arguments against ``prepare_inputs_for_generation``'s signature (transformers
5.24 rejects unknown ones), expands tensors in ``model_kwargs`` for beams and ``num_return_sequences``
(``prefix_ids [B]`` becomes ``[B * k]``, each copy next to its source row), and hands ``model_kwargs`` to the
encoder of an encoder-decoder model. So an instance-level ``prepare_inputs_for_generation`` that names
``prefix_ids`` and puts it into every step's inputs is all that is needed; beam reordering never has to touch it
because the beams of one input share its prefix.
"""

from __future__ import annotations

import types

import torch
from torch import nn

__all__ = ["install", "uninstall"]


def _prepare_inputs_with_prefix(self, *args, prefix_ids: torch.Tensor | None = None, **kwargs):
    model_inputs = type(self).prepare_inputs_for_generation(self, *args, **kwargs)
    if prefix_ids is not None:
        model_inputs["prefix_ids"] = prefix_ids
    return model_inputs


def install(model: nn.Module) -> None:
    if hasattr(model, "prepare_inputs_for_generation"):
        model.prepare_inputs_for_generation = types.MethodType(_prepare_inputs_with_prefix, model)


def uninstall(model: nn.Module) -> None:
    if "prepare_inputs_for_generation" in vars(model):
        del model.prepare_inputs_for_generation
