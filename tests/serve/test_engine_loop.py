"""The engine loop thread in-process (no HTTP): commands apply before the next step, every request gets exactly one
End, errors come back to the submitter, and tokens equal the engine's own."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch
from support.tiny import random_bank, random_ids, tiny_gpt2

from prefixrt.engine import Engine, SamplingParams
from prefixrt.serve.engine_loop import EngineLoop

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class CountingEngine:
    """An engine seen through its public API, counting steps and when each abort was applied."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.steps = 0
        self.aborted_at: dict[int, int] = {}
        self.threads: set[int] = set()

    def step(self):
        self.threads.add(threading.get_ident())
        self.steps += 1
        return self.engine.step()

    def abort(self, request_id):
        self.aborted_at[request_id] = self.steps
        return self.engine.abort(request_id)

    def __getattr__(self, name):
        return getattr(self.engine, name)


def make(max_batch_size: int = 4) -> tuple[CountingEngine, object]:
    model = tiny_gpt2()
    bank = random_bank(model, {"a": 5, "b": 9})
    engine = Engine(model, bank, max_batch_size=max_batch_size, max_prompt_tokens=16, max_new_tokens=40)
    return CountingEngine(engine), bank


async def drain(sink: asyncio.Queue, timeout: float = 30.0):
    """Every update of one request up to its End: (tokens, end)."""
    tokens = []
    while True:
        update = await asyncio.wait_for(sink.get(), timeout)
        tokens += update.tokens
        if update.end is not None:
            return tokens, update.end


def test_tokens_are_the_engines_and_every_request_ends_once():
    counting, bank = make()
    prompts = [random_ids(1, n, seed=n)[0].tolist() for n in (3, 7, 7, 12)]
    reference = Engine(counting.engine.model, bank, max_batch_size=4, max_prompt_tokens=16, max_new_tokens=40)
    expected = []
    for prompt, prefix in zip(prompts, ["a", "b", None, "a"], strict=True):
        rid = reference.add_request(
            prompt, prefix=prefix, params=SamplingParams(max_new_tokens=6 + len(prompt))
        )
        expected.append(reference.run()[rid].tokens)

    async def main():
        loop = EngineLoop(counting)
        loop.start(asyncio.get_running_loop())
        sinks = [asyncio.Queue() for _ in prompts]
        for prompt, prefix, sink in zip(prompts, ["a", "b", None, "a"], sinks, strict=True):
            await loop.submit(prompt, prefix, SamplingParams(max_new_tokens=6 + len(prompt)), sink=sink)
        results = [await drain(sink) for sink in sinks]
        await asyncio.sleep(0.1)
        assert all(sink.empty() for sink in sinks)  # nothing after the End
        loop.stop()
        return results

    results = asyncio.run(main())
    assert [tokens for tokens, _ in results] == expected
    assert all(end.status == "finished" for _, end in results)
    assert len(counting.threads) == 1 and threading.get_ident() not in counting.threads  # one loop thread


def test_an_abort_applies_before_the_next_step():
    counting, _ = make()

    async def main():
        loop = EngineLoop(counting)
        loop.start(asyncio.get_running_loop())
        params = SamplingParams(max_new_tokens=40, min_new_tokens=40)
        other, victim = asyncio.Queue(), asyncio.Queue()
        await loop.submit([5, 6, 7], "a", params, sink=other)  # keeps the loop stepping
        handle = await loop.submit([5, 6, 7, 8], "b", params, sink=victim)
        await victim.get()
        await victim.get()
        queued_at = counting.steps
        loop.abort(handle)
        tokens, end = await drain(victim)
        rest, other_end = await drain(other)
        loop.stop()
        return handle, queued_at, end, other_end

    handle, queued_at, end, other_end = asyncio.run(main())
    assert end.status == "aborted"
    assert counting.aborted_at[handle.id] - queued_at <= 1  # at most the step that was running
    assert other_end.status == "finished" and other_end.reason == "length"  # the other request is undisturbed
    assert counting.num_running == 0 and counting.num_waiting == 0


def test_submit_errors_come_back_to_the_caller():
    counting, _ = make()

    async def main():
        loop = EngineLoop(counting)
        loop.start(asyncio.get_running_loop())
        sink = asyncio.Queue()
        with pytest.raises(KeyError, match="nope"):
            await loop.submit([5, 6], "nope", SamplingParams(), sink=sink)
        with pytest.raises(ValueError, match="max_prompt_tokens"):
            await loop.submit(list(range(3, 40)), None, SamplingParams(), sink=sink)
        with pytest.raises(ZeroDivisionError):
            await loop.call(lambda: 1 / 0)
        assert await loop.call(lambda: 42) == 42
        loop.stop()

    asyncio.run(main())


def test_a_waiting_request_whose_prefix_is_removed_fails_and_shutdown_ends_the_rest():
    counting, bank = make(max_batch_size=1)

    async def main():
        loop = EngineLoop(counting)
        loop.start(asyncio.get_running_loop())
        running, waiting = asyncio.Queue(), asyncio.Queue()
        params = SamplingParams(max_new_tokens=40, min_new_tokens=40)
        await loop.submit([5, 6, 7], "a", params, sink=running)
        await running.get()
        await loop.submit([5, 6, 7], "b", params, sink=waiting)
        await loop.call(lambda: bank.remove("b"))
        tokens, end = await drain(waiting)  # when the row frees up, the engine finds the prefix gone
        assert tokens == [] and end.status == "failed" and "removed" in end.error
        _, end = await drain(running)
        assert end.status == "finished"
        sinks = [asyncio.Queue(), asyncio.Queue()]  # one runs, one waits
        for sink in sinks:
            await loop.submit([5, 6, 7], "a", params, sink=sink)
        await sinks[0].get()
        await asyncio.to_thread(loop.stop)
        for sink in sinks:
            _, end = await drain(sink)
            assert end.status == "error" and "shutting down" in end.error
        assert not loop.alive

    asyncio.run(main())
    assert counting.num_running == 0 and counting.num_waiting == 0
