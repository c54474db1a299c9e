"""The prefix bank: named prefixes' K/V for one architecture (storage, safetensors files, PEFT adapters).

Part of the core: imports torch and safetensors only, never transformers (shapes come from a model's config).
"""

from prefixrt.bank.peft_io import PeftAdapterError
from prefixrt.bank.prefix_bank import BankFileError, PrefixBank
from prefixrt.bank.spec import ModelSpec, SiteSpec

__all__ = ["BankFileError", "ModelSpec", "PeftAdapterError", "PrefixBank", "SiteSpec"]
