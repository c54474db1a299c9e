"""Errors in OpenAI's format: every failed request is answered ``{"error": {"message", "type", "param", "code"}}``.

``type`` follows OpenAI's names (``invalid_request_error`` for what the client can fix, ``authentication_error``,
``permission_error``, ``not_found_error``, ``server_error``); ``code`` is a short machine-readable string;
``param`` names the request field at fault, or is null.
"""

from __future__ import annotations

from typing import Any

__all__ = ["APIError", "error_body"]

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    500: "server_error",
    503: "server_error",
}


def error_body(
    status: int, message: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """The JSON body of an error answer."""
    return {
        "error": {
            "message": message,
            "type": _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error"),
            "param": param,
            "code": code,
        }
    }


class APIError(Exception):
    """An error answer: HTTP ``status``, a message that says what was wrong and what is allowed, the ``param``
    at fault, a ``code``, and extra response ``headers`` (``Retry-After`` for 503)."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, self.param, self.code)
