"""The benchmark's baseline executor: Hugging Face ``generate()`` once per request, the prefix copied into the
cache the way PEFT does it.

This is what a straightforward server does without prefixrt: every request runs its own ``model.generate`` (in a
pool of ``max_batch_size`` worker threads; further requests wait in the pool's queue) on the plain model, with
the prefix's K/V copied out of the bank into a ``DynamicCache`` and the attention mask extended by ``P`` ones
(so real tokens sit at positions ``P .. P+T-1``, as with PEFT and with the engine's default). It has the same
interface as :class:`~prefixrt.serve.engine_loop.EngineLoop`, so the same HTTP app serves both and a benchmark
compares the executors alone. GPT-2 only.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from prefixrt.engine import SamplingParams
from prefixrt.hf.kv_cache import cache_keyword
from prefixrt.serve.engine_loop import End, Handle, Update

__all__ = ["HFGenerateLoop"]


class HFGenerateLoop:
    """Per-request HF ``generate()`` (see the module docstring)."""

    kv_bytes = None  # no preallocated pool

    def __init__(self, model: Any, bank: Any, *, max_batch_size: int, metrics: Any = None):
        if model.config.model_type != "gpt2":
            raise ValueError(f"the hf-generate baseline serves GPT-2 only, not {model.config.model_type}")
        self.model, self.bank, self.metrics = model, bank, metrics
        self.max_batch_size = max_batch_size
        self._pool: ThreadPoolExecutor | None = None
        self._aloop: asyncio.AbstractEventLoop | None = None
        self._bank_lock = threading.Lock()
        self._cancel: dict[int, threading.Event] = {}
        self._ids = itertools.count()
        self._running = 0

    def start(self, aloop: asyncio.AbstractEventLoop) -> None:
        self._aloop = aloop
        self._pool = ThreadPoolExecutor(max_workers=self.max_batch_size, thread_name_prefix="hf-generate")

    def stop(self, timeout: float = 10.0) -> None:
        pool, self._pool = self._pool, None
        for event in list(self._cancel.values()):
            event.set()
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=False)

    @property
    def alive(self) -> bool:
        return self._pool is not None

    async def submit(
        self,
        prompt_ids: list[int],
        prefix: str | None,
        params: SamplingParams,
        *,
        sink: asyncio.Queue,
        index: int = 0,
        label: str = "",
        arrival: float | None = None,
    ) -> Handle:
        if self._pool is None:
            raise RuntimeError("the baseline executor is not running")
        if prefix is not None and prefix not in self.bank:
            raise KeyError(f"unknown prefix name {prefix!r}; the bank holds {self.bank.names}")
        handle = Handle(index, sink)
        handle.id = next(self._ids)
        cancel = self._cancel[handle.id] = threading.Event()
        arrival = time.monotonic() if arrival is None else arrival
        if self.metrics is not None:
            self.metrics.accepted.inc()
            self.metrics.prompt_tokens.inc(len(prompt_ids))
        self._pool.submit(self._generate, handle, prompt_ids, prefix, params, cancel, label, arrival)
        return handle

    def abort(self, handle: Handle, reason: str = "aborted") -> None:
        event = self._cancel.get(handle.id)
        if event is not None:
            event.set()

    async def call(self, fn):
        def locked():
            with self._bank_lock:
                return fn()

        return await asyncio.to_thread(locked)

    # -- worker threads -------------------------------------------------------------------------------------------
    def _send(self, handle: Handle, update: Update) -> None:
        try:
            self._aloop.call_soon_threadsafe(handle.sink.put_nowait, update)
        except RuntimeError:  # the event loop is closed
            pass

    def _generate(self, handle, prompt_ids, prefix, params, cancel, label, arrival) -> None:
        from transformers import DynamicCache, StoppingCriteria, StoppingCriteriaList
        from transformers.generation.streamers import BaseStreamer

        loop, metrics = self, self.metrics
        tokens: list[int] = []
        last = [None]

        class Streamer(BaseStreamer):
            prompt_seen = False

            def put(self, value):
                if not self.prompt_seen:  # generate() first hands over the prompt
                    self.prompt_seen = True
                    return
                now = time.monotonic()
                if metrics is not None:
                    (metrics.ttft if last[0] is None else metrics.itl).observe(now - (last[0] or arrival))
                    metrics.generation_tokens.inc()
                last[0] = now
                token = int(value.reshape(-1)[0])
                tokens.append(token)
                loop._send(handle, Update(handle.index, [token]))

            def end(self):
                pass

        class Cancelled(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                return torch.full((input_ids.shape[0],), cancel.is_set(), dtype=torch.bool)

        end = End("aborted", "aborted")
        try:
            if not cancel.is_set():
                self._running += 1
                try:
                    end = self._run_generate(prompt_ids, prefix, params, Streamer(), Cancelled(), DynamicCache,
                                             StoppingCriteriaList, cancel, tokens)  # fmt: skip
                finally:
                    self._running -= 1
        except Exception as err:
            end = End("error", "failed", f"generate() failed: {type(err).__name__}: {err}")
        finally:
            self._cancel.pop(handle.id, None)
            if metrics is not None:
                metrics.e2e.observe(time.monotonic() - arrival)
                metrics.requests.labels(label, "stop" if end.reason == "eos" else end.reason).inc()
            self._send(handle, Update(handle.index, [], end))

    def _run_generate(self, prompt_ids, prefix, params, streamer, cancelled, cache_cls, criteria_cls, cancel,
                      tokens) -> End:  # fmt: skip
        model = self.model
        ids = torch.tensor([prompt_ids], dtype=torch.long, device=model.device)
        past, prefix_len = None, 0
        if prefix is not None:
            with self._bank_lock:
                kv = self.bank.entry(prefix)["decoder"]  # [L, 2, H, P, D], a copy
            past = cache_cls(config=model.config)
            for layer in range(kv.shape[0]):
                past.update(kv[layer, 0][None], kv[layer, 1][None], layer)
            prefix_len = kv.shape[3]
        mask = torch.ones(1, prefix_len + ids.shape[1], dtype=torch.long, device=ids.device)
        kwargs = params.generate_kwargs()
        eos = model.generation_config.eos_token_id
        kwargs.setdefault("pad_token_id", eos if isinstance(eos, int) else 0)
        with torch.inference_mode():
            model.generate(
                ids,
                attention_mask=mask,
                **{cache_keyword(model): past},
                streamer=streamer,
                stopping_criteria=criteria_cls([cancelled]),
                **kwargs,
            )
        if cancel.is_set():
            return End("aborted", "aborted")
        eos_ids = {eos} if isinstance(eos, int) else set(eos or ())
        return End("finished", "eos" if tokens and tokens[-1] in eos_ids else "length")
