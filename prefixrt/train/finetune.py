"""The fine-tuning baseline: the whole model trained on the same rows, with the same loop, batches and budget.

The paper compares prefix-tuning with fine-tuning (FINE-TUNE): every parameter of GPT-2 / BART trained on the
task's rows with the same objective. :func:`finetune` runs exactly the loop of :func:`prefixrt.train.train` --
same batch order, AdamW, warm-up and decay, gradient clipping, dev evaluation, checkpoints that resume, several
processes -- with the model's parameters as the trained set (one update group, clipped as a whole) and no prefix.
So "prefix-tuning vs fine-tuning on the same data and budget" is one flag of ``prefixrt train`` (``--finetune``).

>>> from prefixrt.train import RunOptions, TrainConfig, finetune
>>> from prefixrt.train.models import build_model                                   # doctest: +SKIP
>>> model = build_model("gpt2-tiny")                                                # doctest: +SKIP
>>> options = RunOptions(pad_token_id=50256, config=TrainConfig(lr=5e-5, batch_size=10, epochs=5))
>>> result = finetune(model, {"e2e": rows}, options)                                # doctest: +SKIP
>>> model.save_pretrained("runs/e2e-finetuned")                                     # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from prefixrt.tasks import Encoded
from prefixrt.train.config import RunOptions, TrainResult
from prefixrt.train.loop import run_training

__all__ = ["finetune"]


class _ModelTarget:
    """What a fine-tuning run trains: all of the model's parameters, one update group, no prefix."""

    kind = "finetune"
    title = "fine-tuning"

    def __init__(self, model: nn.Module):
        self.module = model
        self._requires_grad: list[bool] = []

    def check(self, model: nn.Module, data: Mapping[str, Sequence[Encoded]]) -> None:
        from prefixrt.hf import is_attached

        if model is not self.module:
            raise ValueError("the fine-tuning target is another model")
        if is_attached(model):
            raise ValueError("fine-tuning trains the plain model: detach its prefix source first")

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    def task_ids(self, tasks: Sequence[str]) -> dict[str, int]:
        return dict.fromkeys(tasks, -1)

    def parameters(self) -> list[nn.Parameter]:
        return list(self.module.parameters())  # tied weights once

    def groups(self) -> dict[str, list[nn.Parameter]]:
        return {"model": self.parameters()}

    def updates(self, group: str, present: set[str]) -> bool:
        """The model's one group is updated at every step that has rows."""
        return bool(present)

    def enter(self, model: nn.Module) -> None:
        self._requires_grad = [p.requires_grad for p in model.parameters()]
        model.requires_grad_(True)

    def exit(self, model: nn.Module) -> None:
        for p, flag in zip(model.parameters(), self._requires_grad, strict=True):
            p.requires_grad_(flag)

    def train(self, mode: bool = True) -> None:
        pass  # the loop switches the model itself

    def prefix_ids(self, task_ids: torch.Tensor) -> None:
        return None

    def attention_backend(self, model: nn.Module) -> None:
        """Fine-tuning runs the model's own attention: no prefix backend."""
        return None


def finetune(
    model: nn.Module,
    data: Mapping[str, Sequence[Encoded]],
    options: RunOptions | None = None,
    **overrides: Any,
) -> TrainResult:
    """Fine-tune all of ``model``'s parameters on ``data``: the baseline to prefix-tuning, same loop and budget.

    Parameters are those of :func:`prefixrt.train.train` without the tuner (``options`` a :class:`RunOptions`,
    or its fields as keywords): the rows of all tasks are mixed in every batch exactly as there (the model has
    no per-task parameters, so several tasks make one multi-task fine-tuned model); ``max_grad_norm`` clips the
    model's whole gradient; checkpoints hold the model's parameters (``kind="finetune"``) and resume bit for
    bit. The model is trained in place, in training mode (dropout on), and left in eval mode with its
    ``requires_grad`` flags as they were.

    Returns
    -------
    TrainResult
        ``trainable_parameters`` is the model's parameter count.
    """
    return run_training(_ModelTarget(model), model, data, options, **overrides)
