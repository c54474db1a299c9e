"""prefixrt: mixed-prefix batched prefix-tuning for frozen Hugging Face GPT-2 and BART.

>>> import prefixrt
>>> bank = prefixrt.PrefixBank.for_model(model)            # doctest: +SKIP
>>> bank.add("e2e", kv)                                     # doctest: +SKIP
>>> prefixrt.attach(model, bank)                            # doctest: +SKIP
>>> model.generate(ids, attention_mask=mask, prefix_ids=bank.ids(["e2e", None]))  # doctest: +SKIP

The names below are imported on first use, so ``import prefixrt.ops`` or ``import prefixrt.bank`` (the core,
which never imports transformers) stays light.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "BankFileError": "prefixrt.bank",
    "ModelSpec": "prefixrt.bank",
    "PrefixBank": "prefixrt.bank",
    "SiteSpec": "prefixrt.bank",
    "attach": "prefixrt.hf",
    "detach": "prefixrt.hf",
    "is_attached": "prefixrt.hf",
    "add_text_prefix": "prefixrt.hf",
    "Engine": "prefixrt.engine",
    "SamplingParams": "prefixrt.engine",
    "generate": "prefixrt.engine",
    "PrefixTuner": "prefixrt.train",
}

__all__ = [
    "BankFileError",
    "Engine",
    "ModelSpec",
    "PrefixBank",
    "PrefixTuner",
    "SamplingParams",
    "SiteSpec",
    "add_text_prefix",
    "attach",
    "detach",
    "generate",
    "is_attached",
]

if TYPE_CHECKING:  # for type checkers and IDEs; at run time the names load lazily
    from prefixrt.bank import BankFileError, ModelSpec, PrefixBank, SiteSpec
    from prefixrt.engine import Engine, SamplingParams, generate
    from prefixrt.hf import add_text_prefix, attach, detach, is_attached
    from prefixrt.train import PrefixTuner


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'prefixrt' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
