"""Training prefixes: :class:`PrefixTuner` (the paper's reparameterization, several tasks in mixed batches), the
training loop and checkpoints that resume exactly."""

from prefixrt.train.tuner import PrefixTuner, PrefixView

__all__ = ["PrefixTuner", "PrefixView"]
