"""The one path every generating request takes, OpenAI's and Ollama's: read the body, parse, render and
tokenize it, then take a place at the generation slot.

The work before the slot is bounded, so that a burst of large requests cannot grow the server: a request is
refused with 429 before it is even parsed when the line is full; parsing, rendering and tokenizing run one
request at a time on one thread of their own; the template's output is cut at what the context could hold
(``max_context`` tokens times the most characters one token of this tokenizer stands for) and refused
without tokenizing it; bodies are capped at ``max_body_bytes``.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from typing import Any

from starlette.requests import ClientDisconnect, Request

from ..errors import FormatError, FormatUnavailable, GenerationError, PromptTooLong, ToolError
from ..runtime.memory import release_free_heap
from ..units import fmt_bytes
from .api_errors import ApiError, bad
from .fields import parse_json_body
from .jobs import Job
from .queue import QueueFull, ShuttingDown
from .state import ServerState

MAX_BODY_BYTES = 8 * 1024 * 1024
_TRIM_AFTER = 1024 * 1024    # a body larger than this: give the heap back once it is tokenized


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, or a 413 as soon as it is known to be longer than ``limit`` bytes."""
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


async def admit(request: Request, parse: Callable[[dict], Any]) -> Job:
    """Read, parse (``parse(body) -> params`` with ``runtime_kwargs()``), render and tokenize a request, then
    take a place at the slot: the one path every generating endpoint (OpenAI's and Ollama's) goes through."""
    state: ServerState = request.app.state.server
    model = state.require_model()
    if state.slot.busy and state.slot.depth >= state.slot.max_queue:
        raise state.queue_full()     # before reading, parsing or tokenizing anything
    raw, ctype = await read_body(request, state.max_body_bytes), request.headers.get("content-type")
    # No text of more characters than this fits the context: refused before tokenizing it.
    max_chars = model.max_context * model.codec.max_token_chars
    big = len(raw) > _TRIM_AFTER

    def prepare():
        # Parse, render and tokenize in one go: what a large request unpacks into is freed before the next
        # request's turn (parsing all waiting requests first would hold all of them at once).
        try:
            return _prepare(state, model, lambda: parse(parse_json_body(raw, ctype)), max_chars)
        finally:
            if big:
                release_free_heap()   # give the pages a large request was unpacked into back to the system

    try:
        # Off the loop (parsing megabytes would stall every other connection): a bad or too-long prompt is
        # refused before it takes a place in line, with the numbers in the message.
        with _as_api_errors(model, max_chars):
            params, prepared = await state.prepare(prepare)
    finally:
        raw = None   # the body is parsed: let it go before waiting for the slot
    n = len(prepared.prompt_ids)
    params = _fit_context(model, params, n)
    ticket = _take_place(state)
    state.metrics.queue_depth.set(state.slot.depth)
    reasoning = prepared.in_reasoning or bool(model.defaults.get("reasoning"))
    return Job(state, model, params, ticket, n, reasoning)


def _prepare(state: ServerState, model, read: Callable[[], Any], max_chars: int):
    """(params, the model's prepared request): ``read()`` parses the body; then defaults, tools plan, render
    (cut at ``max_chars``) and tokenize."""
    params = read()
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


@contextlib.contextmanager
def _as_api_errors(model, max_chars: int):
    """The library's errors while preparing a request, as the 4xx/5xx a client gets."""
    try:
        yield
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


def _fit_context(model, params, n: int):
    """``params`` for a prompt of ``n`` tokens: a 400 when it does not fit, max_tokens cut to a client's num_ctx."""
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
    return params


def _take_place(state: ServerState):
    """A ticket at the generation slot, or 429 (line full) / 503 (shutting down)."""
    if state.draining:
        raise ApiError(503, "the server is shutting down", type="server_error", code="shutting_down")
    try:
        return state.slot.enter()
    except QueueFull:
        raise state.queue_full() from None
    except ShuttingDown:
        raise ApiError(503, "the server is shutting down", type="server_error", code="shutting_down") from None


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


def _too_long(model, size: str) -> ApiError:
    limit = model.manifest.max_context
    return ApiError(400, f"the prompt has {size} but this server's context is {model.max_context} tokens "
                         f"(prompt + completion): shorten the messages"
                         + (f", or restart edgekit serve with a larger --max-context (this bundle allows up to "
                            f"{limit})" if limit > model.max_context else ""),
                    param="messages", code="context_length_exceeded")
