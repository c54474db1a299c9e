"""What the routes of ``prefixrt serve`` do: resolve the model name, tokenize and check prompts, admit the
choices to the engine loop, and answer them whole or as server-sent events (see :mod:`prefixrt.serve.app` for the
routes and the request rules).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import anyio
from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from prefixrt.engine import SamplingParams
from prefixrt.serve.engine_loop import Handle, Update
from prefixrt.serve.errors import APIError
from prefixrt.serve.prefixes import read_entry
from prefixrt.serve.protocol import ChatCompletionRequest, CompletionRequest, PrefixLoadRequest, prompt_kind
from prefixrt.serve.state import ServeState, Sink, bank_snapshot
from prefixrt.serve.text import TextTracker

__all__ = ["EventStream", "Server", "model_card"]

_DISCONNECTED = Update(-1, [], None)  # put on a sink when the client went away


class EventStream(StreamingResponse):
    """Server-sent events that always watch for the client going away (whatever ASGI version the server
    speaks): the body's generator is then cancelled, and its ``finally`` aborts the requests."""

    media_type = "text/event-stream"

    async def __call__(self, scope, receive, send) -> None:
        async with anyio.create_task_group() as group:

            async def stream() -> None:
                try:
                    await self.stream_response(send)
                except OSError:  # the connection broke while sending
                    pass
                group.cancel_scope.cancel()

            group.start_soon(stream)
            await self.listen_for_disconnect(receive)
            group.cancel_scope.cancel()


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


def model_card(state: ServeState, name: str) -> dict:
    base = state.config.model_name
    card = {"id": name, "object": "model", "created": state.created, "owned_by": "prefixrt", "root": base}
    if name == base:
        card.update(parent=None, model_type=state.model_type, max_model_len=state.max_positions)
    else:
        card.update(parent=base, prefix_length=state.prefixes[name])
    return card


@dataclass
class _Job:
    """One HTTP generation request: its choices, their text, and how they end."""

    kind: str  # "completion" or "chat"
    body: Any
    prompts: list[list[int]]
    prefix: str | None
    stops: list[str]
    max_tokens: int
    id: str = ""
    created: int = 0
    handles: list[Handle] = field(default_factory=list)
    trackers: list[TextTracker] = field(default_factory=list)
    ends: list[Any] = field(default_factory=list)


class Server:
    """The routes' logic over a :class:`ServeState` (runs on the asyncio thread)."""

    def __init__(self, state: ServeState):
        self.state = state

    # -- checks ------------------------------------------------------------------------------------------------
    def resolve_model(self, name: str) -> str | None:
        """The prefix ``name`` selects (None: the base model); a 404 for an unknown name."""
        state = self.state
        if name == state.config.model_name:
            return None
        if name in state.prefixes:
            return name
        raise APIError(
            404,
            f"The model {name!r} does not exist: this server serves {state.config.model_name!r} and the "
            f"prefixes {sorted(state.prefixes)} (GET /v1/models lists them)",
            param="model",
            code="model_not_found",
        )

    def require_updates(self) -> None:
        if not self.state.config.allow_prefix_updates:
            raise APIError(
                403,
                "prefix updates are off: start the server with --allow-prefix-updates --prefix-dir DIR",
                code="prefix_updates_disabled",
            )

    def tokenize_prompts(self, prompt: Any) -> list[list[int]]:
        state, tok = self.state, self.state.tokenizer
        kind, prompts = prompt_kind(prompt)
        if kind == "ids":
            for i, ids in enumerate(prompts):
                bad = [t for t in ids if not 0 <= t < state.vocab_size]
                if bad:
                    raise APIError(
                        400,
                        f"prompt {i} holds token ids {bad[:5]} outside the vocabulary [0, {state.vocab_size})",
                        param="prompt",
                    )
            return prompts
        out = []
        for text in prompts:
            ids = tok(text).input_ids
            if not ids:  # OpenAI: an empty prompt is generated as from the start of a new document
                start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
                if start is None:
                    raise APIError(
                        400, "the prompt is empty and the tokenizer has no BOS token", param="prompt"
                    )
                ids = [start]
            out.append(ids)
        return out

    def check_fits(self, prompts: list[list[int]], prefix: str | None, max_tokens: int, param: str) -> None:
        """A 400 naming both numbers when a prompt and ``max_tokens`` cannot fit the model or the engine."""
        state = self.state
        if max_tokens > state.max_new_tokens:
            raise APIError(
                400,
                f"{param}={max_tokens} is more than this server generates per request ({state.max_new_tokens}, "
                "--max-new-tokens)",
                param=param,
                code="max_tokens_too_large",
            )
        shift = 0
        if prefix is not None and state.position_offset == "prefix":
            shift = state.prefixes[prefix].get("decoder", 0)
        what = "source" if state.model_type == "bart" else "prompt"
        for ids in prompts:
            n = len(ids)
            if n > state.max_prompt_tokens:
                raise APIError(
                    400,
                    f"the {what} has {n} tokens; this server takes at most {state.max_prompt_tokens} "
                    "(--max-prompt-tokens)",
                    param="prompt",
                    code="context_length_exceeded",
                )
            decoder = (n if state.model_type == "gpt2" else 1) + max_tokens
            limit = state.max_positions - shift
            if decoder > limit or n > state.max_positions:
                by_prefix = f", less {shift} taken by the prefix {prefix!r}" if shift else ""
                detail = (
                    f"{n} in the prompt + {max_tokens} for the completion = {n + max_tokens}"
                    if state.model_type == "gpt2"
                    else f"1 decoder start token + {max_tokens} for the completion = {1 + max_tokens}, source {n}"
                )
                raise APIError(
                    400,
                    f"This model's maximum context length is {state.max_positions} tokens{by_prefix}; the request "
                    f"needs {detail}. Shorten the prompt or lower {param}.",
                    param=param,
                    code="context_length_exceeded",
                )

    def sampling(self, body: Any, max_tokens: int, index: int) -> SamplingParams:
        kwargs: dict[str, Any] = {"max_new_tokens": max_tokens}
        if body.temperature > 0:
            kwargs.update(do_sample=True, temperature=body.temperature, top_p=body.top_p)
            kwargs["top_k"] = body.top_k if body.top_k > 0 else 0  # 0: off (HF would default to 50)
            if body.seed is not None:
                kwargs["seed"] = body.seed + index
        if body.min_tokens:
            if body.min_tokens > max_tokens:
                raise APIError(
                    400,
                    f"min_tokens={body.min_tokens} is more than max_tokens={max_tokens}",
                    param="min_tokens",
                )
            kwargs["min_new_tokens"] = body.min_tokens
        if body.repetition_penalty != 1.0:
            kwargs["repetition_penalty"] = body.repetition_penalty
        return SamplingParams(**kwargs)

    # -- routes ------------------------------------------------------------------------------------------------
    async def load_prefix(self, body: PrefixLoadRequest) -> dict:
        """Read the entry off the loop thread, then add it to the bank on the loop thread."""
        state = self.state
        if body.name == state.config.model_name:
            raise APIError(400, f"{body.name!r} is the base model's name", param="name")
        if body.name in state.prefixes and not body.replace:
            raise APIError(
                409,
                f"a prefix named {body.name!r} is already served; DELETE it first or pass replace=true",
                param="name",
                code="prefix_exists",
            )
        kv = await asyncio.to_thread(
            read_entry,
            state.config.prefix_dir,
            state.bank,
            bank_file=body.bank,
            entry=body.entry,
            peft=body.peft,
            name=body.name,
        )
        bank = state.bank

        def add() -> dict:
            bank.add(body.name, kv, replace=body.replace)
            return bank_snapshot(bank)

        try:
            state.prefixes = await state.loop.call(add)
        except ValueError as err:  # wrong architecture, NaN, exists (a concurrent load won)
            raise APIError(400, f"cannot add prefix {body.name!r}: {err}", param="name") from None
        state.metrics.prefixes.set(len(state.prefixes))
        return model_card(state, body.name)

    async def delete_prefix(self, name: str) -> dict:
        """Remove a prefix on the loop thread: running requests finish with it, waiting ones fail, new ones
        get a 404."""
        state = self.state
        if name == state.config.model_name:
            raise APIError(400, f"{name!r} is the base model, not a prefix", param="name")
        self.resolve_model(name)
        bank = state.bank

        def remove() -> dict:
            bank.remove(name)
            return bank_snapshot(bank)

        try:
            state.prefixes = await state.loop.call(remove)
        except KeyError:  # removed meanwhile
            raise APIError(
                404, f"The model {name!r} does not exist", param="model", code="model_not_found"
            ) from None
        state.metrics.prefixes.set(len(state.prefixes))
        return {"id": name, "object": "model", "deleted": True}

    async def completions(self, request: Request, body: CompletionRequest):
        if body.prompt is None:
            raise APIError(422, "prompt: field required", param="prompt", code="invalid_value")
        prefix = self.resolve_model(body.model)
        prompts = self.tokenize_prompts(body.prompt)
        max_tokens = body.max_tokens or self.state.config.default_max_tokens
        job = _Job("completion", body, prompts, prefix, body.stop_strings(), max_tokens)
        self.check_fits(prompts, prefix, max_tokens, "max_tokens")
        return await self.run(request, job)

    async def chat(self, request: Request, body: ChatCompletionRequest):
        state, tok = self.state, self.state.tokenizer
        prefix = self.resolve_model(body.model)
        if getattr(tok, "chat_template", None) is None:
            raise APIError(
                400,
                f"the model {body.model!r} has no chat template (its tokenizer defines none): use /v1/completions, "
                "or start the server with --chat-template FILE",
                param="messages",
                code="no_chat_template",
            )
        messages = [
            {"role": m.role, "content": m.text(i), **({"name": m.name} if m.name else {})}
            for i, m in enumerate(body.messages)
        ]
        if not messages:
            raise APIError(400, "messages must not be empty", param="messages")
        try:
            text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as err:
            raise APIError(
                400, f"the chat template failed on these messages: {err}", param="messages"
            ) from None
        prompts = [tok(text, add_special_tokens=state.model_type == "bart").input_ids]
        if body.max_tokens is not None and body.max_completion_tokens is not None:
            raise APIError(400, "give max_tokens or max_completion_tokens, not both", param="max_tokens")
        param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        max_tokens = body.max_completion_tokens or body.max_tokens
        if max_tokens is None:  # what the context leaves, up to the server's limit
            n = len(prompts[0])
            shift = (
                state.prefixes[prefix].get("decoder", 0)
                if prefix and state.position_offset == "prefix"
                else 0
            )
            used = (n if state.model_type == "gpt2" else 1) + shift
            max_tokens = max(1, min(state.max_new_tokens, state.max_positions - used))
        job = _Job("chat", body, prompts, prefix, body.stop_strings(), max_tokens)
        self.check_fits(prompts, prefix, max_tokens, param)
        return await self.run(request, job)

    async def run(self, request: Request, job: _Job):
        """Admit, submit every choice, then answer (a JSON body, or an event stream)."""
        state = self.state
        body, n = job.body, job.body.n
        k = len(job.prompts) * n
        if k > state.capacity:
            raise APIError(
                400,
                f"{len(job.prompts)} prompt(s) x n={n} = {k} requests, more than this server ever holds "
                f"({state.capacity}: --max-batch-size + --max-waiting)",
                param="n",
            )
        if not state.loop.alive:
            raise APIError(503, "the engine loop is not running", code="engine_down")
        if state.in_flight + k > state.capacity:
            raise APIError(
                503,
                f"the server is full: {state.in_flight} requests running or waiting, at most {state.capacity} "
                f"(--max-batch-size {state.max_batch_size} + --max-waiting {state.config.max_waiting}); retry "
                "later",
                code="overloaded",
                headers={"Retry-After": str(state.config.retry_after_s)},
            )
        params = [self.sampling(body, job.max_tokens, i) for i in range(k)]  # may raise: before admission
        arrival = time.monotonic()
        state.in_flight += k  # reserved now (no await between the check and here); released as choices end
        sink = Sink(state)
        job.id = ("chatcmpl-" if job.kind == "chat" else "cmpl-") + uuid.uuid4().hex
        job.created = int(time.time())
        job.trackers = [TextTracker(state.tokenizer, job.stops) for _ in range(k)]
        job.ends = [None] * k
        submitted = 0
        try:
            for p, ids in enumerate(job.prompts):
                for i in range(n):
                    index = p * n + i
                    job.handles.append(
                        await state.loop.submit(
                            ids,
                            job.prefix,
                            params[index],
                            sink=sink,
                            index=index,
                            label=body.model,
                            arrival=arrival,
                        )
                    )
                    submitted += 1
        except BaseException as err:
            state.in_flight -= k - submitted  # the submitted ones are released when their End arrives
            self._abort_all(job)
            raise self._submit_error(err, job) from None
        if body.stream:
            return EventStream(
                self._stream(job, sink), headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
            )
        return await self._collect(request, job, sink)

    def _submit_error(self, err: BaseException, job: _Job) -> BaseException:
        if isinstance(err, APIError) or not isinstance(err, Exception):
            return err
        if isinstance(err, KeyError):  # the prefix went away between the check and the engine
            return APIError(404, f"The model {job.body.model!r} does not exist: {err}", param="model",
                            code="model_not_found")  # fmt: skip
        if isinstance(err, ValueError):  # the engine's own limits (it says which)
            return APIError(400, str(err), param="prompt", code="context_length_exceeded")
        if isinstance(err, RuntimeError):
            return APIError(503, str(err), code="engine_down")
        return err

    def _abort_all(self, job: _Job, reason: str = "aborted") -> None:
        for handle in job.handles:
            if not handle.ended:
                self.state.loop.abort(handle, reason)

    def _take(self, job: _Job, update: Update) -> str:
        """Apply one update to its choice; returns the new text to send. A choice that met a stop string is
        aborted in the engine (its remaining tokens would be thrown away)."""
        tracker = job.trackers[update.index]
        was_stopped = tracker.stopped
        delta = tracker.push(update.tokens, final=update.end is not None)
        if update.end is not None:
            job.handles[update.index].ended = True
            job.ends[update.index] = update.end
        elif tracker.stopped and not was_stopped:
            self.state.loop.abort(job.handles[update.index], "stop")
        return delta

    def _finish_reason(self, job: _Job, index: int) -> str | None:
        end = job.ends[index]
        if job.trackers[index].stopped:
            return "stop"
        if end is None:
            return None
        return {"eos": "stop", "length": "length"}.get(end.reason, end.reason)

    def _failure(self, job: _Job) -> APIError | None:
        """The error of the first choice that failed (its prefix was removed while it waited, the engine broke,
        the server is shutting down), or None."""
        for end in job.ends:
            if end is not None and end.status in ("failed", "error"):
                if job.prefix is not None and job.prefix not in self.state.prefixes:
                    return APIError(404, f"The model {job.prefix!r} was removed: {end.error}", param="model",
                                    code="model_not_found")  # fmt: skip
                if end.status == "error":
                    if not self.state.loop.alive:  # shutting down
                        return APIError(503, end.error or "the server is shutting down", code="engine_down")
                    return APIError(500, end.error or "the request failed", code="engine_error")
                return APIError(400, end.error or "the request failed", code="request_failed")
        return None

    def _usage(self, job: _Job) -> dict:
        prompt = sum(len(p) for p in job.prompts)
        completion = sum(len(t.tokens) for t in job.trackers)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    async def _collect(self, request: Request, job: _Job, sink: Sink):
        """Wait for every choice (or the client leaving), then one JSON answer."""

        async def watch() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass
            sink.put_nowait(_DISCONNECTED)

        watcher = asyncio.create_task(watch())
        remaining = len(job.trackers)
        try:
            while remaining:
                update = await sink.get()
                if update is _DISCONNECTED:
                    return Response(status_code=499)  # nobody reads it
                self._take(job, update)
                remaining -= update.end is not None
        finally:
            watcher.cancel()
            self._abort_all(job)
        failure = self._failure(job)
        if failure is not None:
            raise failure
        choices = []
        for index, tracker in enumerate(job.trackers):
            choice: dict[str, Any] = {"index": index}
            if job.kind == "chat":
                choice["message"] = {"role": "assistant", "content": tracker.text}
            else:
                choice["text"] = tracker.text
            choice.update(logprobs=None, finish_reason=self._finish_reason(job, index))
            if job.body.return_token_ids:
                choice["token_ids"] = list(tracker.tokens)
            choices.append(choice)
        answer = {
            "id": job.id,
            "object": "chat.completion" if job.kind == "chat" else "text_completion",
            "created": job.created,
            "model": job.body.model,
            "choices": choices,
            "usage": self._usage(job),
            "system_fingerprint": None,
        }
        if job.body.return_token_ids:
            answer["prompt_token_ids"] = job.prompts if len(job.prompts) > 1 else job.prompts[0]
        return JSONResponse(answer)

    async def _stream(self, job: _Job, sink: Sink) -> AsyncIterator[str]:
        """OpenAI's chunks as server-sent events, ``data: [DONE]`` last. Cancelled when the client leaves (then
        the ``finally`` aborts every choice still running)."""
        chat = job.kind == "chat"
        head = {
            "id": job.id,
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": job.created,
            "model": job.body.model,
        }
        include_usage = bool(job.body.stream_options and job.body.stream_options.include_usage)

        def chunk(index: int, text: str | None, finish: str | None, role: bool = False) -> str:
            choice: dict[str, Any] = {"index": index}
            if chat:
                delta: dict[str, Any] = {"role": "assistant"} if role else {}
                if text is not None:
                    delta["content"] = text
                choice["delta"] = delta
            else:
                choice["text"] = text or ""
            choice.update(logprobs=None, finish_reason=finish)
            out = {**head, "choices": [choice]}
            if include_usage:
                out["usage"] = None
            return _sse(out)

        remaining = len(job.trackers)
        try:
            if chat:
                for index in range(remaining):
                    yield chunk(index, "", None, role=True)
            while remaining:
                update = await sink.get()
                delta = self._take(job, update)
                if update.end is not None:
                    remaining -= 1
                    if update.end.status in ("failed", "error"):
                        failure = self._failure(job)
                        self._abort_all(job)
                        yield _sse(failure.body())
                        break
                    if delta:
                        yield chunk(update.index, delta, None)
                    yield chunk(update.index, None if chat else "", self._finish_reason(job, update.index))
                elif delta:
                    yield chunk(update.index, delta, None)
            else:
                if include_usage:
                    yield _sse({**head, "choices": [], "usage": self._usage(job)})
            yield "data: [DONE]\n\n"
        finally:
            self._abort_all(job)
