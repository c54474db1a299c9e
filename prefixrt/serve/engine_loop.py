"""The one thread that drives a :class:`prefixrt.Engine` for the server, and its thread-safe doorway.

Threads
-------
* the **asyncio thread** (uvicorn's event loop) parses HTTP requests and writes answers; it never touches the
  engine or the bank;
* the **engine loop thread** (this module, one per server) is the only caller of the engine and the only writer
  of the bank: it takes commands from a thread-safe queue (submit, abort, run a function such as a bank change),
  then runs one ``engine.step()``, and so on; it sleeps on the queue while the engine is idle.

Commands are applied in the order they were sent, all of them before the next step: an abort sent while a step
runs takes effect right after that step, so an aborted request's K/V rows are freed within one step.

Tokens go back the other way in one ``loop.call_soon_threadsafe`` per step: every request with new tokens gets an
:class:`Update` put on its *sink* (an ``asyncio.Queue`` owned by the HTTP request; the choices of one HTTP request
share one sink, told apart by ``index``). The last update of a request carries an :class:`End`: how it finished
(``"eos"``, ``"length"``), or that it was aborted or failed (``error`` says why). Every accepted request gets an
``End`` exactly once, whatever happens (finished, aborted, failed while waiting, an engine error, shutdown).

Only the engine's public API is used (``add_request``, ``step``, ``abort``, ``status``, ``pop_result``,
``has_unfinished``, ``num_running``, ``num_waiting``, ``kv_bytes``, ``max_batch_size``), so this adapter stays
correct whatever the engine's internals become; it is the one place to change to use the engine's own
thread-safe submission API instead of the queue.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from prefixrt.engine import SamplingParams

__all__ = ["End", "EngineLoop", "Handle", "Update"]

log = logging.getLogger("prefixrt.serve")

_ENDED = ("finished", "aborted", "failed")


@dataclass(frozen=True)
class End:
    """How a request ended: ``status`` ``"finished"`` (``reason`` ``"eos"`` or ``"length"``), ``"aborted"``,
    ``"failed"`` (the engine refused it when it was to start: its prefix was removed meanwhile, ...) or ``"error"``
    (the engine broke, or the server is shutting down); ``error`` says why."""

    status: str
    reason: str | None
    error: str | None = None


@dataclass(frozen=True)
class Update:
    """New tokens of choice ``index`` (possibly none), and its :class:`End` when it ended."""

    index: int
    tokens: list[int]
    end: End | None = None


class Handle:
    """One submitted request, as the asyncio side sees it (``id``: the engine's request id)."""

    __slots__ = ("id", "index", "sink", "ended")

    def __init__(self, index: int, sink: asyncio.Queue):
        self.id: int | None = None
        self.index, self.sink = index, sink
        self.ended = False  # set by the asyncio side when it read the End


@dataclass
class _Live:
    """What the loop thread keeps per running request (for its sink and its latency metrics)."""

    handle: Handle
    label: str
    arrival: float
    last: float | None = None  # time of its latest token


class EngineLoop:
    """Drives ``engine`` from one thread (see the module docstring).

    Parameters
    ----------
    engine : prefixrt.Engine
    metrics : ServeMetrics, optional
        Gauges set after every step; TTFT, inter-token and end-to-end latencies observed as tokens arrive.
    idle_poll : float
        Seconds the idle loop sleeps on the queue before it refreshes the gauges.
    """

    def __init__(self, engine: Any, metrics: Any = None, *, idle_poll: float = 0.5):
        self.engine, self.metrics, self.idle_poll = engine, metrics, idle_poll
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._live: dict[int, _Live] = {}  # loop thread only
        self._not_started: set[int] = set()  # loop thread only: live requests without a token yet
        self._thread: threading.Thread | None = None
        self._aloop: asyncio.AbstractEventLoop | None = None
        self.error: BaseException | None = None  # why the loop thread died, if it did
        self.steps = 0
        self._closed = False  # set (under _lock) when the loop thread takes no more commands
        self._lock = threading.Lock()

    # -- lifetime (asyncio side) ----------------------------------------------------------------------------------
    def start(self, aloop: asyncio.AbstractEventLoop) -> None:
        """Start the loop thread; updates are delivered on ``aloop``."""
        self._aloop = aloop
        self._thread = threading.Thread(target=self._run, name="prefixrt-engine-loop", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """End every request (``failed``: the server is shutting down) and join the thread."""
        if self._thread is not None and self._thread.is_alive():
            self._commands.put(("stop",))
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def kv_bytes(self) -> int:
        return self.engine.kv_bytes

    # -- the doorway (asyncio side; abort is safe from any thread) -------------------------------------------------
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
        """Add a request to the engine; returns once the engine accepted it (its ``add_request``'s ``KeyError``
        or ``ValueError`` is raised here). ``arrival``: ``time.monotonic()`` when the HTTP request came in."""
        if not self.alive:
            raise RuntimeError("the engine loop is not running")
        handle = Handle(index, sink)
        done: concurrent.futures.Future = concurrent.futures.Future()
        arrival = time.monotonic() if arrival is None else arrival
        self._put(("submit", handle, prompt_ids, prefix, params, done, label, arrival))
        try:
            await asyncio.wrap_future(done)
        except asyncio.CancelledError:
            self.abort(handle)  # no-op unless the engine took it before the cancel arrived
            raise
        return handle

    def abort(self, handle: Handle, reason: str = "aborted") -> None:
        """Stop a request (its K/V is freed before the next step); ``reason`` labels it in the metrics."""
        self._commands.put(("abort", handle, reason))

    async def call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn()`` on the loop thread between two steps (bank changes) and return its result."""
        if not self.alive:
            raise RuntimeError("the engine loop is not running")
        done: concurrent.futures.Future = concurrent.futures.Future()
        self._put(("call", fn, done))
        return await asyncio.wrap_future(done)

    def _put(self, command: tuple) -> None:
        with self._lock:
            if self._closed:
                raise RuntimeError("the engine loop is not running")
            self._commands.put(command)

    # -- the loop thread ------------------------------------------------------------------------------------------
    def _run(self) -> None:
        engine = self.engine
        try:
            while True:
                if not self._drain(block=not engine.has_unfinished()):
                    break
                if engine.has_unfinished():
                    try:
                        events = engine.step()
                    except Exception as err:  # an engine bug: fail what runs, keep serving
                        log.exception("engine step failed")
                        self._fail_all(f"the engine failed: {type(err).__name__}: {err}", "error")
                        continue
                    self.steps += 1
                    self._dispatch(events)
                self._set_gauges()
        except BaseException as err:  # pragma: no cover - reported by /health
            self.error = err
            log.exception("the engine loop died")
            raise
        finally:
            self._fail_all("the server is shutting down", "error")
            self._refuse_queued()
            self._set_gauges()

    def _refuse_queued(self) -> None:
        """Take no more commands; those already queued get an error (nobody waits forever)."""
        with self._lock:
            self._closed = True
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            done = {"submit": 5, "call": 2}.get(command[0])
            if done is not None and command[done].set_running_or_notify_cancel():
                command[done].set_exception(RuntimeError("the server is shutting down"))

    def _drain(self, block: bool) -> bool:
        """Apply every queued command (waiting up to ``idle_poll`` for one when ``block``); False on stop."""
        try:
            command = self._commands.get(timeout=self.idle_poll) if block else self._commands.get_nowait()
        except queue.Empty:
            return True
        while True:
            if command[0] == "stop":
                return False
            getattr(self, "_do_" + command[0])(*command[1:])
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return True

    def _do_submit(self, handle, prompt_ids, prefix, params, done, label, arrival) -> None:
        if not done.set_running_or_notify_cancel():
            return  # the HTTP side gave up before the engine saw it
        try:
            request_id = self.engine.add_request(prompt_ids, prefix=prefix, params=params)
        except Exception as err:
            done.set_exception(err)
            return
        handle.id = request_id
        self._live[request_id] = _Live(handle, label, arrival)
        self._not_started.add(request_id)
        if self.metrics is not None:
            self.metrics.accepted.inc()
            self.metrics.prompt_tokens.inc(len(prompt_ids))
        done.set_result(request_id)

    def _do_abort(self, handle: Handle, reason: str) -> None:
        live = self._live.get(handle.id) if handle.id is not None else None
        if live is None or live.handle is not handle:
            return  # ended already, or never accepted
        try:
            self.engine.abort(handle.id)
        except KeyError:  # pragma: no cover - the engine forgot it: it ends here all the same
            pass
        self._end(handle.id, End("aborted", "aborted"), reason, time.monotonic())

    def _do_call(self, fn, done) -> None:
        if not done.set_running_or_notify_cancel():
            return
        try:
            done.set_result(fn())
        except Exception as err:
            done.set_exception(err)

    def _dispatch(self, events: list) -> None:
        """Hand a step's tokens to their sinks (one ``call_soon_threadsafe``); forget the requests that ended
        (finished with their last token, or failed at admission without any)."""
        now = time.monotonic()
        tokens: dict[int, list[int]] = {}
        finished: set[int] = set()
        for event in events:
            tokens.setdefault(event.request_id, []).append(event.token)
            if event.finished:
                finished.add(event.request_id)
        items: list[tuple[asyncio.Queue, Update]] = []
        metrics = self.metrics
        for request_id, new in tokens.items():
            live = self._live.get(request_id)
            if live is None:
                continue  # not ours
            if metrics is not None:
                if live.last is None:
                    metrics.ttft.observe(now - live.arrival)
                else:
                    metrics.itl.observe(now - live.last)
            live.last = now
            self._not_started.discard(request_id)
            end = None
            if request_id in finished:
                output = self._pop(request_id)
                end = End("finished", output.finish_reason if output is not None else "length")
                self._end(request_id, None, "stop" if end.reason == "eos" else end.reason, now)
            items.append((live.handle.sink, Update(live.handle.index, new, end)))
        if metrics is not None:
            metrics.steps.inc()
            metrics.generation_tokens.inc(len(events))
        self._send(items)
        # requests that ended without a token: failed at admission (their prefix was removed meanwhile, ...);
        # when as many of ours are waiting as the engine has waiting, none did (the scan is skipped)
        if len(self._not_started) == self.engine.num_waiting:
            return
        for request_id in [r for r in self._not_started if r not in tokens]:
            status = self._status(request_id)
            if status is not None and status not in _ENDED:
                continue  # still waiting
            output = self._pop(request_id)
            error = (output.error if output is not None else None) or "the request ended before it started"
            self._end(request_id, End("failed", "failed", error), "failed", now)

    def _end(self, request_id: int, end: End | None, label_reason: str, now: float) -> None:
        """Forget a request; send ``end`` to its sink (unless the caller sends it with its last tokens)."""
        live = self._live.pop(request_id)
        self._not_started.discard(request_id)
        if self.metrics is not None:
            self.metrics.e2e.observe(now - live.arrival)
            self.metrics.requests.labels(live.label, label_reason).inc()
        if end is not None:
            self._pop(request_id)  # an aborted or failed request's output is not needed
            self._send([(live.handle.sink, Update(live.handle.index, [], end))])

    def _fail_all(self, error: str, label_reason: str) -> None:
        now = time.monotonic()
        for request_id in list(self._live):
            try:
                self.engine.abort(request_id)
            except Exception:  # noqa: S110 - the engine may be broken; the request ends anyway
                pass
            self._end(request_id, End("error", "failed", error), label_reason, now)

    def _pop(self, request_id: int) -> Any:
        try:
            return self.engine.pop_result(request_id)
        except (KeyError, ValueError):
            return None

    def _status(self, request_id: int) -> str | None:
        try:
            return self.engine.status(request_id).value
        except KeyError:
            return None

    def _send(self, items: list[tuple[asyncio.Queue, Update]]) -> None:
        if not items or self._aloop is None:
            return
        try:
            self._aloop.call_soon_threadsafe(_put_all, items)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass

    def _set_gauges(self) -> None:
        m = self.metrics
        if m is None:
            return
        engine = self.engine
        m.running.set(engine.num_running)
        m.waiting.set(engine.num_waiting)
        m.kv_pool_usage.set(engine.num_running / engine.max_batch_size)


def _put_all(items: list[tuple[asyncio.Queue, Update]]) -> None:
    for sink, update in items:
        sink.put_nowait(update)
