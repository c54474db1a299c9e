"""The OpenAI-compatible HTTP app: the prefix is the model name.

Routes
------
``POST /v1/completions``, ``POST /v1/chat/completions`` (where the tokenizer has a chat template),
``GET /v1/models`` (the base model and every prefix, ``parent`` = the base), ``GET /v1/models/{name}``,
``POST /v1/prefixes`` and ``DELETE /v1/prefixes/{name}`` (with ``allow_prefix_updates``), ``GET /health``,
``GET /metrics`` (Prometheus text). With an API key every ``/v1`` route needs ``Authorization: Bearer <key>``.

``model`` names a prefix of the bank (that prefix), or the base model (no prefix); anything else is a 404.
Every error is OpenAI's body ``{"error": {"message", "type", "param", "code"}}`` (:mod:`prefixrt.serve.errors`).

Requests
--------
A completion's prompt is text, a list of texts, token ids, or a list of token-id lists; each prompt gets ``n``
choices (choice ``i`` of prompt ``p`` has index ``p * n + i``), each an engine request. ``seed`` makes sampling
reproducible: choice ``index`` samples with seed ``seed + index`` (the same tokens as ``prefixrt.generate`` on
that prompt repeated ``n`` times with ``seed``). ``temperature`` 0 is greedy search. For BART the prompt is the
source and the completion the decoder's text.

Admission: the engine runs ``max_batch_size`` requests and ``max_waiting`` more may wait; a request whose choices
would go beyond that is a 503 with ``Retry-After``. A prompt that does not fit the model's positions (or the
engine's pool) with ``max_tokens`` is a 400 naming both numbers.

Disconnects: a client that goes away (streaming or not) has its requests aborted; the engine frees their K/V
before its next step.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from prefixrt.serve.errors import APIError
from prefixrt.serve.handlers import Server, model_card
from prefixrt.serve.metrics import CONTENT_TYPE_LATEST
from prefixrt.serve.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    PrefixLoadRequest,
    parse_body,
)
from prefixrt.serve.state import ServeState

__all__ = ["create_app"]

log = logging.getLogger("prefixrt.serve")


def _error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


# -- the app ---------------------------------------------------------------------------------------------------------
class _ApiKey:
    """With an API key, every ``/v1`` route needs ``Authorization: Bearer <key>`` (a 401 otherwise). A plain ASGI
    middleware: nothing is wrapped, so streams and disconnects pass through as they are."""

    def __init__(self, app, state: ServeState):
        self.app, self.state = app, state
        key = state.config.api_key
        self.expected = None if key is None else ("Bearer " + key).encode()

    async def __call__(self, scope, receive, send) -> None:
        if self.expected is not None and scope["type"] == "http" and scope["path"].startswith("/v1"):
            header = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
            if not secrets.compare_digest(header.strip(), self.expected):
                self.state.metrics.http_errors.labels("401").inc()
                err = APIError(
                    401,
                    "missing or wrong API key: send 'Authorization: Bearer <key>'",
                    code="invalid_api_key",
                )
                await _error_response(err)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(state: ServeState) -> FastAPI:
    """The FastAPI app over ``state``; its lifespan starts and stops the engine loop."""
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.loop.start(asyncio.get_running_loop())
        try:
            yield
        finally:
            await asyncio.to_thread(state.loop.stop)

    app = FastAPI(title="prefixrt serve", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.serve = state
    server = Server(state)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, err: APIError):
        state.metrics.http_errors.labels(str(err.status)).inc()
        return _error_response(err)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, err: RequestValidationError):
        first = err.errors()[0] if err.errors() else {"loc": (), "msg": str(err)}
        param = ".".join(str(p) for p in first.get("loc", ()))
        return await _api_error(request, APIError(422, f"{param}: {first['msg']}", param=param or None))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException):
        message = {404: f"no route {request.url.path}", 405: f"{request.method} is not allowed here"}
        return await _api_error(
            request, APIError(err.status_code, message.get(err.status_code, str(err.detail)))
        )

    @app.exception_handler(Exception)
    async def _internal(request: Request, err: Exception):
        log.exception("internal error on %s", request.url.path)
        return await _api_error(request, APIError(500, f"internal error: {type(err).__name__}: {err}"))

    app.add_middleware(_ApiKey, state=state)

    @app.get("/health")
    async def health():
        if not state.loop.alive:
            raise APIError(503, "the engine loop is not running", code="engine_down")
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        names = [state.config.model_name, *state.prefixes]
        return {"object": "list", "data": [model_card(state, n) for n in names]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str):
        server.resolve_model(name)
        return model_card(state, name)

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = parse_body(CompletionRequest, await _json(request))
        return await server.completions(request, body)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = parse_body(ChatCompletionRequest, await _json(request))
        return await server.chat(request, body)

    @app.post("/v1/prefixes", status_code=201)
    async def load_prefix(request: Request):
        server.require_updates()
        body = parse_body(PrefixLoadRequest, await _json(request))
        return await server.load_prefix(body)

    @app.delete("/v1/prefixes/{name:path}")
    async def delete_prefix(name: str):
        server.require_updates()
        return await server.delete_prefix(name)

    return app


async def _json(request: Request) -> Any:
    raw = await request.body()
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise APIError(400, f"the body is not valid JSON: {err}", code="invalid_json") from None
