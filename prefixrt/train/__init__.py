"""Training prefixes: :class:`PrefixTuner` (the paper's reparameterization, several tasks in mixed batches),
:func:`train` (AdamW, linear warm-up, loss log and plot) and checkpoints that resume bit for bit."""

from prefixrt.train.checkpoint import CheckpointError, load_checkpoint, load_tuner, save_checkpoint
from prefixrt.train.loop import TrainConfig, TrainResult, lm_loss, train
from prefixrt.train.tuner import PrefixTuner, PrefixView

__all__ = [
    "CheckpointError",
    "PrefixTuner",
    "PrefixView",
    "TrainConfig",
    "TrainResult",
    "lm_loss",
    "load_checkpoint",
    "load_tuner",
    "save_checkpoint",
    "train",
]
