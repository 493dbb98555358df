"""Errors answered in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}`` with an HTTP status.

Clients are written against OpenAI's API, so a bad request gets what OpenAI would send: a 4xx status and a
message that says what was wrong and what is valid. Ollama's endpoints answer the same errors as
``{"error": "..."}`` (:mod:`edgekit.server.ollama`).
"""

from __future__ import annotations

from typing import Any


class ApiError(Exception):
    """An HTTP error answered in OpenAI's shape. Raised by handlers; never leaves the server."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, type=self.type, param=self.param, code=self.code)


def error_body(message: str, *, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad(message: str, param: str | None = None, code: str | None = "invalid_value") -> ApiError:
    return ApiError(400, message, param=param, code=code)
