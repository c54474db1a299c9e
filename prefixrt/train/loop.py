"""The training loop: mixed-task batches, AdamW with linear warm-up and decay, per-task gradient clipping,
periodic loss logging (CSV), a loss-curve plot (PNG), and checkpoints that resume bit for bit.

Each step draws one batch from the shuffled union of all tasks' rows (every row carries its task's prefix id),
runs the attached frozen model, and back-propagates the mean cross-entropy over the batch's target tokens (source
tokens are labelled ``-100``). Each row reaches only its own task's prefix; on top of that, a task without rows in
the batch gets no optimizer update at all (its gradients are set to None, so AdamW's momentum does not move it)
and gradients are clipped per task, so one task's large gradient does not shrink another's step. With one task
this is exactly the usual single-prefix training.
"""

from __future__ import annotations

import csv
import hashlib
import math
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prefixrt.fileio import atomic_write, atomic_write_text
from prefixrt.tasks import Collator, Encoded, MixedTaskBatchSampler, MixedTaskDataset, layout_for
from prefixrt.train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from prefixrt.train.tuner import PrefixTuner

__all__ = [
    "CHECKPOINT_FILE",
    "TrainConfig",
    "TrainResult",
    "linear_warmup_schedule",
    "lm_loss",
    "set_gradient_checkpointing",
    "train",
]

CHECKPOINT_FILE = "checkpoint.safetensors"

# Fields of TrainConfig that change the trajectory: a resumed run must agree on them.
_TRAJECTORY_FIELDS = (
    "lr",
    "batch_size",
    "epochs",
    "max_steps",
    "warmup_steps",
    "weight_decay",
    "max_grad_norm",
    "seed",
    "betas",
    "eps",
)


@dataclass
class TrainConfig:
    """Hyper-parameters of :func:`train`.

    Attributes
    ----------
    lr : float
        Peak learning rate of AdamW.
    batch_size : int
        Rows per batch (all tasks mixed).
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
    """What :func:`train` did.

    Attributes
    ----------
    step : int
        Optimizer steps done in total (including those of a resumed run).
    total_steps : int
        Steps the schedule was planned for.
    log : list of dict
        The loss log rows (``step``, ``epoch``, ``lr``, ``loss`` and one loss per task), resumed rows included.
    checkpoint : Path or None
        The last checkpoint written.
    log_path, plot_path : Path or None
    """

    step: int
    total_steps: int
    log: list[dict[str, float]] = field(default_factory=list)
    checkpoint: Path | None = None
    log_path: Path | None = None
    plot_path: Path | None = None

    @property
    def final_loss(self) -> float:
        return self.log[-1]["loss"] if self.log else math.nan


def linear_warmup_schedule(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up from 0 over ``warmup_steps``, then linear decay to 0 at ``total_steps``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / max(1, warmup_steps)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def set_gradient_checkpointing(model: nn.Module, enabled: bool) -> bool:
    """Switch the model's (non-reentrant) activation checkpointing on or off; returns whether it was on.

    Non-reentrant, because the frozen model's inputs do not require grad (a reentrant checkpoint would then cut
    the graph to the prefixes). transformers 5.24 renamed ``gradient_checkpointing_*`` to
    ``activation_checkpointing_*``; both spellings are handled.
    """
    was = getattr(model, "is_activation_checkpointing", None)
    if was is None:
        was = getattr(model, "is_gradient_checkpointing", False)
    if enabled:
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    elif hasattr(model, "activation_checkpointing_disable"):
        model.activation_checkpointing_disable()
    else:
        model.gradient_checkpointing_disable()
    return bool(was)


def lm_loss(
    model: nn.Module,
    batch: Mapping[str, torch.Tensor],
    prefix_ids: torch.Tensor,
    reduction: str = "mean",
    **model_kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cross-entropy over the target tokens of a batch, and its per-row sums.

    Parameters
    ----------
    model : attached GPT-2 or BART (``GPT2LMHeadModel`` / ``BartForConditionalGeneration``)
    batch : dict
        ``input_ids`` [B, T], ``attention_mask`` [B, T], ``labels`` ([B, T] causal, aligned with the inputs and
        ``-100`` on source and padding; [B, L] seq2seq decoder targets).
    prefix_ids : LongTensor [B]
    reduction : ``"mean"`` or ``"sum"``
        Mean over the batch's target tokens, or their sum.
    **model_kwargs
        Passed to the model (e.g. ``prefix_source``).

    Returns
    -------
    loss : Tensor []
        Mean (what ``model(..., labels=...).loss`` gives) or sum over all target tokens of the batch.
    row_loss : Tensor [B]
        Summed cross-entropy per row (detached).
    row_tokens : Tensor [B]
        Target tokens per row.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    labels = batch["labels"]
    kwargs: dict[str, Any] = {
        "attention_mask": batch["attention_mask"],
        "prefix_ids": prefix_ids,
        **model_kwargs,
    }
    # The base model, then the LM head at target positions only: the [B, T, vocab] logits of every position
    # (most of them source or padding) are never built.
    base = model.base_model
    if model.config.is_encoder_decoder:
        from transformers.models.bart.modeling_bart import shift_tokens_right

        kwargs["decoder_input_ids"] = shift_tokens_right(
            labels, model.config.pad_token_id, model.config.decoder_start_token_id
        )
        hidden = base(batch["input_ids"], use_cache=False, **kwargs).last_hidden_state  # [B, L, d]
        targets = labels
    else:
        hidden = base(batch["input_ids"], use_cache=False, **kwargs).last_hidden_state[:, :-1]  # [B, T-1, d]
        targets = labels[:, 1:]
    valid = targets != -100  # [B, T']
    rows = valid.nonzero()[:, 0]  # [N] row of each target token
    logits = model.get_output_embeddings()(hidden[valid])  # [N, vocab]
    bias = getattr(model, "final_logits_bias", None)  # BART
    if bias is not None:
        logits = logits + bias[0].to(logits.dtype)
    if logits.dtype not in (torch.float32, torch.float64):
        logits = logits.float()
    token_loss = nn.functional.cross_entropy(logits, targets[valid], reduction="none")  # [N]
    row_tokens = valid.sum(dim=1)
    row_loss = torch.zeros(labels.shape[0], dtype=token_loss.dtype, device=token_loss.device)
    row_loss.index_add_(0, rows, token_loss.detach())
    loss = token_loss.sum()
    if reduction == "mean":
        loss = loss / row_tokens.sum().clamp(min=1)
    return loss, row_loss, row_tokens


def _data_fingerprint(data: Mapping[str, Sequence[Encoded]]) -> str:
    h = hashlib.sha256()
    for name, rows in data.items():
        h.update(f"{name}:{len(rows)};".encode())
        for row in rows:
            h.update(repr((row.input_ids, row.labels)).encode())
    return h.hexdigest()[:16]


class _LossLog:
    """The CSV loss log: one row per ``log_every`` steps, rewritten atomically (small file)."""

    def __init__(self, path: Path | None, tasks: list[str]):
        self.path, self.tasks = path, tasks
        self.columns = ["step", "epoch", "lr", "loss", *[f"loss/{t}" for t in tasks]]
        self.rows: list[dict[str, float]] = []
        self._reset_window()

    def _reset_window(self) -> None:
        self.loss_sum, self.tokens = 0.0, 0
        self.task_sum = dict.fromkeys(self.tasks, 0.0)
        self.task_tokens = dict.fromkeys(self.tasks, 0)

    def window(self) -> dict[str, Any]:
        """The steps not yet logged (saved in checkpoints, so a resumed run logs exactly the same rows)."""
        return {
            "loss_sum": self.loss_sum,
            "tokens": self.tokens,
            "task_sum": self.task_sum,
            "task_tokens": self.task_tokens,
        }

    def resume(self, step: int, window: Mapping[str, Any] | None) -> None:
        """Keep the rows of an earlier run up to ``step`` (a run may have logged past its last checkpoint)."""
        if window:
            self.loss_sum, self.tokens = window["loss_sum"], window["tokens"]
            self.task_sum.update(window["task_sum"])
            self.task_tokens.update(window["task_tokens"])
        if self.path is None or not self.path.is_file():
            return
        with self.path.open(newline="") as fh:
            for row in csv.DictReader(fh):
                if int(row["step"]) <= step:
                    self.rows.append({k: float(v) if v != "" else math.nan for k, v in row.items()})

    def add(self, tasks: list[str], row_loss: torch.Tensor, row_tokens: torch.Tensor) -> None:
        for task, loss, tokens in zip(tasks, row_loss.tolist(), row_tokens.tolist(), strict=True):
            self.loss_sum += loss
            self.tokens += tokens
            self.task_sum[task] += loss
            self.task_tokens[task] += tokens

    def flush(self, step: int, epoch: float, lr: float) -> dict[str, float] | None:
        if self.tokens == 0:
            return None
        row = {"step": step, "epoch": epoch, "lr": lr, "loss": self.loss_sum / self.tokens}
        for t in self.tasks:
            row[f"loss/{t}"] = self.task_sum[t] / self.task_tokens[t] if self.task_tokens[t] else math.nan
        self.rows.append(row)
        self._reset_window()
        self.write()
        return row

    def write(self) -> None:
        if self.path is None:
            return
        lines = [",".join(self.columns)]
        for row in self.rows:
            lines.append(
                ",".join("" if math.isnan(row.get(c, math.nan)) else repr(row[c]) for c in self.columns)
            )
        atomic_write_text(self.path, "\n".join(lines) + "\n")


def plot_losses(rows: Sequence[Mapping[str, float]], tasks: Sequence[str], path: str | os.PathLike) -> bool:
    """Write the loss curve (all tasks, and each task) as a PNG; False when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, [r["loss"] for r in rows], label="all tasks", linewidth=2)
    if len(tasks) > 1:
        for t in tasks:
            ax.plot(steps, [r.get(f"loss/{t}", math.nan) for r in rows], label=t, linewidth=1)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (target tokens)")
    ax.set_title("prefix-tuning loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
    return True


def train(
    model: nn.Module,
    tuner: PrefixTuner,
    data: Mapping[str, Sequence[Encoded]],
    *,
    pad_token_id: int,
    config: TrainConfig | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    resume: bool = False,
    log_path: str | os.PathLike | None = None,
    plot_path: str | os.PathLike | None = None,
    progress: bool = True,
    stop_after: int | None = None,
) -> TrainResult:
    """Train ``tuner``'s prefixes on ``data`` through the frozen ``model``.

    Parameters
    ----------
    model : GPT-2 or BART
        Frozen here; attached to ``tuner`` for the run when it is not already (and detached afterwards). It runs
        in training mode (its own dropout active, as under PEFT); it is left in eval mode.
    tuner : PrefixTuner
        Must have a task for every key of ``data``.
    data : mapping task -> sequence of Encoded
        Tokenized training rows per task (:func:`prefixrt.tasks.encode_examples` in the model's layout).
    pad_token_id : int
        Input padding id (:func:`prefixrt.tasks.pad_token_id_for`).
    config : TrainConfig
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

    Returns
    -------
    TrainResult
    """
    from prefixrt.hf import binding_of, is_attached

    config = config or TrainConfig()
    unknown = sorted(set(data) - set(tuner.names))
    if unknown:
        raise ValueError(f"data has tasks {unknown} that the tuner does not train ({tuner.names})")
    empty = sorted(name for name, rows in data.items() if not rows)
    if not data or empty:
        raise ValueError(f"every task needs training rows; empty: {empty or 'no tasks given'}")
    if is_attached(model) and binding_of(model).bank is not tuner:
        raise ValueError("the model is attached to another prefix source; detach it first")
    model.requires_grad_(False)

    checkpoint_path = Path(checkpoint_dir) / CHECKPOINT_FILE if checkpoint_dir is not None else None
    if resume and checkpoint_path is None:
        raise ValueError("resume=True needs checkpoint_dir")
    task_names = list(data)
    dataset = MixedTaskDataset(data)
    sampler = MixedTaskBatchSampler(len(dataset), config.batch_size, shuffle=True, seed=config.seed)
    collate = Collator(
        pad_token_id, layout=layout_for(model), task_ids={t: tuner.id_of(t) for t in task_names}
    )
    steps_per_epoch = len(sampler)
    total_steps = config.max_steps or config.epochs * steps_per_epoch
    fingerprint = _data_fingerprint(data)

    optimizer = torch.optim.AdamW(
        tuner.parameters(), lr=config.lr, betas=config.betas, eps=config.eps, weight_decay=config.weight_decay
    )
    scheduler = linear_warmup_schedule(optimizer, config.warmup_steps, total_steps)
    log = _LossLog(Path(log_path) if log_path is not None else None, task_names)

    step = 0
    if resume and checkpoint_path.is_file():
        checkpoint = load_checkpoint(checkpoint_path)
        _check_resumable(checkpoint, config, fingerprint, total_steps)
        checkpoint.restore(tuner, optimizer, scheduler)
        step = int(checkpoint.trainer["step"])
        log.resume(step, checkpoint.trainer.get("log_window"))
    else:
        torch.manual_seed(config.seed)

    def trainer_state() -> dict[str, Any]:
        return {
            "step": step,
            "total_steps": total_steps,
            "config": asdict(config),
            "data": fingerprint,
            "tasks": task_names,
            "log_window": log.window(),
        }

    def save() -> None:
        if checkpoint_path is not None:
            save_checkpoint(checkpoint_path, tuner, optimizer, scheduler, trainer_state())

    task_params = {t: tuner.task_parameters(t) for t in tuner.names}
    end = total_steps if stop_after is None else min(total_steps, stop_after)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total_steps, initial=step, desc="prefix-tuning", unit="step", file=sys.stderr)
    attached_here = not is_attached(model)
    if attached_here:
        tuner.attach(model)
    checkpointing_was = None
    if config.gradient_checkpointing:
        checkpointing_was = set_gradient_checkpointing(model, True)
    model.train()
    tuner.train()
    try:
        while step < end:
            epoch, position = divmod(step, steps_per_epoch)
            sampler.set_epoch(epoch)
            for indices in list(sampler)[position:]:
                batch = collate([dataset[i] for i in indices])
                prefix_ids = batch["task_ids"].to(tuner.device)
                tensors = {k: batch[k].to(tuner.device) for k in ("input_ids", "attention_mask", "labels")}
                loss, row_loss, row_tokens = lm_loss(model, tensors, prefix_ids)
                loss.backward()
                present = set(batch["tasks"])
                for task, params in task_params.items():
                    if task not in present:
                        for p in params:
                            p.grad = None
                    elif config.max_grad_norm is not None:
                        torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
                lr = optimizer.param_groups[0]["lr"]
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                log.add(batch["tasks"], row_loss, row_tokens)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss.item():.4f}")
                if step % config.log_every == 0 or step == total_steps:
                    log.flush(step, step / steps_per_epoch, lr)
                if config.save_every and step % config.save_every == 0 and step < end:
                    save()
                if step >= end:
                    break
        save()
    finally:
        if bar is not None:
            bar.close()
        model.eval()
        tuner.eval()
        if checkpointing_was is False:
            set_gradient_checkpointing(model, False)
        if attached_here:
            tuner.detach(model)
    result = TrainResult(step, total_steps, list(log.rows), checkpoint_path, log.path)
    if plot_path is not None and log.rows and plot_losses(log.rows, task_names, plot_path):
        result.plot_path = Path(plot_path)
    return result


def _check_resumable(checkpoint, config: TrainConfig, fingerprint: str, total_steps: int) -> None:
    saved = checkpoint.trainer
    saved_config = saved.get("config", {})
    now = asdict(config)
    diffs = [
        f"{k}: checkpoint {saved_config.get(k)!r}, now {now[k]!r}"
        for k in _TRAJECTORY_FIELDS
        if _norm(saved_config.get(k)) != _norm(now[k])
    ]
    if saved.get("data") != fingerprint:
        diffs.append("the training data differ (rows, tokenization or task order)")
    if saved.get("total_steps") != total_steps:
        diffs.append(f"total steps: checkpoint {saved.get('total_steps')}, now {total_steps}")
    if diffs:
        raise CheckpointError(f"{checkpoint.path} cannot resume this run: " + "; ".join(diffs))


def _norm(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value
