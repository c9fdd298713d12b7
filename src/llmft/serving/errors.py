"""Errors a client sees, in the shape its API speaks.

Everything a request can get wrong raises `RequestError` (a status code and a one-line message
naming the problem); `error_response` renders it as OpenAI does under /v1 (``{"error":
{"message", "type", "param", "code"}}``) and as Ollama does under /api (``{"error": message}``).
"""

from __future__ import annotations

from collections.abc import Mapping

from starlette.responses import JSONResponse

# OpenAI's error types by status code.
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error",
               429: "rate_limit_error", 503: "server_busy", 500: "server_error"}


class RequestError(Exception):
    """A request the server cannot serve: an HTTP status, a message, and OpenAI's `param` (the
    field at fault) and `code` where there is one."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = dict(headers or {})


def is_ollama_path(path: str) -> bool:
    return path == "/api" or path.startswith("/api/")


def error_body(path: str, error: RequestError) -> dict:
    """The JSON body of an error on `path`: Ollama's shape under /api, else OpenAI's."""
    if is_ollama_path(path):
        return {"error": error.message}
    return {"error": {"message": error.message, "type": ERROR_TYPES.get(error.status, "invalid_request_error"),
                      "param": error.param, "code": error.code}}


def error_response(path: str, error: RequestError) -> JSONResponse:
    return JSONResponse(error_body(path, error), status_code=error.status, headers=error.headers)
