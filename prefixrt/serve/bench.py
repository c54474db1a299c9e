"""The load generator of ``prefixrt bench serve``: bounded asyncio clients against an OpenAI-compatible server.

Every request streams a completion (``stream_options.include_usage``) and is timed as ``vllm bench serve`` times
it: **TTFT** (time to first token: from sending the request to the first chunk with text), **ITL** (inter-token
latency: between successive chunks), **TPOT** (time per output token after the first:
``(E2EL - TTFT) / (output_tokens - 1)``), **E2EL** (end-to-end latency); a level reports request/s, output tok/s
and the mean, median and p99 of each latency in milliseconds. ``concurrency`` clients each send their next request
as soon as the previous one ends, ``num_requests`` in all.

:func:`offline_engine` runs the same requests on a :class:`prefixrt.Engine` in this process (no HTTP), the
reference for what the HTTP layer costs. :class:`ServerProcess` starts ``prefixrt serve`` as a subprocess and
stops it by its PID.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["BenchRequest", "ServerProcess", "level_summary", "offline_engine", "run_level", "stop_process"]


@dataclass(frozen=True)
class BenchRequest:
    """One request of the workload: a token-id prompt, the model (prefix) name, and exactly ``max_tokens`` new
    tokens (``min_tokens`` = ``max_tokens``: no early EOS, every method generates the same amount)."""

    prompt: list[int]
    model: str
    max_tokens: int

    def body(self) -> dict:
        return {
            "model": self.model,
            "prompt": self.prompt,
            "max_tokens": self.max_tokens,
            "min_tokens": self.max_tokens,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }


@dataclass
class RequestTiming:
    ok: bool
    ttft: float = 0.0
    e2el: float = 0.0
    itl: list[float] = field(default_factory=list)
    output_tokens: int = 0
    error: str | None = None


async def _one(http, url: str, request: BenchRequest, headers: dict) -> RequestTiming:
    start = time.perf_counter()
    first = last = None
    itl: list[float] = []
    tokens = 0
    try:
        async with http.stream("POST", url, json=request.body(), headers=headers) as r:
            if r.status_code != 200:
                return RequestTiming(False, error=f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return RequestTiming(False, error=chunk["error"]["message"])
                now = time.perf_counter()
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                if chunk.get("choices") and chunk["choices"][0].get("text"):
                    if first is None:
                        first = now
                    else:
                        itl.append(now - last)
                    last = now
    except Exception as err:  # a benchmark reports failures instead of stopping
        return RequestTiming(False, error=f"{type(err).__name__}: {err}")
    end = time.perf_counter()
    if first is None:
        return RequestTiming(False, error="no text came back")
    return RequestTiming(True, first - start, end - start, itl, tokens)


async def _level(
    url: str, requests: list[BenchRequest], concurrency: int, api_key: str | None, timeout: float
):
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    todo = iter(requests)
    timings: list[RequestTiming] = []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as http:

        async def client() -> None:
            for request in todo:
                timings.append(await _one(http, url + "/v1/completions", request, headers))

        start = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        duration = time.perf_counter() - start
    return timings, duration


def run_level(
    base_url: str,
    requests: list[BenchRequest],
    concurrency: int,
    *,
    api_key: str | None = None,
    timeout: float = 600.0,
) -> dict:
    """Send ``requests`` with ``concurrency`` clients; the level's figures (see :func:`level_summary`)."""
    timings, duration = asyncio.run(_level(base_url, requests, concurrency, api_key, timeout))
    return level_summary(timings, duration, concurrency)


def _stats(values: list[float], name: str) -> dict:
    import numpy as np

    if not values:
        return {f"mean_{name}_ms": None, f"median_{name}_ms": None, f"p99_{name}_ms": None}
    a = np.asarray(values) * 1000.0
    return {
        f"mean_{name}_ms": float(a.mean()),
        f"median_{name}_ms": float(np.median(a)),
        f"p99_{name}_ms": float(np.percentile(a, 99)),
    }


def level_summary(timings: list[RequestTiming], duration: float, concurrency: int) -> dict:
    """``vllm bench serve``'s figures for one level."""
    done = [t for t in timings if t.ok]
    output = sum(t.output_tokens for t in done)
    tpot = [(t.e2el - t.ttft) / (t.output_tokens - 1) for t in done if t.output_tokens > 1]
    out = {
        "concurrency": concurrency,
        "completed": len(done),
        "failed": len(timings) - len(done),
        "errors": sorted({t.error for t in timings if not t.ok})[:5],
        "duration_s": duration,
        "total_output_tokens": output,
        "request_throughput": len(done) / duration,
        "output_throughput": output / duration,
    }
    out.update(_stats([t.ttft for t in done], "ttft"))
    out.update(_stats(tpot, "tpot"))
    out.update(_stats([x for t in done for x in t.itl], "itl"))
    out.update(_stats([t.e2el for t in done], "e2el"))
    return out


def offline_engine(model, bank, requests: list[BenchRequest], concurrency: int, **engine_kwargs: Any) -> dict:
    """The same requests on a :class:`prefixrt.Engine` of ``concurrency`` rows in this process, all added at
    once (the engine runs ``concurrency`` at a time, as the server does with that many clients)."""
    from prefixrt.engine import Engine, SamplingParams

    engine = Engine(model, bank, max_batch_size=concurrency, **engine_kwargs)
    start = time.perf_counter()
    ids = [
        engine.add_request(
            r.prompt,
            prefix=None if r.model not in bank else r.model,
            params=SamplingParams(max_new_tokens=r.max_tokens, min_new_tokens=r.max_tokens),
        )
        for r in requests
    ]
    outputs = engine.run()
    duration = time.perf_counter() - start
    tokens = sum(len(outputs[i].tokens) for i in ids)
    return {
        "concurrency": concurrency,
        "completed": len(ids),
        "duration_s": duration,
        "total_output_tokens": tokens,
        "request_throughput": len(ids) / duration,
        "output_throughput": tokens / duration,
        "tokens": [outputs[i].tokens for i in ids],
    }


def stop_process(proc: subprocess.Popen, timeout: float = 15.0) -> None:
    """End ``proc`` by its PID if it still runs: SIGTERM, then SIGKILL when it has not exited after ``timeout``
    seconds."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)


class ServerProcess:
    """``python -m prefixrt serve ARGS --port 0`` as a subprocess (its output in ``log``), ready once
    ``/health`` answers; :meth:`stop` terminates it by its PID (then kills it after a timeout)."""

    def __init__(self, args: list[str], log: Path, env: dict | None = None):
        self.log = log
        self._out = open(log, "w")  # a file, not a pipe: a full pipe would block the server
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "prefixrt", "serve", "--port", "0", *args],
            stdout=self._out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )
        self.url: str | None = None

    def wait_ready(self, timeout: float = 300.0) -> str:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"prefixrt serve exited with {self.proc.returncode}:\n{self.log.read_text()}"
                )
            if self.url is None:
                found = re.search(r"on (http://[\d.]+:\d+)/v1", self.log.read_text())
                self.url = found.group(1) if found else None
            if self.url is not None:
                try:
                    if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                        return self.url
                except httpx.HTTPError:
                    pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"prefixrt serve was not ready within {timeout} s:\n{self.log.read_text()}")

    def stop(self, timeout: float = 15.0) -> None:
        stop_process(self.proc, timeout)
        self._out.close()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def fetch_tokens(base_url: str, requests: list[BenchRequest], api_key: str | None = None) -> list[list[int]]:
    """Each request's tokens, not streamed (``return_token_ids``): to check every method generates the same."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    out = []
    with httpx.Client(timeout=600) as http:
        for r in requests:
            body = {**r.body(), "stream": False, "return_token_ids": True}
            del body["stream_options"]
            answer = http.post(base_url + "/v1/completions", json=body, headers=headers)
            answer.raise_for_status()
            out.append(answer.json()["choices"][0]["token_ids"])
    return out
