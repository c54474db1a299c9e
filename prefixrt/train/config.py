"""What a training run is told -- its hyper-parameters (:class:`TrainConfig`) and how it is run
(:class:`RunOptions`) -- and what it returns (:class:`TrainResult`)."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

    from prefixrt.tasks import Encoded
    from prefixrt.train.distributed import Dist

__all__ = ["RunOptions", "TrainConfig", "TrainResult"]


@dataclass
class TrainConfig:
    """Hyper-parameters of :func:`prefixrt.train.train`.

    Attributes
    ----------
    lr : float
        Peak learning rate of AdamW.
    batch_size : int
        Rows per batch (all tasks mixed); with several processes, the global batch (each process runs
        ``batch_size / world_size`` rows).
    epochs : int
        Passes over the union of the tasks' rows (ignored when ``max_steps`` is set).
    max_steps : int, optional
        Total optimizer steps; the schedule decays to 0 at this step.
    warmup_steps : int
        Linear warm-up from 0 to ``lr``, then linear decay to 0 (``get_linear_schedule_with_warmup``).
    weight_decay : float
        AdamW's decoupled weight decay (the paper's code: 0).
    max_grad_norm : float or None
        Clip each task's gradient to this norm (None: no clipping).
    seed : int
        Seeds the batch order (per epoch) and the global RNG (dropout) at the start of a run.
    gradient_checkpointing : bool
        Recompute the frozen model's activations in the backward pass (non-reentrant checkpointing).
    log_every : int
        Steps between rows of the loss log (each row averages the steps since the last one).
    save_every : int, optional
        Steps between checkpoints (with a checkpoint directory); one is always written at the end.
    betas, eps : AdamW's.
    """

    lr: float = 5e-5
    batch_size: int = 5
    epochs: int = 5
    max_steps: int | None = None
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    seed: int = 101
    gradient_checkpointing: bool = False
    log_every: int = 10
    save_every: int | None = None
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.epochs < 1 or self.log_every < 1:
            raise ValueError("batch_size, epochs and log_every must be >= 1")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")
        if self.save_every is not None and self.save_every < 1:
            raise ValueError(f"save_every must be >= 1, got {self.save_every}")
        if self.lr <= 0 or self.warmup_steps < 0:
            raise ValueError("lr must be > 0 and warmup_steps >= 0")
        self.betas = tuple(self.betas)


@dataclass
class RunOptions:
    """How :func:`prefixrt.train.train` and :func:`prefixrt.train.finetune` run, besides the data: the padding
    id, the hyper-parameters, checkpoints and logs, dev evaluation and the process group.

    >>> options = RunOptions(pad_token_id=50256, config=TrainConfig(max_steps=100), progress=False)
    >>> train(model, tuner, data, options)                                # doctest: +SKIP
    >>> train(model, tuner, data, options, stop_after=50)                 # doctest: +SKIP
    >>> train(model, tuner, data, pad_token_id=50256, progress=False)     # doctest: +SKIP

    Attributes
    ----------
    pad_token_id : int
        Input padding id (:func:`prefixrt.tasks.pad_token_id_for`).
    config : TrainConfig
        The hyper-parameters (None: the defaults). ``batch_size`` is the *global* batch: with ``world_size``
        processes each runs ``batch_size / world_size`` rows per step (it must divide).
    checkpoint_dir : path, optional
        Where ``checkpoint.safetensors`` is written (every ``save_every`` steps and at the end).
    resume : bool
        Continue from the checkpoint in ``checkpoint_dir`` when there is one (bit for bit: same parameters,
        optimizer, schedule, batch order and RNG as an uninterrupted run); its config and data must match.
    log_path, plot_path : path, optional
        The CSV loss log and the PNG loss curve (written at the end).
    progress : bool
        Show a tqdm progress bar (on stderr).
    stop_after : int, optional
        Stop (and checkpoint) once this many steps are done in total, without changing the schedule: the way to
        split one planned run into several sessions.
    dev_data : mapping task -> sequence of Encoded, optional
        Dev rows (tasks of the training data). Their loss (``dev_loss``, ``dev_loss/<task>``: mean cross-entropy
        over target tokens, in eval mode) is logged before the first step, every ``eval_every`` steps and at the
        end.
    eval_every : int, optional
        Steps between dev evaluations (default: only at the start and the end).
    eval_hook : callable ``(model, step) -> {name: value}``, optional
        Called at every dev evaluation with the model in eval mode (attached, when prefix-tuning; on rank 0
        only): e.g. dev BLEU from a few generations. Its values join the log row. It must not change the
        parameters.
    micro_batch_size : int, optional
        Rows per forward/backward inside a batch (gradients accumulated, so the update is the whole batch's);
        where a smaller batch runs faster on the device (caches, memory). Default: the whole batch at once.
    fast_modules : bool
        While training on the CPU, run the frozen model's dropout and tanh-GELU modules as prefixrt's
        vectorized Philox dropout and torch's fused GELU (:func:`prefixrt.hf.fast_training_modules`; the
        originals are back afterwards). Default True; False keeps torch's own modules (and its dropout masks).
    dist : Dist, optional
        The process group (default :meth:`Dist.current`): with several processes the data are sharded with
        :class:`~prefixrt.tasks.MixedTaskBatchSampler`, the trained gradients are summed with ``all_reduce``, and
        the loss normalization and the tasks that get an update are decided from the global batch, so the run
        matches one process on the whole batch (up to summation order; dropout masks differ). Only rank 0
        writes files and shows progress.
    """

    pad_token_id: int
    config: TrainConfig | None = None
    checkpoint_dir: str | os.PathLike | None = None
    resume: bool = False
    log_path: str | os.PathLike | None = None
    plot_path: str | os.PathLike | None = None
    progress: bool = True
    stop_after: int | None = None
    dev_data: Mapping[str, Sequence[Encoded]] | None = None
    eval_every: int | None = None
    eval_hook: Callable[[nn.Module, int], Mapping[str, float]] | None = None
    micro_batch_size: int | None = None
    fast_modules: bool = True
    dist: Dist | None = None

    def __post_init__(self) -> None:
        if self.micro_batch_size is not None and (
            not isinstance(self.micro_batch_size, int) or self.micro_batch_size < 1
        ):
            raise ValueError(f"micro_batch_size must be a positive int, got {self.micro_batch_size!r}")

    @classmethod
    def of(cls, options: RunOptions | None, overrides: Mapping[str, Any]) -> RunOptions:
        """``options`` with the fields named in ``overrides`` replaced; without ``options``, the overrides alone
        (which then must hold ``pad_token_id``).

        Raises TypeError for a name that is not a field, or an ``options`` that is not a RunOptions.
        """
        if options is not None and not isinstance(options, cls):
            raise TypeError(f"options must be a RunOptions, got {type(options).__name__}")
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(overrides) - set(names))
        if unknown:
            raise TypeError(f"unexpected keyword arguments {unknown}; the run options are {names}")
        if options is None:
            return cls(**overrides)
        return replace(options, **overrides)


@dataclass
class TrainResult:
    """What :func:`prefixrt.train.train` (or :func:`prefixrt.train.finetune`) did.

    Attributes
    ----------
    step : int
        Optimizer steps done in total (including those of a resumed run).
    total_steps : int
        Steps the schedule was planned for.
    log : list of dict
        The loss log rows (``step``, ``epoch``, ``lr``, ``loss`` and one loss per task, plus ``dev_loss``,
        ``dev_loss/<task>`` and eval-hook values on evaluation rows), resumed rows included.
    checkpoint : Path or None
        The last checkpoint written.
    log_path, plot_path : Path or None
    trainable_parameters : int
        Number of trained parameters (the tuner's, or the whole model's when fine-tuning).
    attention_backend : str or None
        The prefix-attention backend the training steps ran (``"cpp"``, ``"triton"``, ``"reference"``); None when
        fine-tuning (no prefix).
    """

    step: int
    total_steps: int
    log: list[dict[str, float]] = field(default_factory=list)
    checkpoint: Path | None = None
    log_path: Path | None = None
    plot_path: Path | None = None
    trainable_parameters: int = 0
    attention_backend: str | None = None

    @property
    def final_loss(self) -> float:
        """The last logged training loss."""
        losses = [r["loss"] for r in self.log if not math.isnan(r.get("loss", math.nan))]
        return losses[-1] if losses else math.nan

    @property
    def dev(self) -> list[dict[str, float]]:
        """The evaluation rows (those with ``dev_loss`` or eval-hook values), first to last."""
        return [r for r in self.log if any(k.startswith("dev_") and not math.isnan(v) for k, v in r.items())]
