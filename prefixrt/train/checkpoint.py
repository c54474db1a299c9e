"""Training checkpoints: everything needed to continue a run exactly, in one safetensors file (never pickle).

A checkpoint keeps what a bank drops -- the reparameterization MLP -- plus the optimizer and scheduler state, the
RNG states and the step, so ``train(..., resume=True)`` continues bit for bit where the run stopped (PEFT saves
only the prefix). The fine-tuning baseline (:func:`prefixrt.train.finetune`) writes the same file with the
model's parameters in place of the tuner's (metadata ``kind`` = ``"finetune"``). Tensors go into the safetensors
body, everything else into its JSON metadata:

=====================  ==================================================================================
key                    content
=====================  ==================================================================================
``tuner/<name>``       the tuner's state dict (``P'``, MLP weights, or the direct K/V)
``model/<name>``       fine-tuning: the model's parameters (``named_parameters()``: tied weights once)
``optimizer/<i>/<k>``  optimizer state tensor ``k`` (``exp_avg``, ``step``, ...) of parameter ``i``
``rng/cpu``            ``torch.get_rng_state()``; ``rng/cuda/<d>`` the CUDA generators when in use
metadata ``format``    ``"prefixrt.train-checkpoint"``, ``version``
metadata ``kind``      ``"prefix"`` (absent in older files) or ``"finetune"``
metadata ``spec``      the model architecture (:class:`~prefixrt.ModelSpec` JSON)
metadata ``tuner``     :meth:`PrefixTuner.config` (rebuilds the tuner's structure); ``null`` for fine-tuning
metadata ``optimizer`` param groups and non-tensor state values (JSON)
metadata ``scheduler`` the LR scheduler's state dict without its lambdas (JSON)
metadata ``trainer``   step, epoch, the training config and a fingerprint of the data (JSON)
=====================  ==================================================================================

The file is written atomically (:func:`prefixrt.fileio.atomic_write`): a crash while saving leaves the previous
checkpoint intact.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prefixrt.bank.spec import ModelSpec
from prefixrt.fileio import TaggedSafetensors
from prefixrt.train.tuner import PrefixTuner

__all__ = ["CheckpointError", "TrainCheckpoint", "load_checkpoint", "load_tuner", "save_checkpoint"]

FORMAT_NAME = "prefixrt.train-checkpoint"
FORMAT_VERSION = "1"


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, written by something else, or does not match the run resuming it."""


_CHECKPOINT_FILE = TaggedSafetensors(
    FORMAT_NAME,
    FORMAT_VERSION,
    CheckpointError,
    missing="training checkpoint",
    kind="training checkpoint",
    version_kind="checkpoint",
)


@dataclass
class TrainCheckpoint:
    """A checkpoint read back: the raw parts, to be restored into live objects with :meth:`restore`."""

    path: Path
    spec: ModelSpec
    tuner_config: dict[str, Any] | None
    tuner_state: dict[str, torch.Tensor]
    optimizer_state: dict[str, Any]
    scheduler_state: dict[str, Any] | None
    rng: dict[str, torch.Tensor]
    trainer: dict[str, Any]
    kind: str = "prefix"
    model_state: dict[str, torch.Tensor] | None = None

    def build_tuner(self, device: torch.device | str | None = None) -> PrefixTuner:
        """A tuner with this checkpoint's structure and parameters."""
        if self.kind != "prefix":
            raise CheckpointError(
                f"{self.path} is a fine-tuning checkpoint (the whole model); it holds no tuner"
            )
        tuner = PrefixTuner.from_config(self.spec, self.tuner_config, device=device)
        tuner.load_state_dict(self.tuner_state)
        return tuner

    def restore(
        self,
        tuner: PrefixTuner | nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        scheduler: Any = None,
        rng: bool = True,
    ) -> None:
        """Load the parameters (a tuner's, or a fine-tuned model's), optimizer and scheduler state and
        (``rng=True``) the RNG states."""
        if isinstance(tuner, PrefixTuner):
            if self.kind != "prefix":
                raise CheckpointError(
                    f"{self.path} is a fine-tuning checkpoint; it cannot restore a PrefixTuner"
                )
            if tuner.config() != self.tuner_config or tuner.spec != self.spec:
                raise CheckpointError(
                    f"{self.path}: the checkpoint holds a tuner {self.tuner_config} for {self.spec.describe()}, "
                    f"but the run has {tuner.config()} for {tuner.spec.describe()}"
                )
            tuner.load_state_dict(self.tuner_state)
            device = tuner.device
        else:
            if self.kind != "finetune":
                raise CheckpointError(f"{self.path} is a prefix-tuning checkpoint; it cannot restore a model")
            _load_model_parameters(self.path, tuner, self.model_state or {})
            device = next(tuner.parameters()).device
        if optimizer is not None:
            state = {
                "state": {
                    int(i): {
                        k: v.to(device) if torch.is_tensor(v) and k != "step" else v for k, v in s.items()
                    }
                    for i, s in self.optimizer_state["state"].items()
                },
                "param_groups": self.optimizer_state["param_groups"],
            }
            optimizer.load_state_dict(state)
        if scheduler is not None and self.scheduler_state is not None:
            scheduler.load_state_dict({**scheduler.state_dict(), **self.scheduler_state})
        if rng:
            torch.set_rng_state(self.rng["cpu"])
            cuda = [self.rng[k] for k in sorted(self.rng) if k.startswith("cuda/")]
            if cuda and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(cuda)


def _load_model_parameters(path: Path, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    if set(params) != set(state):
        missing, extra = sorted(set(params) - set(state)), sorted(set(state) - set(params))
        raise CheckpointError(
            f"{path}: the checkpoint's parameters do not match the model (missing {missing[:5]}, "
            f"unexpected {extra[:5]})"
        )
    with torch.no_grad():
        for name, p in params.items():
            if tuple(state[name].shape) != tuple(p.shape):
                raise CheckpointError(
                    f"{path}: parameter {name} is {list(state[name].shape)} in the checkpoint, "
                    f"{list(p.shape)} in the model"
                )
            p.copy_(state[name])


def save_checkpoint(
    path: str | os.PathLike,
    tuner: PrefixTuner | nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    trainer: dict[str, Any] | None = None,
) -> None:
    """Write a training checkpoint (one safetensors file, atomically); see the module docstring for its layout.

    ``tuner`` is the :class:`PrefixTuner` of a prefix-tuning run, or the model of a fine-tuning run (its
    ``named_parameters()`` are saved, tied weights once).
    """
    tensors: dict[str, torch.Tensor] = {}
    if isinstance(tuner, PrefixTuner):
        kind, spec, tuner_config = "prefix", tuner.spec, tuner.config()
        for name, value in tuner.state_dict().items():
            tensors[f"tuner/{name}"] = value.detach().contiguous().cpu()
    else:
        kind, spec, tuner_config = "finetune", ModelSpec.from_config(tuner.config), None
        for name, value in tuner.named_parameters():
            tensors[f"model/{name}"] = value.detach().contiguous().cpu()

    optimizer_meta: dict[str, Any] = {"state": {}, "param_groups": []}
    if optimizer is not None:
        state_dict = optimizer.state_dict()
        for index, state in state_dict["state"].items():
            plain = {}
            for key, value in state.items():
                if torch.is_tensor(value):
                    tensors[f"optimizer/{index}/{key}"] = value.detach().contiguous().cpu()
                else:
                    plain[key] = value
            optimizer_meta["state"][str(index)] = plain
        optimizer_meta["param_groups"] = state_dict["param_groups"]

    scheduler_meta = None
    if scheduler is not None:
        scheduler_meta = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}

    tensors["rng/cpu"] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for d, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng/cuda/{d}"] = state

    metadata = {
        "kind": kind,
        "spec": spec.to_json(),
        "tuner": json.dumps(tuner_config),
        "optimizer": json.dumps(optimizer_meta),
        "scheduler": json.dumps(scheduler_meta),
        "trainer": json.dumps(trainer or {}),
    }
    _CHECKPOINT_FILE.write(path, tensors, metadata)


def load_checkpoint(path: str | os.PathLike) -> TrainCheckpoint:
    """Read a checkpoint written by :func:`save_checkpoint`; raises :class:`CheckpointError` when it is not one."""
    path = Path(path)
    metadata, tensors = _CHECKPOINT_FILE.read(path)
    try:
        spec = ModelSpec.from_json(metadata["spec"])
        tuner_config = json.loads(metadata["tuner"])
        optimizer_meta = json.loads(metadata["optimizer"])
        scheduler_state = json.loads(metadata["scheduler"])
        trainer = json.loads(metadata["trainer"])
    except Exception as err:
        raise CheckpointError(f"{str(path)!r} has a corrupt checkpoint header ({err})") from err

    kind = metadata.get("kind", "prefix")
    if kind not in ("prefix", "finetune"):
        raise CheckpointError(f"{str(path)!r} has an unknown checkpoint kind {kind!r}")
    tuner_state, model_state, rng = {}, {}, {}
    optimizer_state: dict[str, Any] = {
        "state": {int(i): dict(s) for i, s in optimizer_meta["state"].items()},
        "param_groups": optimizer_meta["param_groups"],
    }
    for key, value in tensors.items():
        part, _, rest = key.partition("/")
        if part == "tuner":
            tuner_state[rest] = value
        elif part == "model":
            model_state[rest] = value
        elif part == "optimizer":
            index, _, name = rest.partition("/")
            optimizer_state["state"].setdefault(int(index), {})[name] = value
        elif part == "rng":
            rng[rest] = value
    if "cpu" not in rng:
        raise CheckpointError(f"{str(path)!r} is corrupt: it lacks the RNG state")
    return TrainCheckpoint(
        path,
        spec,
        tuner_config,
        tuner_state,
        optimizer_state,
        scheduler_state,
        rng,
        trainer,
        kind=kind,
        model_state=model_state if kind == "finetune" else None,
    )


def load_tuner(path: str | os.PathLike, device: torch.device | str | None = None) -> PrefixTuner:
    """The tuner saved in a training checkpoint (e.g. to materialize it or to train on with new settings)."""
    return load_checkpoint(path).build_tuner(device)
