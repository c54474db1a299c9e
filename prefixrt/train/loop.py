"""The training loop: mixed-task batches, AdamW with linear warm-up and decay, per-task gradient clipping,
periodic loss logging (CSV) with dev evaluation, a loss-curve plot (PNG), checkpoints that resume bit for bit,
and several processes (``torchrun``) that take the steps of one.

Each step draws one batch from the shuffled union of all tasks' rows (every row carries its task's prefix id),
runs the attached frozen model, and back-propagates the mean cross-entropy over the batch's target tokens (source
tokens are labelled ``-100``). Each row reaches only its own task's prefix; on top of that, a task without rows in
the batch gets no optimizer update at all (its gradients are set to None, so AdamW's momentum does not move it)
and gradients are clipped per task, so one task's large gradient does not shrink another's step. With one task
this is exactly the usual single-prefix training.

The same loop (:func:`run_training`) runs the fine-tuning baseline (:func:`prefixrt.train.finetune`): the whole
model is trained instead of the prefixes, with the same batches, schedule and budget. With several processes
(:mod:`prefixrt.train.distributed`) each takes a slice of every global batch, the trained parameters' gradients
are summed with ``all_reduce``, and the normalization and the per-task update rule come from the global batch.
"""

from __future__ import annotations

import contextlib
import hashlib
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prefixrt.tasks import Collator, Encoded, MixedTaskBatchSampler, MixedTaskDataset, layout_for
from prefixrt.train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from prefixrt.train.config import RunOptions, TrainConfig, TrainResult
from prefixrt.train.dev import DevSet
from prefixrt.train.distributed import Dist, all_reduce_grads
from prefixrt.train.loss import lm_loss, target_tokens
from prefixrt.train.loss_log import LossLog, plot_losses
from prefixrt.train.tuner import PrefixTuner

__all__ = [
    "CHECKPOINT_FILE",
    "RunOptions",
    "TrainConfig",
    "TrainResult",
    "linear_warmup_schedule",
    "lm_loss",
    "plot_losses",
    "run_training",
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


def fused_adamw_ok(params: list[torch.Tensor]) -> bool:
    """Whether torch's fused AdamW (one vectorized kernel for all tensors; on a CPU ~7x the per-tensor loop for
    the paper's reparameterization) can take these parameters: floating point, on a CPU or a CUDA device. It is
    what HF's Trainer picks by default too."""
    return bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)


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


def _data_fingerprint(data: Mapping[str, Sequence[Encoded]]) -> str:
    h = hashlib.sha256()
    for name, rows in data.items():
        h.update(f"{name}:{len(rows)};".encode())
        for row in rows:
            h.update(repr((row.input_ids, row.labels)).encode())
    return h.hexdigest()[:16]


class _PrefixTarget:
    """What a prefix-tuning run trains: the tuner's parameters, one update group per task.

    The other target is :class:`prefixrt.train.finetune._ModelTarget` (the whole model, one group). The loop
    asks a target for its parameters and groups, the collator's prefix ids, and how to enter and leave a run.
    """

    kind = "prefix"
    title = "prefix-tuning"

    def __init__(self, tuner: PrefixTuner):
        self.tuner = tuner
        self.module = tuner
        self._attached_here = False

    def check(self, model: nn.Module, data: Mapping[str, Sequence[Encoded]]) -> None:
        from prefixrt.hf import binding_of, is_attached

        unknown = sorted(set(data) - set(self.tuner.names))
        if unknown:
            raise ValueError(f"data has tasks {unknown} that the tuner does not train ({self.tuner.names})")
        if is_attached(model) and binding_of(model).bank is not self.tuner:
            raise ValueError("the model is attached to another prefix source; detach it first")

    @property
    def device(self) -> torch.device:
        return self.tuner.device

    def task_ids(self, tasks: Sequence[str]) -> dict[str, int]:
        return {t: self.tuner.id_of(t) for t in tasks}

    def parameters(self) -> list[nn.Parameter]:
        return list(self.tuner.parameters())

    def groups(self) -> dict[str, list[nn.Parameter]]:
        """Update groups: a group whose task has no rows in the global batch gets no update."""
        return {t: self.tuner.task_parameters(t) for t in self.tuner.names}

    def updates(self, group: str, present: set[str]) -> bool:
        """Whether a group gets this step's update: its task has rows in the global batch."""
        return group in present

    def enter(self, model: nn.Module) -> None:
        from prefixrt.hf import is_attached

        model.requires_grad_(False)
        self._attached_here = not is_attached(model)
        if self._attached_here:
            self.tuner.attach(model)

    def exit(self, model: nn.Module) -> None:
        if self._attached_here:
            self.tuner.detach(model)
            self._attached_here = False

    def train(self, mode: bool = True) -> None:
        self.tuner.train(mode)

    def prefix_ids(self, task_ids: torch.Tensor) -> torch.Tensor | None:
        """What the model gets as ``prefix_ids`` for rows of these collator ids."""
        return task_ids

    def attention_backend(self, model: nn.Module) -> str | None:
        """The backend the attached model's training calls run (with its dropout, needing gradients)."""
        from prefixrt.hf import training_backend

        return training_backend(model)


def train(
    model: nn.Module,
    tuner: PrefixTuner,
    data: Mapping[str, Sequence[Encoded]],
    options: RunOptions | None = None,
    **overrides: Any,
) -> TrainResult:
    """Train ``tuner``'s prefixes on ``data`` through the frozen ``model``.

    >>> train(model, tuner, data, RunOptions(pad_token_id=50256, config=TrainConfig(lr=5e-5)))  # doctest: +SKIP
    >>> train(model, tuner, data, pad_token_id=50256, config=TrainConfig(lr=5e-5))            # doctest: +SKIP

    Parameters
    ----------
    model : GPT-2 or BART
        Frozen here; attached to ``tuner`` for the run when it is not already (and detached afterwards). It runs
        in training mode (its own dropout active, as under PEFT); it is left in eval mode.
    tuner : PrefixTuner
        Must have a task for every key of ``data``.
    data : mapping task -> sequence of Encoded
        Tokenized training rows per task (:func:`prefixrt.tasks.encode_examples` in the model's layout).
    options : RunOptions, optional
        How to run: ``pad_token_id``, the :class:`TrainConfig`, checkpoints and resuming, the loss log and plot,
        progress, dev evaluation, the process group (see :class:`RunOptions`).
    **overrides
        Fields of :class:`RunOptions` by name: they replace those of ``options``, or, without ``options``, are
        the options (``pad_token_id`` then among them).

    Returns
    -------
    TrainResult
    """
    return run_training(_PrefixTarget(tuner), model, data, options, **overrides)


def run_training(
    target: Any,
    model: nn.Module,
    data: Mapping[str, Sequence[Encoded]],
    options: RunOptions | None = None,
    **overrides: Any,
) -> TrainResult:
    """The loop behind :func:`train` and :func:`prefixrt.train.finetune`; ``target`` says what is trained."""
    options = RunOptions.of(options, overrides)
    config = options.config or TrainConfig()
    dist = options.dist or Dist.current()
    dev_data, eval_every = options.dev_data, options.eval_every
    target.check(model, data)
    empty = sorted(name for name, rows in data.items() if not rows)
    if not data or empty:
        raise ValueError(f"every task needs training rows; empty: {empty or 'no tasks given'}")
    if dev_data is not None:
        unknown = sorted(set(dev_data) - set(data))
        if unknown:
            raise ValueError(f"dev_data has tasks {unknown} without training data ({list(data)})")
        dev_data = {t: rows for t, rows in dev_data.items() if rows}
    if eval_every is not None and eval_every < 1:
        raise ValueError(f"eval_every must be >= 1, got {eval_every}")
    if config.batch_size % dist.world_size:
        raise ValueError(
            f"batch_size {config.batch_size} (the global batch) must be a multiple of the number of processes "
            f"({dist.world_size})"
        )

    checkpoint_dir, log_path = options.checkpoint_dir, options.log_path
    checkpoint_path = Path(checkpoint_dir) / CHECKPOINT_FILE if checkpoint_dir is not None else None
    if options.resume and checkpoint_path is None:
        raise ValueError("resume=True needs checkpoint_dir")
    task_names = list(data)
    layout = layout_for(model)
    dataset = MixedTaskDataset(data)
    num_rows = len(dataset)
    # Each process takes an interleaved slice of the same global batch; the sampler repeats up to world_size - 1
    # rows at the end of an epoch to even the slices out, and those repeats are dropped below (global position
    # >= num_rows), so every epoch is exactly the one-process epoch.
    sampler = MixedTaskBatchSampler(
        num_rows,
        config.batch_size // dist.world_size,
        shuffle=True,
        seed=config.seed,
        rank=dist.rank,
        world_size=dist.world_size,
    )
    collate = Collator(options.pad_token_id, layout=layout, task_ids=target.task_ids(task_names))
    steps_per_epoch = len(sampler)
    total_steps = config.max_steps or config.epochs * steps_per_epoch
    fingerprint = _data_fingerprint(data)
    device = target.device

    params = list(target.parameters())
    optimizer = torch.optim.AdamW(
        params,
        lr=config.lr,
        betas=config.betas,
        eps=config.eps,
        weight_decay=config.weight_decay,
        fused=fused_adamw_ok(params),
    )
    scheduler = linear_warmup_schedule(optimizer, config.warmup_steps, total_steps)
    log = LossLog(Path(log_path) if log_path is not None and dist.is_main else None, task_names)

    step = 0
    if options.resume and checkpoint_path.is_file():
        checkpoint = load_checkpoint(checkpoint_path)
        _check_resumable(checkpoint, config, fingerprint, total_steps)
        checkpoint.restore(target.module, optimizer, scheduler)
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
        if checkpoint_path is not None and dist.is_main:
            save_checkpoint(checkpoint_path, target.module, optimizer, scheduler, trainer_state())

    groups = target.groups()
    task_index = {t: i for i, t in enumerate(task_names)}
    dev = None
    if dev_data:
        dev = DevSet(dev_data, collate, task_names, config.batch_size, layout, dist)

    def evaluate() -> None:
        metrics: dict[str, float] = {}
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.no_grad():  # evaluation never moves the RNG
            model.eval()
            target.train(False)
            try:
                if dev is not None:
                    metrics.update(dev.loss(model, target))
                if options.eval_hook is not None and dist.is_main:
                    metrics.update(options.eval_hook(model, step))
            finally:
                model.train()
                target.train(True)
        if metrics:
            row = log.record(step, step / steps_per_epoch, metrics)
            if bar is not None and "dev_loss" in row:
                bar.write(f"step {step}: dev loss {row['dev_loss']:.4f}")

    evaluating = dev is not None or options.eval_hook is not None
    end = total_steps if options.stop_after is None else min(total_steps, options.stop_after)
    bar = None
    if options.progress and dist.is_main:
        from tqdm.auto import tqdm

        bar = tqdm(total=total_steps, initial=step, desc=target.title, unit="step", file=sys.stderr)
    target.enter(model)
    modules = contextlib.ExitStack()
    if options.fast_modules:
        from prefixrt.hf import fast_training_modules

        modules.enter_context(fast_training_modules(model))
    checkpointing_was = None
    if config.gradient_checkpointing:
        checkpointing_was = set_gradient_checkpointing(model, True)
    model.train()
    target.train(True)
    backend = target.attention_backend(model)  # in train mode: with the attention dropout HF will pass
    if backend is not None and options.progress and dist.is_main:
        print(f"{target.title}: prefix attention runs the {backend!r} backend", file=sys.stderr)
    try:
        if evaluating and step == 0 and end > 0:
            evaluate()
        while step < end:
            epoch, position = divmod(step, steps_per_epoch)
            sampler.set_epoch(epoch)
            for index, indices in enumerate(list(sampler)[position:], start=position):
                if dist.enabled:  # drop the rows the sampler repeats to even out the last global batch
                    first = index * config.batch_size + dist.rank
                    indices = [i for j, i in enumerate(indices) if first + dist.world_size * j < num_rows]
                batch = collate([dataset[i] for i in indices]) if indices else None
                # -- what the global batch holds: rows per task and target tokens (one all_reduce) --
                counts = torch.zeros(len(task_names) + 1, dtype=torch.float64, device=device)
                if batch is not None:
                    tensors = {k: batch[k].to(device) for k in ("input_ids", "attention_mask", "labels")}
                    tokens = target_tokens(tensors["labels"], layout)
                    for task in batch["tasks"]:
                        counts[task_index[task]] += 1
                    counts[-1] = float(tokens.sum())
                dist.all_reduce_(counts)
                present = {t for t in task_names if counts[task_index[t]] > 0}
                global_tokens = max(int(counts[-1]), 1)
                # -- forward / backward on the local shard; the loss is the global batch's token mean --
                stats = torch.zeros(2, len(task_names), dtype=torch.float64, device=device)
                if batch is not None:
                    prefix_ids = target.prefix_ids(batch["task_ids"].to(device))
                    tasks_of_rows = torch.tensor([task_index[t] for t in batch["tasks"]], device=device)
                    for rows in _micro_batches(len(batch["tasks"]), options.micro_batch_size):
                        loss_sum, row_loss, row_tokens = lm_loss(
                            model,
                            {k: v[rows] for k, v in tensors.items()},
                            None if prefix_ids is None else prefix_ids[rows],
                            reduction="sum",
                        )
                        (
                            loss_sum / global_tokens
                        ).backward()  # summed over micro-batches: the batch's gradient
                        stats[0].index_add_(0, tasks_of_rows[rows], row_loss.to(stats.dtype))
                        stats[1].index_add_(0, tasks_of_rows[rows], row_tokens.to(stats.dtype))
                all_reduce_grads(params, dist)
                # -- per-group update rule, decided from the global batch --
                for group, group_params in groups.items():
                    if not target.updates(group, present):
                        for p in group_params:
                            p.grad = None
                    elif config.max_grad_norm is not None:
                        torch.nn.utils.clip_grad_norm_(group_params, config.max_grad_norm)
                lr = optimizer.param_groups[0]["lr"]
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                dist.all_reduce_(stats)
                sums, toks = stats.tolist()
                log.add_totals(
                    {t: sums[i] for t, i in task_index.items()},
                    {t: int(toks[i]) for t, i in task_index.items()},
                )
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{sum(sums) / max(sum(toks), 1):.4f}")
                if step % config.log_every == 0 or step == total_steps:
                    log.flush(step, step / steps_per_epoch, lr)
                if evaluating and ((eval_every and step % eval_every == 0) or step == total_steps):
                    evaluate()
                if config.save_every and step % config.save_every == 0 and step < end:
                    save()
                if step >= end:
                    break
        save()
    finally:
        if bar is not None:
            bar.close()
        model.eval()
        target.train(False)
        if checkpointing_was is False:
            set_gradient_checkpointing(model, False)
        modules.close()
        target.exit(model)
    dist.barrier()  # rank 0's checkpoint is complete before any process goes on
    result = TrainResult(
        step,
        total_steps,
        list(log.rows),
        checkpoint_path,
        log.path,
        trainable_parameters=sum(p.numel() for p in params),
        attention_backend=backend,
    )
    if options.plot_path is not None and dist.is_main and log.rows:
        if plot_losses(log.rows, task_names, options.plot_path, title=f"{target.title} loss"):
            result.plot_path = Path(options.plot_path)
    return result


def _micro_batches(rows: int, size: int | None) -> list[slice]:
    """Row slices of at most ``size`` rows covering ``0 .. rows - 1`` (one slice when ``size`` is None)."""
    size = size or rows
    return [slice(start, min(start + size, rows)) for start in range(0, rows, size)]


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
