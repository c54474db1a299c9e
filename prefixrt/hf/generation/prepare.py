"""Pass ``prefix_ids`` through Hugging Face ``generate()``.

``generate`` validates its keyword arguments against ``prepare_inputs_for_generation``'s signature (transformers
5.24 rejects unknown ones), expands tensors in ``model_kwargs`` for beams and ``num_return_sequences``
(``prefix_ids [B]`` becomes ``[B * k]``, each copy next to its source row), and hands ``model_kwargs`` to the
encoder of an encoder-decoder model. So an instance-level ``prepare_inputs_for_generation`` that names
``prefix_ids`` and puts it into every step's inputs is all that is needed; beam reordering never has to touch it
because the beams of one input share its prefix.

Continuous batching (``generate(cache_implementation="paged")``, ``generate_batch``, ``init_continuous_batching``)
runs transformers' paged attention, which never reads the bank: the instance-level ``init_continuous_batching``
(every entry point goes through it) refuses it with :class:`UnsupportedContinuousBatching`.
"""

from __future__ import annotations

import types

import torch
from torch import nn

__all__ = ["UnsupportedContinuousBatching", "install", "uninstall"]

PATCHED = ("prepare_inputs_for_generation", "init_continuous_batching")


class UnsupportedContinuousBatching(ValueError):
    """transformers' continuous batching on an attached model (the message says what to use instead)."""


def _prepare_inputs_with_prefix(self, *args, prefix_ids: torch.Tensor | None = None, **kwargs):
    model_inputs = type(self).prepare_inputs_for_generation(self, *args, **kwargs)
    if prefix_ids is not None:
        model_inputs["prefix_ids"] = prefix_ids
    return model_inputs


def _refuse_continuous_batching(self, *args, **kwargs):
    raise UnsupportedContinuousBatching(
        "prefixrt: continuous batching (generate(cache_implementation='paged'), generate_batch, "
        "init_continuous_batching) is not supported on an attached model: transformers' paged attention does not "
        "read the prefix bank. prefixrt.Engine serves mixed-prefix requests with continuous batching."
    )


def install(model: nn.Module) -> None:
    if hasattr(model, "prepare_inputs_for_generation"):
        model.prepare_inputs_for_generation = types.MethodType(_prepare_inputs_with_prefix, model)
    if hasattr(model, "init_continuous_batching"):
        model.init_continuous_batching = types.MethodType(_refuse_continuous_batching, model)


def uninstall(model: nn.Module) -> None:
    for name in PATCHED:
        if name in vars(model):
            delattr(model, name)
