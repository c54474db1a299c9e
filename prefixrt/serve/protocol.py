"""The OpenAI request bodies the server takes, checked field by field.

A body is parsed by pydantic (a wrong type or range is a 422 naming the field); then every field is accounted
for: a field OpenAI defines that prefixrt does not implement (``logprobs``, ``echo``, ``best_of``, ``suffix``,
``logit_bias``, non-zero ``presence_penalty`` / ``frequency_penalty``, ``tools``, ...) is a 400 naming it when it
is set to anything but its neutral value, and a field nobody defines is a 400 too: nothing is ignored silently.

Extensions (as vLLM names them): ``top_k`` (``0`` or ``-1``: off), ``min_tokens``, ``repetition_penalty`` and
``return_token_ids`` (each choice then carries ``token_ids``, and the answer ``prompt_token_ids``).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from prefixrt.serve.errors import APIError

__all__ = [
    "ChatCompletionRequest",
    "CompletionRequest",
    "PrefixLoadRequest",
    "parse_body",
    "prompt_kind",
]

# field -> the values that mean "not used" (anything else is refused with a 400 naming the field)
_COMPLETION_UNSUPPORTED: dict[str, tuple] = {
    "logprobs": (None,),
    "echo": (None, False),
    "best_of": (None, 1),
    "suffix": (None, ""),
    "logit_bias": (None, {}),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
}
_CHAT_UNSUPPORTED: dict[str, tuple] = {
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "logit_bias": (None, {}),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "parallel_tool_calls": (None,),
    "functions": (None, []),
    "function_call": (None, "none"),
    "response_format": (None, {"type": "text"}),
    "audio": (None,),
    "modalities": (None, ["text"]),
    "prediction": (None,),
    "reasoning_effort": (None,),
    "web_search_options": (None,),
    "store": (None, False),
    "service_tier": (None, "auto", "default"),
}


class _Body(BaseModel):
    # unknown fields are collected (model_extra) and refused by parse_body, not ignored
    model_config = ConfigDict(extra="allow")


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    """What completions and chat completions share."""

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=-1)
    min_tokens: int = Field(default=0, ge=0)
    repetition_penalty: float = Field(default=1.0, gt=0.0)
    n: int = Field(default=1, ge=1, le=128)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    user: str | None = None  # the end user's id: metadata, it changes no output
    return_token_ids: bool = False

    def stop_strings(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4:
            raise APIError(400, f"stop takes at most 4 strings, got {len(stops)}", param="stop")
        if any(s == "" for s in stops):
            raise APIError(400, "stop strings must not be empty", param="stop")
        return stops


class CompletionRequest(_Sampling):
    prompt: Any = None
    logprobs: Any = None
    echo: Any = None
    best_of: Any = None
    suffix: Any = None
    logit_bias: Any = None
    presence_penalty: Any = None
    frequency_penalty: Any = None


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict] | None = None
    name: str | None = None

    def text(self, index: int) -> str:
        """The message's text (a list of ``{"type": "text", "text": ...}`` parts is joined)."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for j, part in enumerate(self.content):
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise APIError(
                    400,
                    f"messages[{index}].content[{j}]: only text parts are supported, got type {part.get('type')!r}",
                    param=f"messages[{index}].content",
                )
            parts.append(part["text"])
        return "".join(parts)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: Any = None
    top_logprobs: Any = None
    logit_bias: Any = None
    presence_penalty: Any = None
    frequency_penalty: Any = None
    tools: Any = None
    tool_choice: Any = None
    parallel_tool_calls: Any = None
    functions: Any = None
    function_call: Any = None
    response_format: Any = None
    audio: Any = None
    modalities: Any = None
    prediction: Any = None
    reasoning_effort: Any = None
    web_search_options: Any = None
    store: Any = None
    service_tier: Any = None
    metadata: dict[str, str] | None = None  # stored nowhere; accepted as OpenAI does without `store`


class PrefixLoadRequest(_Body):
    """``POST /v1/prefixes``: a bank file's entry (``bank`` + ``entry``, default the same name) or a PEFT adapter
    directory (``peft``), a path under the server's ``--prefix-dir``."""

    name: str = Field(min_length=1, max_length=200)
    bank: str | None = None
    entry: str | None = None
    peft: str | None = None
    replace: bool = False


def _validation_error(err: ValidationError) -> APIError:
    first = err.errors()[0]
    param = ".".join(str(p) for p in first["loc"]) or None
    return APIError(
        422,
        f"{param or 'body'}: {first['msg']} (got {first.get('input')!r})"
        + (f"; and {len(err.errors()) - 1} more error(s)" if len(err.errors()) > 1 else ""),
        param=param,
        code="invalid_value",
    )


def _check_extra(model: BaseModel, where: str = "") -> None:
    extra = model.model_extra or {}
    if extra:
        name = where + next(iter(extra))
        raise APIError(
            400,
            f"unsupported field {name!r}: prefixrt serve does not implement it (unknown fields are refused, not "
            "ignored)",
            param=name,
            code="unsupported_parameter",
        )


def parse_body(cls: type[BaseModel], data: Any) -> Any:
    """Validate a decoded JSON body as ``cls``; unknown and unsupported fields are a 400 naming them."""
    if not isinstance(data, dict):
        raise APIError(400, f"the body must be a JSON object, got {type(data).__name__}", code="invalid_json")
    try:
        body = cls.model_validate(data)
    except ValidationError as err:
        raise _validation_error(err) from None
    _check_extra(body)
    if isinstance(body, _Sampling) and body.stream_options is not None:
        _check_extra(body.stream_options, "stream_options.")
        if not body.stream:
            raise APIError(400, "stream_options is only allowed with stream=true", param="stream_options")
    if isinstance(body, ChatCompletionRequest):
        for i, message in enumerate(body.messages):
            _check_extra(message, f"messages[{i}].")
    table = _COMPLETION_UNSUPPORTED if isinstance(body, CompletionRequest) else {}
    table = _CHAT_UNSUPPORTED if isinstance(body, ChatCompletionRequest) else table
    for name, neutral in table.items():
        value = getattr(body, name)
        if not _is_neutral(value, neutral):
            raise APIError(
                400,
                f"{name}={value!r} is not supported by prefixrt serve (leave it out"
                + "".join(f" or pass {v!r}" for v in neutral if v is not None)
                + ")",
                param=name,
                code="unsupported_parameter",
            )
    return body


def _is_neutral(value: Any, neutral: tuple) -> bool:
    if value is None:
        return True
    return any(
        n is not None and value == n and isinstance(value, bool) == isinstance(n, bool) for n in neutral
    )


def prompt_kind(prompt: Any) -> tuple[str, list]:
    """``("text", [str, ...])`` or ``("ids", [[int, ...], ...])``; a 400 for anything else."""
    if isinstance(prompt, str):
        return "text", [prompt]
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt):
            return "text", list(prompt)
        if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return "ids", [list(prompt)]
        if all(
            isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p)
            for p in prompt
        ):
            return "ids", [list(p) for p in prompt]
    raise APIError(
        400,
        "prompt must be a string, a list of strings, a list of token ids, or a list of non-empty lists of token "
        f"ids; got {_describe(prompt)}",
        param="prompt",
    )


def _describe(value: Any) -> str:
    if value is None:
        return "nothing"
    if isinstance(value, list):
        return "an empty list" if not value else f"a list starting with {type(value[0]).__name__}"
    return type(value).__name__
