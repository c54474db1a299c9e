"""Training prefixes: :class:`PrefixTuner` (the paper's reparameterization, several tasks in mixed batches),
:func:`train` (AdamW, linear warm-up, dev evaluation, loss log and plot, several processes), the fine-tuning
baseline :func:`finetune` (the same loop, the whole model trained) and checkpoints that resume bit for bit.
Both take the hyper-parameters in a :class:`TrainConfig` and how to run (padding id, files, dev evaluation,
processes) in :class:`RunOptions`."""

from prefixrt.train.checkpoint import CheckpointError, load_checkpoint, load_tuner, save_checkpoint
from prefixrt.train.config import RunOptions, TrainConfig, TrainResult
from prefixrt.train.distributed import Dist, init_from_env
from prefixrt.train.finetune import finetune
from prefixrt.train.loop import train
from prefixrt.train.loss import lm_loss
from prefixrt.train.tuner import PrefixTuner, PrefixView

__all__ = [
    "CheckpointError",
    "Dist",
    "PrefixTuner",
    "PrefixView",
    "RunOptions",
    "TrainConfig",
    "TrainResult",
    "finetune",
    "init_from_env",
    "lm_loss",
    "load_checkpoint",
    "load_tuner",
    "save_checkpoint",
    "train",
]
