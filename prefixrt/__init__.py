"""prefixrt: mixed-prefix batched prefix-tuning for frozen Hugging Face GPT-2 and BART.

>>> import prefixrt
>>> bank = prefixrt.PrefixBank.for_model(model)            # doctest: +SKIP
>>> bank.add("e2e", kv)                                     # doctest: +SKIP
>>> prefixrt.attach(model, bank)                            # doctest: +SKIP
>>> model.generate(ids, attention_mask=mask, prefix_ids=bank.ids(["e2e", None]))  # doctest: +SKIP
"""

from prefixrt.bank import BankFileError, PrefixBank
from prefixrt.engine import Engine, SamplingParams, generate
from prefixrt.hf import attach, detach, is_attached
from prefixrt.spec import ModelSpec, SiteSpec
from prefixrt.train import PrefixTuner

__version__ = "0.1.0"

__all__ = [
    "BankFileError",
    "Engine",
    "ModelSpec",
    "PrefixBank",
    "PrefixTuner",
    "SamplingParams",
    "SiteSpec",
    "attach",
    "detach",
    "generate",
    "is_attached",
]
