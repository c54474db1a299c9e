"""The training benchmark behind ``prefixrt bench train``: one prefix-tuning step, three ways, in one run.

Workload: a model of real size with seeded random weights (GPT-2-small, or BART-base with prefixes at all three
sites), ``tasks x rows_per_task`` rows of ``seq_len`` random tokens (BART: sources and targets of that length),
dropout on as in the model's config (0.1), the paper's MLP reparameterization (``mid_dim`` 512), AdamW (torch's
fused kernel, as ``prefixrt train`` and HF's Trainer use it).

Arms (same model, same rows):

* ``prefixrt`` -- :class:`prefixrt.PrefixTuner` attached to the model, one mixed batch of every task's rows per
  step, the loss of :func:`prefixrt.train.lm_loss`, the model's dropout and GELU modules swapped for prefixrt's
  (:func:`prefixrt.hf.fast_training_modules`): what ``prefixrt train`` runs;
* ``prefixrt_torch_modules`` -- GPT-2 only (the one whose modules are swapped): ``prefixrt`` with torch's own
  dropout and GELU modules, as ``prefixrt train --torch-modules``; against ``frozen_base`` it isolates what the
  prefixes cost;
* ``peft`` -- HF PEFT's own prefix tuning, one adapter per task, one task per step (``tasks`` steps of
  ``rows_per_task`` rows make one step of the same rows): PEFT cannot mix prefixes in a batch;
* ``prefixrt_peft_sites`` -- BART only: prefixrt on the sites PEFT trains (decoder self-attention and
  cross-attention; PEFT puts no prefix on the encoder, so its backward never runs through the encoder): the same
  work as ``peft``, mixed;
* ``frozen_base`` -- the frozen model without any prefix on the same batch, backpropagated to its input
  embeddings: the floor (a prefix's gradient needs the backward through every layer; only the prefix work is
  missing).

A step is forward + backward + optimizer update; each arm runs ``warmup`` untimed steps, then ``steps`` timed
ones; the figure is tokens per second over the timed steps (every row's tokens, source and target for BART).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch

__all__ = ["ARMS", "PEFT_SITES", "SWAPPED_MODULES", "TrainWorkload", "build_model", "run_arm"]

ARMS = ("prefixrt", "peft", "frozen_base", "prefixrt_peft_sites", "prefixrt_torch_modules")
PEFT_SITES = {
    "bart": ("decoder", "cross")
}  # the sites PEFT's prefix tuning trains, where they differ from ours
SWAPPED_MODULES = ("gpt2",)  # the models whose modules fast_training_modules swaps (dropout, tanh GELU)


@dataclass(frozen=True)
class TrainWorkload:
    model: str = "gpt2"  # "gpt2" (GPT-2-small shapes) or "bart" (BART-base shapes, three sites)
    tasks: int = 8
    rows_per_task: int = 4
    seq_len: int = 64
    prefix_len: int = 10
    mid_dim: int = 512
    steps: int = 3
    warmup: int = 1
    lr: float = 5e-5
    seed: int = 0
    small: bool = False  # a 2-layer, 64-wide model (tests)

    @property
    def rows(self) -> int:
        return self.tasks * self.rows_per_task

    @property
    def tokens_per_step(self) -> int:
        return self.rows * self.seq_len * (2 if self.model == "bart" else 1)

    def to_dict(self) -> dict:
        return asdict(self)


def build_model(workload: TrainWorkload):
    """The model in train mode (dropout on), frozen; random weights from the workload's seed."""
    from prefixrt.train.models import build_model as builtin

    name = {"gpt2": "gpt2-small", "bart": "bart-base"}[workload.model]
    if workload.small:
        name = {"gpt2": "gpt2-tiny", "bart": "bart-tiny"}[workload.model]
    model = builtin(name, seed=workload.seed)
    model.requires_grad_(False)
    return model.train()


def _batch(workload: TrainWorkload, vocab: int) -> dict[str, torch.Tensor]:
    """``input_ids``/``attention_mask``/``labels`` ``[rows, T]`` (BART: plus decoder targets as labels);
    task ``i`` owns rows ``i * rows_per_task ..``."""
    g = torch.Generator().manual_seed(workload.seed + 1)
    ids = torch.randint(3, vocab, (workload.rows, workload.seq_len), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if workload.model == "bart":
        batch["labels"] = torch.randint(3, vocab, (workload.rows, workload.seq_len), generator=g)
    else:
        batch["labels"] = ids.clone()
    return batch


def _rows_of(workload: TrainWorkload, task: int) -> slice:
    return slice(task * workload.rows_per_task, (task + 1) * workload.rows_per_task)


def _timed(step, workload: TrainWorkload) -> dict:
    for _ in range(workload.warmup):
        step()
    times = []
    for _ in range(workload.steps):
        start = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - start)
    seconds = sum(times) / len(times)
    return {
        "step_s": seconds,
        "step_s_all": times,
        "tokens_per_s": workload.tokens_per_step / seconds,
        "last_loss": float(loss),
    }


def _prefixrt(model, workload: TrainWorkload, backend: str, sites=None, fast_modules: bool = True) -> dict:
    import contextlib

    import prefixrt
    from prefixrt.hf import binding_of, fast_training_modules
    from prefixrt.ops import AttentionCall, select_backend
    from prefixrt.train import lm_loss

    names = [f"task{i}" for i in range(workload.tasks)]
    tuner = prefixrt.PrefixTuner(
        model,
        dict.fromkeys(names, workload.prefix_len),
        mid_dim=workload.mid_dim,
        seed=workload.seed,
        sites=sites,
    )
    tuner.train()
    batch = _batch(workload, model.config.vocab_size)
    prefix_ids = torch.arange(workload.rows) // workload.rows_per_task
    optimizer = torch.optim.AdamW(tuner.parameters(), lr=workload.lr, fused=True)  # as prefixrt train
    tuner.attach(model, backend=backend)
    modules = contextlib.ExitStack()
    try:
        swapped = modules.enter_context(fast_training_modules(model)) if fast_modules else 0
        spec = next(iter(tuner.spec.sites.values()))
        q = torch.empty(1, spec.num_heads, workload.seq_len, spec.head_dim)
        dropout = float(getattr(model.config, "attn_pdrop", getattr(model.config, "attention_dropout", 0.0)))
        call = AttentionCall.of(q, q, True, dropout, True)
        ran = select_backend(binding_of(model).backend, call).name

        def step():
            loss = lm_loss(model, batch, prefix_ids)[0]
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss.detach()

        result = _timed(step, workload)
    finally:
        modules.close()
        tuner.detach(model)
    result["backend"] = ran
    result["swapped_modules"] = swapped
    result["trainable_parameters"] = sum(p.numel() for p in tuner.parameters())
    return result


def _peft(model, workload: TrainWorkload) -> dict:
    from peft import PrefixTuningConfig, TaskType, get_peft_model

    task_type = TaskType.SEQ_2_SEQ_LM if workload.model == "bart" else TaskType.CAUSAL_LM
    config = PrefixTuningConfig(
        task_type=task_type,
        num_virtual_tokens=workload.prefix_len,
        prefix_projection=True,
        encoder_hidden_size=workload.mid_dim,
    )
    names = [f"task{i}" for i in range(workload.tasks)]
    peft_model = get_peft_model(model, config, adapter_name=names[0])
    for name in names[1:]:
        peft_model.add_adapter(name, config)
    peft_model.train()
    optimizers = {}
    for name in names:
        params = [p for n, p in peft_model.named_parameters() if f".{name}." in n or n.endswith(f".{name}")]
        for p in params:
            p.requires_grad_(True)
        optimizers[name] = torch.optim.AdamW(params, lr=workload.lr, fused=True)  # HF Trainer's default
    batch = _batch(workload, model.config.vocab_size)

    def step():
        total = 0.0
        for i, name in enumerate(names):
            peft_model.set_adapter(name)
            rows = _rows_of(workload, i)
            loss = peft_model(**{k: v[rows] for k, v in batch.items()}).loss
            loss.backward()
            optimizers[name].step()
            optimizers[name].zero_grad(set_to_none=True)
            total += float(loss.detach()) / len(names)
        return torch.tensor(total)

    result = _timed(step, workload)
    result["trainable_parameters"] = sum(
        p.numel() for opt in optimizers.values() for group in opt.param_groups for p in group["params"]
    )
    return result


def _frozen_base(model, workload: TrainWorkload) -> dict:
    batch = _batch(workload, model.config.vocab_size)
    embed = model.get_input_embeddings()

    def step():
        embeds = embed(batch["input_ids"]).detach().requires_grad_(True)
        inputs = {k: v for k, v in batch.items() if k != "input_ids"}
        loss = model(inputs_embeds=embeds, **inputs).loss
        loss.backward()
        return loss.detach()

    return _timed(step, workload)


def run_arm(name: str, workload: TrainWorkload, backend: str = "auto") -> dict:
    """Time one arm on a model of its own (the same seeded weights for every arm; PEFT changes the model it
    wraps); returns ``{"step_s", "tokens_per_s", "last_loss", ...}``."""
    model = build_model(workload)
    torch.manual_seed(workload.seed)
    if name == "prefixrt":
        return _prefixrt(model, workload, backend)
    if name == "prefixrt_peft_sites":
        if workload.model not in PEFT_SITES:
            raise ValueError(
                f"prefixrt_peft_sites is for {sorted(PEFT_SITES)}: on {workload.model} it is prefixrt"
            )
        return _prefixrt(model, workload, backend, sites=PEFT_SITES[workload.model])
    if name == "prefixrt_torch_modules":
        if workload.model not in SWAPPED_MODULES:
            raise ValueError(
                f"prefixrt_torch_modules is for {list(SWAPPED_MODULES)}: on {workload.model} it is prefixrt"
            )
        return _prefixrt(model, workload, backend, fast_modules=False)
    if name == "peft":
        return _peft(model, workload)
    if name == "frozen_base":
        return _frozen_base(model, workload)
    raise ValueError(f"unknown arm {name!r}; arms are {ARMS}")
