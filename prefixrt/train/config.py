"""What a training run is told (:class:`TrainConfig`) and what it returns (:class:`TrainResult`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["TrainConfig", "TrainResult"]


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
    """

    step: int
    total_steps: int
    log: list[dict[str, float]] = field(default_factory=list)
    checkpoint: Path | None = None
    log_path: Path | None = None
    plot_path: Path | None = None
    trainable_parameters: int = 0

    @property
    def final_loss(self) -> float:
        """The last logged training loss."""
        losses = [r["loss"] for r in self.log if not math.isnan(r.get("loss", math.nan))]
        return losses[-1] if losses else math.nan

    @property
    def dev(self) -> list[dict[str, float]]:
        """The evaluation rows (those with ``dev_loss`` or eval-hook values), first to last."""
        return [r for r in self.log if any(k.startswith("dev_") and not math.isnan(v) for k, v in r.items())]
