"""The ASGI app: OpenAI's chat-completions API (and Ollama's, :mod:`edgekit.server.ollama`) over one loaded
:class:`edgekit.runtime.model.Model`.

``create_app(model)`` returns a Starlette app that can be driven without a port (tests) or run by uvicorn
(``edgekit.server.serve``). Requests are validated and tokenized first (bad ones get a 4xx in OpenAI's
error shape), then take a place at the generation slot (one generation at a time, ``max_queue`` waiting,
429 beyond), then generate on a worker thread that streams events back to the event loop
(:mod:`edgekit.server.admit`, :mod:`edgekit.server.jobs`). A client that disconnects sets the runtime's
``cancel`` event, so its generation stops at the next token and the slot passes on; the slot is only
released when the worker thread has really finished with the model.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from ..errors import UserInputError
from .admit import MAX_BODY_BYTES, admit
from .api_errors import ApiError
from .guard import Guard, api_error, http_error
from .jobs import ChatResponse
from .ollama import routes as ollama_routes
from .schemas import parse_chat
from .state import ServerState


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
    _check_defaults(thinking_budget, tool_choice)
    state = ServerState(api_key=api_key, max_queue=max_queue, model_name=model_name,
                        shutdown_timeout=shutdown_timeout, max_body_bytes=max_body_bytes,
                        thinking_budget=thinking_budget, tool_choice=tool_choice)
    if model is not None:
        state.attach(model)
    app = Starlette(
        routes=[Route("/health", health, methods=["GET"]),
                Route("/metrics", metrics, methods=["GET"]),
                Route("/v1/models", list_models, methods=["GET"]),
                Route("/v1/models/{model_id:path}", get_model, methods=["GET"]),
                Route("/v1/chat/completions", chat_completions, methods=["POST"]),
                *ollama_routes()],
        middleware=[Middleware(Guard, state=state)],
        exception_handlers={ApiError: api_error, HTTPException: http_error},
        lifespan=_lifespan(state, loader, on_ready, on_load_failed))
    app.state.server = state
    return app


def _check_defaults(thinking_budget: int | None, tool_choice: str) -> None:
    if thinking_budget is not None and (not isinstance(thinking_budget, int) or thinking_budget < 0):
        raise UserInputError(f"invalid thinking_budget {thinking_budget!r}: use a whole number of tokens >= 0")
    from ..runtime.tool_defs import DEFAULT_CHOICES

    if tool_choice not in DEFAULT_CHOICES:
        raise UserInputError(f"invalid tool_choice {tool_choice!r}: use one of {', '.join(DEFAULT_CHOICES)}")


def _lifespan(state: ServerState, loader: Callable[[], Any] | None, on_ready: Callable[[ServerState], None] | None,
              on_load_failed: Callable[[BaseException], None] | None):
    """The app's lifespan: load the model on a thread when the server starts (with a loader), close at the end."""

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

    return lifespan


# ----- endpoints ----------------------------------------------------------------------------------
def _state(request: Request) -> ServerState:
    return request.app.state.server


async def chat_completions(request: Request) -> Response:
    job = await admit(request, parse_chat)
    return ChatResponse(job)


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
