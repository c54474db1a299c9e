"""The generation engine: ``generate`` (drop-in for HF ``generate()`` on an attached model) and ``Engine``
(continuous batching over a bounded K/V pool, streaming, abort, bank changes while running)."""

from prefixrt.engine.engine import Engine
from prefixrt.engine.generate import generate
from prefixrt.engine.params import SamplingParams
from prefixrt.engine.requests import RequestOutput, RequestStatus, TokenEvent
from prefixrt.hf.generation.config import UnsupportedGenerationArgument

__all__ = [
    "Engine",
    "RequestOutput",
    "RequestStatus",
    "SamplingParams",
    "TokenEvent",
    "UnsupportedGenerationArgument",
    "generate",
]
