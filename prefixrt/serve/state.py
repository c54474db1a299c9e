"""What one ``prefixrt serve`` app serves: its configuration, the model, bank, engine loop and metrics.

:class:`ServeState` is shared by the app (:mod:`prefixrt.serve.app`) and the routes' logic
(:mod:`prefixrt.serve.handlers`); everything on it is read and changed on the asyncio thread.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefixrt.hf.models import family_for
from prefixrt.serve.engine_loop import Update
from prefixrt.serve.metrics import ServeMetrics

__all__ = ["ServeConfig", "ServeState", "Sink", "bank_snapshot"]


@dataclass
class ServeConfig:
    """What the server is told besides the model (see ``prefixrt serve --help``)."""

    model_name: str
    api_key: str | None = None
    max_waiting: int = 256
    allow_prefix_updates: bool = False
    prefix_dir: Path | None = None
    default_max_tokens: int = 16  # completions (OpenAI's default); chat defaults to what the context leaves
    retry_after_s: int = 1


class Sink(asyncio.Queue):
    """One HTTP request's queue of :class:`Update`; tells the state when a choice ended (frees its place)."""

    def __init__(self, state: ServeState):
        super().__init__()
        self.state = state

    def put_nowait(self, item: Update) -> None:
        super().put_nowait(item)
        if item.end is not None:
            self.state.in_flight -= 1


@dataclass
class ServeState:
    """The model, tokenizer, bank, engine loop (an :class:`~prefixrt.serve.engine_loop.EngineLoop` or the
    baseline's :class:`~prefixrt.serve.hf_loop.HFGenerateLoop`) and metrics one app serves."""

    config: ServeConfig
    model: Any
    tokenizer: Any
    bank: Any
    loop: Any
    max_batch_size: int
    max_prompt_tokens: int
    max_new_tokens: int
    position_offset: str = "prefix"
    metrics: ServeMetrics = field(default_factory=ServeMetrics)
    in_flight: int = 0  # choices accepted and not ended (asyncio thread only)
    prefixes: dict[str, dict[str, int]] = field(default_factory=dict)  # name -> prefix length per site
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        self.model_type = self.model.config.model_type
        self.max_positions = family_for(self.model).max_positions(self.model.config)
        self.vocab_size = self.model.config.vocab_size
        self.prefixes = bank_snapshot(self.bank)
        if self.config.model_name in self.prefixes:
            raise ValueError(
                f"a prefix is named {self.config.model_name!r}, like the base model: rename one of them"
            )
        self.metrics.kv_pool_rows.set(self.max_batch_size)
        kv_bytes = getattr(self.loop, "kv_bytes", None)
        if kv_bytes is not None:
            self.metrics.kv_pool_bytes.set(kv_bytes)
        self.metrics.prefixes.set(len(self.prefixes))

    @property
    def capacity(self) -> int:
        return self.max_batch_size + self.config.max_waiting


def bank_snapshot(bank) -> dict[str, dict[str, int]]:
    """``{name: {site: prefix length}}`` of every entry (read on the thread that owns the bank)."""
    return {
        name: {site: int(bank.lengths(site)[bank.id_of(name)]) for site in bank.spec.sites}
        for name in bank.names
    }
