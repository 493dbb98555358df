"""The ASGI app: OpenAI's chat-completions API over one loaded :class:`edgekit.runtime.model.Model`.

``create_app(model)`` returns a Starlette app that can be driven without a port (tests) or run by uvicorn
(``edgekit.server.serve``). Requests are validated and tokenized first (bad ones get a 4xx in OpenAI's
error shape), then take a place at the generation slot (one generation at a time, ``max_queue`` waiting,
429 beyond), then generate on a worker thread that streams events back to the event loop.

The work before the slot is bounded too, so that a burst of large requests cannot grow the server: a
request is refused with 429 before it is even parsed when the line is full; parsing, rendering and
tokenizing run one request at a time on one thread of their own; the template's output is cut at what the
context could hold (``max_context`` tokens times the most characters one token of this tokenizer stands for)
and refused without tokenizing it; bodies are capped at ``max_body_bytes``. A client that
disconnects sets the runtime's ``cancel`` event, so its generation stops at the next token and the slot
passes on; the slot is only released when the worker thread has really finished with the model.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import logging
import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from ..errors import FormatError, FormatUnavailable, GenerationError, PromptTooLong, ToolError, UserInputError
from ..runtime.memory import release_free_heap
from ..units import fmt_bytes
from .jobs import ChatResponse, Job, send_json
from .metrics import ServerMetrics
from .ollama import routes as ollama_routes
from .queue import GenerationSlot, QueueFull, ShuttingDown
from .schemas import ApiError, bad, error_body, parse_chat, parse_json_body

log = logging.getLogger("edgekit.server")

MAX_BODY_BYTES = 8 * 1024 * 1024
_PATHS = ("/health", "/metrics", "/v1/models", "/v1/chat/completions", "/api/chat", "/api/generate", "/api/tags",
          "/api/show", "/api/ps", "/api/version")


def default_model_id(model) -> str:
    """The id clients see: the bundle folder's name (clients may send any model name; there is one)."""
    return Path(model.manifest.folder).resolve().name or "edgekit"


class ServerState:
    """Everything the handlers share. Lives in ``app.state.server``; touched only on the event loop's thread."""

    def __init__(self, *, api_key: str | None, max_queue: int, model_name: str | None, shutdown_timeout: float,
                 max_body_bytes: int, thinking_budget: int | None = None, tool_choice: str = "auto"):
        self.model = None
        self.tool_choice = tool_choice           # for requests with tools and no tool_choice
        self.thinking_budget = thinking_budget   # for requests that do not set one
        self.model_id = model_name
        self.api_key = api_key.encode("utf-8") if api_key else None
        self.slot = GenerationSlot(max_queue)
        self.metrics = ServerMetrics(max_queue)
        self.shutdown_timeout = shutdown_timeout
        self.max_body_bytes = max_body_bytes
        self.draining = False
        self.load_error: BaseException | None = None
        self.active: Job | None = None
        self.avg_generation_s = 1.0            # moving average, for Retry-After
        self.started = int(time.time())
        self._executor: ThreadPoolExecutor | None = None
        self._prepare: ThreadPoolExecutor | None = None

    # ----- lifecycle ----------------------------------------------------------------------------
    def attach(self, model) -> None:
        """The model is loaded: start serving it."""
        self.model = model
        if self.model_id is None:
            self.model_id = default_model_id(model)
        self.metrics.loaded.set(1)
        self.metrics.context.set(model.max_context)
        memory = getattr(model, "memory", None)
        if memory is not None and hasattr(memory, "total_bytes"):
            self.metrics.model_memory.set(memory.total_bytes)

    def begin_shutdown(self) -> None:
        """SIGTERM: refuse new work, drop the waiting line, give the running generation ``shutdown_timeout``."""
        if self.draining:
            return
        self.draining = True
        self.metrics.loaded.set(0)
        self.slot.close()
        if self.active is not None:
            asyncio.get_running_loop().call_later(self.shutdown_timeout, self._cut_active)

    def _cut_active(self) -> None:
        if self.active is not None:
            self.active.stop("shutdown")

    def executor(self) -> ThreadPoolExecutor:
        # One worker: generations are serialised by the slot anyway; created on first use, not at import.
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="edgekit-generate")
        return self._executor

    async def prepare(self, work: Callable[[], Any]) -> Any:
        """Run ``work`` (parse, render, tokenize a request) on the one thread for that: requests are prepared
        one at a time, so a burst of large ones holds one request's worth of memory, not one per request
        (and one thread's malloc arena, not one per worker thread)."""
        if self._prepare is None:
            self._prepare = ThreadPoolExecutor(max_workers=1, thread_name_prefix="edgekit-prepare")
        return await asyncio.get_running_loop().run_in_executor(self._prepare, work)

    def close(self) -> None:
        if not self.draining:
            self.begin_shutdown()
        if self.active is not None:
            self.active.stop("shutdown")
        for pool in (self._executor, self._prepare):
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)

    def join(self) -> None:
        """Wait for the worker thread to let go of the model (after ``close``; it stops at the next token)."""
        if self.active is not None:
            self.active.cancel.set()
        if self._executor is not None:
            self._executor.shutdown(wait=True)

    # ----- helpers ------------------------------------------------------------------------------
    def require_model(self):
        if self.draining:
            raise ApiError(503, "the server is shutting down: retry against another instance or after restart",
                           type="server_error", code="shutting_down")
        if self.model is None:
            raise ApiError(503, "the model is still loading: retry when GET /health answers 200",
                           type="server_error", code="model_loading", headers={"Retry-After": "5"})
        return self.model

    def queue_full(self) -> ApiError:
        return ApiError(429, f"the server is busy: one generation is running and {self.slot.depth} requests are "
                             f"waiting (the limit, --max-queue {self.slot.max_queue}); retry after the Retry-After "
                             "seconds", type="rate_limit_error", code="queue_full",
                        headers={"Retry-After": str(self.retry_after())})

    def retry_after(self) -> int:
        """Seconds until a place in line is likely free: the line ahead times the average generation."""
        return max(1, min(300, math.ceil(self.avg_generation_s * (self.slot.depth + 1))))


# ----- endpoints ----------------------------------------------------------------------------------
def _state(request: Request) -> ServerState:
    return request.app.state.server


async def _read_body(request: Request, limit: int) -> bytes:
    too_big = ApiError(413, f"the request body is larger than {fmt_bytes(limit)} (edgekit serve --max-body): send a "
                            "shorter conversation", code="request_too_large")
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise too_big
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_big
            chunks.append(chunk)
    except ClientDisconnect:
        raise bad("the client disconnected while sending the request") from None
    return b"".join(chunks)


async def chat_completions(request: Request) -> Response:
    job = await admit(request, parse_chat)
    return ChatResponse(job)


async def admit(request: Request, parse: Callable[[dict], Any]) -> Job:
    """Read, parse (``parse(body) -> params`` with ``runtime_kwargs()``), render and tokenize a request, then
    take a place at the slot: the one path every generating endpoint (OpenAI's and Ollama's) goes through."""
    state = _state(request)
    model = state.require_model()
    if state.slot.busy and state.slot.depth >= state.slot.max_queue:
        raise state.queue_full()     # before reading, parsing or tokenizing anything
    raw, ctype = await _read_body(request, state.max_body_bytes), request.headers.get("content-type")
    # No text of more characters than this fits the context: refused before tokenizing it.
    max_chars = model.max_context * model.codec.max_token_chars

    def prepare():
        # Parse, render and tokenize in one go: what a large request unpacks into is freed before the next
        # request's turn (parsing all waiting requests first would hold all of them at once).
        params = parse(parse_json_body(raw, ctype))
        if params.thinking_budget is None and state.thinking_budget is not None:
            params = dataclasses.replace(params, thinking_budget=state.thinking_budget)
        if getattr(params, "uses_tools", False):
            params = dataclasses.replace(params, tool_plan=_tool_plan(model, params, state.tool_choice))
        kwargs = params.runtime_kwargs()
        if kwargs.get("messages") is not None:
            model.codec.render(kwargs["messages"], add_generation_prompt=True, max_chars=max_chars,
                               **({"tools": kwargs["tools"]} if kwargs.get("tools") else {}))
        elif len(kwargs.get("prompt") or "") > max_chars:   # a raw prompt: no template to render
            raise PromptTooLong("the prompt is too long", limit=max_chars)
        return params, model.request(**kwargs)

    big = len(raw) > _TRIM_AFTER

    def prepare_and_trim():
        try:
            return prepare()
        finally:
            if big:
                _trim_heap()

    try:
        # Off the loop (parsing megabytes would stall every other connection): a bad or too-long prompt is
        # refused before it takes a place in line, with the numbers in the message.
        params, prepared = await state.prepare(prepare_and_trim)
    except PromptTooLong:
        raise _too_long(model, f"more than {max_chars} characters (no text that long fits in "
                               f"{model.max_context} tokens of this tokenizer)") from None
    except ToolError as e:
        raise bad(str(e), e.param) from None
    except GenerationError as e:
        raise bad(str(e), "messages") from None
    except FormatError as e:   # a schema the constraint library rejects: the field the client sent it in
        raise bad(str(e), e.field) from None
    except FormatUnavailable as e:
        raise ApiError(501, str(e), type="server_error", code="structured_output_unavailable") from None
    finally:
        raw = None   # the body is parsed: let it go before waiting for the slot
    n = len(prepared.prompt_ids)
    if n >= model.max_context:
        raise _too_long(model, f"{n} tokens")
    limit = getattr(params, "num_ctx", None)   # a client's own, smaller context (Ollama's options.num_ctx)
    if limit is not None and n >= limit:
        raise bad(f"the prompt has {n} tokens but the request's options.num_ctx is {limit}: shorten the "
                  f"messages or raise num_ctx (up to this server's {model.max_context})", "options.num_ctx")
    if limit is not None:   # num_ctx is the whole window, as in Ollama: the answer gets what the prompt leaves
        wanted = params.max_tokens if params.max_tokens is not None else model.defaults.get("max_new_tokens")
        if wanted is None or wanted > limit - n:
            params = dataclasses.replace(params, max_tokens=limit - n)
    if state.draining:
        raise ApiError(503, "the server is shutting down", type="server_error", code="shutting_down")
    try:
        ticket = state.slot.enter()
    except QueueFull:
        raise state.queue_full() from None
    except ShuttingDown:
        raise ApiError(503, "the server is shutting down", type="server_error", code="shutting_down") from None
    state.metrics.queue_depth.set(state.slot.depth)
    reasoning = prepared.in_reasoning or bool(model.defaults.get("reasoning"))
    return Job(state, model, params, ticket, n, reasoning)


_TRIM_AFTER = 1024 * 1024


def _tool_plan(model, params, default: str):
    """The tools plan for this model's template (prompt block or template variable, answer format, parser);
    ``default`` (edgekit serve --tool-choice) when the request sends no tool_choice."""
    from ..runtime.tool_defs import default_choice
    from ..runtime.tools import plan

    choice = params.tool_choice
    if choice is None and params.tools:
        choice = default_choice(default, params.messages)
    made = plan(model.codec, params.messages, list(params.tools), choice, parallel=params.parallel_tool_calls)
    given = getattr(params, "answer_format", None)
    if made.answer_format is not None and given is not None:
        field = given.name.split(".")[0]   # response_format (OpenAI) or format (Ollama)
        raise ToolError(f"{field} cannot be combined with tools: one answer is decoded under one format; send "
                        f"tools (the call's arguments follow their schemas) or {field}, or tool_choice \"none\"",
                        param=field)
    return made


def _trim_heap() -> None:
    """Give the pages a large request was unpacked into back to the system."""
    release_free_heap()


def _too_long(model, size: str) -> ApiError:
    limit = model.manifest.max_context
    return ApiError(400, f"the prompt has {size} but this server's context is {model.max_context} tokens "
                         f"(prompt + completion): shorten the messages"
                         + (f", or restart edgekit serve with a larger --max-context (this bundle allows up to "
                            f"{limit})" if limit > model.max_context else ""),
                    param="messages", code="context_length_exceeded")


def _model_card(state: ServerState) -> dict:
    card = {"id": state.model_id or "edgekit", "object": "model", "created": state.started, "owned_by": "edgekit"}
    if state.model is not None:
        card["max_context"] = state.model.max_context
    return card


async def list_models(request: Request) -> Response:
    return JSONResponse({"object": "list", "data": [_model_card(_state(request))]})


async def get_model(request: Request) -> Response:
    state = _state(request)
    wanted = request.path_params["model_id"]
    if wanted != (state.model_id or "edgekit"):
        raise ApiError(404, f"model {wanted[:100]!r} does not exist: this server serves {state.model_id!r}",
                       param="model", code="model_not_found")
    return JSONResponse(_model_card(state))


async def health(request: Request) -> Response:
    state = _state(request)
    if state.draining:
        return JSONResponse({"status": "shutting down"}, status_code=503)
    if state.load_error is not None:
        return JSONResponse({"status": "failed", "error": str(state.load_error)}, status_code=503)
    if state.model is None:
        return JSONResponse({"status": "loading"}, status_code=503, headers={"Retry-After": "5"})
    return JSONResponse({"status": "ok", "model": state.model_id, "busy": state.slot.busy,
                         "queue_depth": state.slot.depth})


async def metrics(request: Request) -> Response:
    state = _state(request)
    state.metrics.queue_depth.set(state.slot.depth)
    return PlainTextResponse(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


# ----- errors and the guard -----------------------------------------------------------------------
async def _api_error(request: Request, exc: ApiError) -> Response:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


async def _http_error(request: Request, exc: HTTPException) -> Response:
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


def create_app(model=None, *, api_key: str | None = None, max_queue: int = 8, model_name: str | None = None,
               shutdown_timeout: float = 10.0, max_body_bytes: int = MAX_BODY_BYTES,
               thinking_budget: int | None = None, tool_choice: str = "auto", loader: Callable[[], Any] | None = None,
               on_ready: Callable[[ServerState], None] | None = None,
               on_load_failed: Callable[[BaseException], None] | None = None) -> Starlette:
    """The app for ``model`` (a loaded Model), or for the model ``loader()`` returns.

    With a ``loader`` the app answers at once (``/health`` 503 "loading") and loads on a thread when the
    server starts; ``on_ready(state)`` runs once requests are served and ``on_load_failed(exc)`` if loading
    raised. ``thinking_budget`` is the default for requests that send none (smart-home integrations cannot
    add extension fields); ``tool_choice`` likewise for requests with tools and no tool_choice ("auto",
    "required" or "after-user", see :data:`edgekit.runtime.tool_defs.DEFAULT_CHOICES`). ``app.state.server`` is the
    :class:`ServerState` (slot, metrics, draining).
    """
    if thinking_budget is not None and (not isinstance(thinking_budget, int) or thinking_budget < 0):
        raise UserInputError(f"invalid thinking_budget {thinking_budget!r}: use a whole number of tokens >= 0")
    from ..runtime.tool_defs import DEFAULT_CHOICES

    if tool_choice not in DEFAULT_CHOICES:
        raise UserInputError(f"invalid tool_choice {tool_choice!r}: use one of {', '.join(DEFAULT_CHOICES)}")
    state = ServerState(api_key=api_key, max_queue=max_queue, model_name=model_name,
                        shutdown_timeout=shutdown_timeout, max_body_bytes=max_body_bytes,
                        thinking_budget=thinking_budget, tool_choice=tool_choice)
    if model is not None:
        state.attach(model)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        loop = asyncio.get_running_loop()
        if loader is not None and state.model is None:
            def load_on_thread() -> None:
                try:
                    loaded = loader()
                except BaseException as e:  # reported through on_load_failed and /health
                    done, arg = _load_failed, e
                else:
                    done, arg = _loaded, loaded
                try:
                    loop.call_soon_threadsafe(done, arg)
                except RuntimeError:  # the server stopped while loading: nobody to tell
                    pass

            def _loaded(loaded) -> None:
                state.attach(loaded)
                if on_ready is not None:
                    on_ready(state)

            def _load_failed(exc: BaseException) -> None:
                state.load_error = exc
                if on_load_failed is not None:
                    on_load_failed(exc)

            # A daemon thread: an interrupted start must not wait for a half-done load.
            threading.Thread(target=load_on_thread, name="edgekit-load", daemon=True).start()
        elif on_ready is not None:
            on_ready(state)
        yield
        state.close()

    app = Starlette(
        routes=[Route("/health", health, methods=["GET"]),
                Route("/metrics", metrics, methods=["GET"]),
                Route("/v1/models", list_models, methods=["GET"]),
                Route("/v1/models/{model_id:path}", get_model, methods=["GET"]),
                Route("/v1/chat/completions", chat_completions, methods=["POST"]),
                *ollama_routes()],
        middleware=[Middleware(Guard, state=state)],
        exception_handlers={ApiError: _api_error, HTTPException: _http_error},
        lifespan=lifespan)
    app.state.server = state
    return app
