"""The outermost ASGI layer and the error answers: API-key check, requests counted by status, no traceback to
any client; ApiError and Starlette's 404/405 answered in OpenAI's error shape."""

from __future__ import annotations

import hmac
import logging

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from .api_errors import ApiError, error_body
from .jobs import send_json
from .state import ServerState

log = logging.getLogger("edgekit.server")

# The paths requests are counted under by name (metrics label); any other counts as "other".
_PATHS = ("/health", "/metrics", "/v1/models", "/v1/chat/completions", "/api/chat", "/api/generate", "/api/tags",
          "/api/show", "/api/ps", "/api/version")


async def api_error(request: Request, exc: ApiError) -> Response:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


async def http_error(request: Request, exc: HTTPException) -> Response:
    if exc.status_code == 404:
        msg = (f"there is no {request.method} {request.url.path[:200]}: this server offers GET /health, "
               "GET /metrics, GET /v1/models, POST /v1/chat/completions and Ollama's /api/chat, /api/generate, "
               "/api/tags, /api/show, /api/ps, /api/version")
        return JSONResponse(error_body(msg, code="unknown_url"), status_code=404)
    if exc.status_code == 405:
        msg = f"{request.method} is not allowed on {request.url.path}: use {exc.headers.get('Allow', 'another method')}"
        return JSONResponse(error_body(msg, code="method_not_allowed"), status_code=405, headers=exc.headers)
    return JSONResponse(error_body(str(exc.detail)), status_code=exc.status_code, headers=exc.headers)


def _path_label(path: str) -> str:
    if path in _PATHS:
        return path
    return "/v1/models/{id}" if path.startswith("/v1/models/") else "other"


class Guard:
    """Outermost ASGI layer: API-key check, request counting by status, and no traceback to any client."""

    def __init__(self, app, state: ServerState):
        self.app = app
        self.state = state

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 0

        async def counted(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            denied = self._check_key(scope)
            if denied is not None:
                # Ollama's clients read {"error": "..."}; OpenAI's {"error": {"message": ...}}
                body = {"error": denied.message} if scope.get("path", "").startswith("/api/") else denied.body()
                await send_json(counted, 401, body, denied.headers)
            else:
                await self.app(scope, receive, counted)
        except Exception:  # logged here with its traceback; the client gets a generic 500
            log.exception("unhandled error on %s %s", scope.get("method"), scope.get("path"))
            if status == 0:
                await send_json(counted, 500, error_body("internal server error; details are in the server log",
                                                          type="server_error", code="internal_error"))
        finally:
            # no status at all: the client left before an answer was started (nginx's 499)
            self.state.metrics.requests.inc(_path_label(scope.get("path", "")), str(status or 499))

    def _check_key(self, scope) -> ApiError | None:
        key = self.state.api_key
        if key is None or scope.get("path") == "/health":
            return None
        given = None
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                if scheme.lower() == b"bearer":
                    given = token.strip()
        headers = {"WWW-Authenticate": "Bearer"}
        if given is None:
            return ApiError(401, "missing API key: send the header 'Authorization: Bearer <key>' with the key "
                                 "edgekit serve was started with", code="missing_api_key", headers=headers)
        if not hmac.compare_digest(given, key):
            return ApiError(401, "invalid API key: use the key edgekit serve was started with (--api-key or "
                                 "--api-key-file)", code="invalid_api_key", headers=headers)
        return None
