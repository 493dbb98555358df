"""One chat completion: its place at the generation slot, the worker thread, and the answer (JSON or SSE).

The worker thread runs ``Model.stream`` and hands each event to the event loop through a queue; the
request's task turns them into OpenAI's ``chat.completion`` object or ``chat.completion.chunk`` events.
A task watches the connection meanwhile: a disconnect while waiting gives up the place in line, a
disconnect while generating sets the runtime's ``cancel`` event (the generation stops at the next token).
The slot is released only when the worker thread has finished with the model.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from starlette.responses import Response

from .. import __version__
from ..errors import GenerationError
from .api_errors import ApiError, bad, error_body
from .queue import ClientGone, ShuttingDown, Ticket
from .schemas import ChatParams

if TYPE_CHECKING:
    from .state import ServerState

log = logging.getLogger("edgekit.server")

END = object()  # the worker thread's last item on a job's event queue
_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class Job:
    """One chat completion: its place at the slot, its worker thread and the events coming back."""

    def __init__(self, state: ServerState, model, params: ChatParams, ticket: Ticket, prompt_tokens: int,
                 reasoning: bool):
        self.state, self.model, self.params, self.ticket = state, model, params, ticket
        self.prompt_tokens = prompt_tokens
        self.reasoning = reasoning            # the answer carries reasoning_content
        self.cancel = threading.Event()       # the runtime checks it between tokens
        self.stop_reason: str | None = None   # "client" or "shutdown"
        self.started = False
        self.done = False                     # the worker thread has finished
        self.answered = False                 # the response was sent in full
        self.admitted = time.perf_counter()
        self.began = 0.0
        self.events: asyncio.Queue = asyncio.Queue()
        self.id = "chatcmpl-" + secrets.token_hex(12)
        self.created = int(time.time())

    def stop(self, reason: str) -> None:
        if self.stop_reason is None:
            self.stop_reason = reason
        self.cancel.set()
        if not self.started:  # still waiting in line: wake it
            self.state.slot.fail(self.ticket, ShuttingDown() if reason == "shutdown" else ClientGone())

    async def wait_turn(self) -> None:
        """Wait for the slot; raises ShuttingDown or ClientGone."""
        await self.ticket.future
        if self.cancel.is_set():
            raise ShuttingDown() if self.stop_reason == "shutdown" else ClientGone()

    def start(self) -> None:
        """Run the generation on the worker thread; its events arrive on ``self.events``."""
        loop = asyncio.get_running_loop()
        queue = self.events

        def push(item) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the loop is closed: nobody listens any more
                pass

        self.started = True
        self.began = time.perf_counter()
        self.state.active = self
        self.state.metrics.active.set(1)
        self.state.metrics.queue_wait.observe(self.began - self.admitted)
        future = loop.run_in_executor(self.state.executor(), _generate, self.model, self.params.runtime_kwargs(),
                                      self.cancel, push)
        future.add_done_callback(self._finished)

    def _finished(self, future: asyncio.Future) -> None:
        """On the loop, once the worker thread is done with the model: record it and pass the slot on."""
        self.done = True
        state, m = self.state, self.state.metrics
        if state.active is self:
            state.active = None
        m.active.set(0)
        result = None if future.cancelled() or future.exception() else future.result()
        if result is None:
            m.completions.inc("error")
        else:
            m.completions.inc(result.finish_reason)
            m.prompt_tokens.inc(by=result.prompt_tokens)
            m.cached_tokens.inc(by=result.cached_tokens)
            m.prefilled_tokens.inc(by=result.prompt_tokens - result.cached_tokens)
            m.completion_tokens.inc(by=result.completion_tokens)
            m.reasoning_tokens.inc(by=result.reasoning_tokens)
            m.draft_tokens.inc(by=result.drafted)
            m.accepted_tokens.inc(by=result.accepted)
            if result.completion_tokens:
                m.ttft.observe(self.began - self.admitted + result.ttft_ms / 1000)
            if result.completion_tokens > 1:
                m.decode_speed.observe(result.decode_tok_s)
            m.duration.observe(result.total_ms / 1000)
            if result.finish_reason != "cancelled":
                state.avg_generation_s = 0.8 * state.avg_generation_s + 0.2 * result.total_ms / 1000
        state.slot.release(self.ticket)
        m.queue_depth.set(state.slot.depth)

    # ----- OpenAI shapes ------------------------------------------------------------------------
    def _envelope(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.state.model_id,
                "system_fingerprint": _fingerprint(self.model)}

    def chunk(self, delta: dict, finish_reason: str | None = None, usage: dict | None = None) -> dict:
        body = self._envelope("chat.completion.chunk")
        body["choices"] = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]
        if usage is not None:
            body["usage"] = usage
        return body

    def completion(self, result) -> dict:
        message: dict[str, Any] = {"role": "assistant", "content": result.answer}
        finish = _finish(result.finish_reason)
        plan = self.params.tool_plan
        if plan is not None:   # the answer (never the reasoning) is read for calls
            content, calls = plan.parse(result.answer, result.finish_reason)
            if calls:
                message["content"] = content
                message["tool_calls"] = [c.openai() for c in calls]
                finish = tool_finish(result, calls)
        if self.reasoning or result.reasoning:
            message["reasoning_content"] = result.reasoning
        body = self._envelope("chat.completion")
        body["choices"] = [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}]
        body["usage"] = _usage(result)
        return body


def _generate(model, kwargs: dict, cancel: threading.Event, push: Callable[[Any], None]):
    """Worker thread: stream the model's events to the loop; the request's task turns errors into responses."""
    result = None
    try:
        for event in model.stream(cancel=cancel, **kwargs):
            push(event)
            if event.kind == "done":
                result = event.result
    except Exception as e:  # handed to the request's task, which answers it as a 4xx/5xx
        push(e)
    finally:
        push(END)
    return result


_SHUTTING_DOWN = ApiError(503, "the server is shutting down: retry after it restarts", type="server_error",
                          code="shutting_down")
SHUT_DOWN = ApiError(503, "the server shut down before the generation finished", type="server_error",
                     code="shutting_down")


def _finish(reason: str) -> str:
    return "length" if reason == "length" else "stop"


def tool_finish(result, calls) -> str:
    """OpenAI's finish_reason for an answer: "tool_calls" when it ended with complete calls."""
    return "tool_calls" if calls and result.finish_reason == "stop" else _finish(result.finish_reason)


def _openai_tool_delta(event: tuple) -> dict | None:
    """A ToolCallParser event as an OpenAI chunk delta: the first chunk of a call has index, id, type, name and
    arguments ""; the next ones carry pieces of the arguments."""
    kind = event[0]
    if kind == "content":
        return {"content": event[1]}
    if kind == "call":
        call = event[2]
        return {"tool_calls": [{"index": event[1], "id": call.id, "type": "function",
                                "function": {"name": call.name, "arguments": ""}}]}
    if kind == "arguments":
        return {"tool_calls": [{"index": event[1], "function": {"arguments": event[2]}}]}
    return None


def _usage(result) -> dict:
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": result.cached_tokens},
            "completion_tokens_details": {"reasoning_tokens": result.reasoning_tokens}}


def _fingerprint(model) -> str:
    return f"edgekit-{__version__}-{model.manifest.id[:12]}"


def _sse(obj) -> bytes:
    data = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


def generation_error(exc: BaseException) -> ApiError:
    """The answer to an exception from the worker thread: 400 for a GenerationError, else 500 (logged here)."""
    if isinstance(exc, GenerationError):
        return bad(str(exc))
    log.error("generation failed", exc_info=exc)
    return ApiError(500, "the generation failed inside the server; details are in the server log",
                    type="server_error", code="generation_failed")


class ChatResponse(Response):
    """The ASGI response for one job: waits for the slot, generates, answers as JSON or as SSE chunks.

    It watches the connection the whole time: a disconnect while waiting gives up the place in line, a
    disconnect while generating cancels the generation.
    """

    def __init__(self, job: Job):  # Response.__init__ is not used: this class sends by itself
        self.job = job
        self.background = None

    # The shapes of the answer and of errors: OpenAI's here, Ollama's in ollama.OllamaResponse.
    def answer_json(self, result) -> dict:
        return self.job.completion(result)

    def error_json(self, error: ApiError) -> dict:
        return error.body()

    async def __call__(self, scope, receive, send) -> None:
        job = self.job
        watcher = asyncio.ensure_future(_watch_disconnect(receive, job))
        try:
            try:
                await job.wait_turn()
            except ShuttingDown:
                await send_json(send, 503, self.error_json(_SHUTTING_DOWN))
                return
            except ClientGone:
                return
            job.start()
            if job.params.stream:
                await self._stream(send)
            else:
                await self._complete(send, watcher)
        finally:
            watcher.cancel()
            if not job.started:
                job.state.slot.release(job.ticket)
                job.state.metrics.queue_depth.set(job.state.slot.depth)
            elif not job.done and not job.answered:
                job.stop("client")  # the task ended early (cancelled, send failed): nobody reads the output

    async def _complete(self, send, watcher: asyncio.Future) -> None:
        job, result, failure = self.job, None, None
        while True:
            item = await job.events.get()
            if item is END:
                break
            if isinstance(item, BaseException):
                failure = generation_error(item)
            elif item.kind == "done":
                result = item.result
        watcher.cancel()  # the answer is one send: nothing left to cancel
        if failure is not None:
            await send_json(send, failure.status, self.error_json(failure))
            return
        if result is None or job.stop_reason == "client":
            return
        if result.finish_reason == "cancelled":
            await send_json(send, 503, self.error_json(SHUT_DOWN))
            return
        await send_json(send, 200, self.answer_json(result))
        job.answered = True

    async def _stream(self, send) -> None:
        job = self.job
        headers = [(b"content-type", b"text/event-stream; charset=utf-8")]
        headers += [(k.lower().encode(), v.encode()) for k, v in _SSE_HEADERS.items()]
        await send({"type": "http.response.start", "status": 200, "headers": headers})

        async def emit(payload) -> None:
            await send({"type": "http.response.body", "body": _sse(payload), "more_body": True})

        await emit(job.chunk({"role": "assistant", "content": ""}))
        result = None
        plan = job.params.tool_plan
        parser = plan.parser() if plan is not None else None
        calls: list = []
        while True:
            item = await job.events.get()
            if item is END:
                break
            if isinstance(item, BaseException):
                await emit(generation_error(item).body())
                continue
            if item.kind == "reasoning":
                await emit(job.chunk({"reasoning_content": item.text}))
            elif item.kind == "answer" and parser is not None:
                for event in parser.feed(item.text):
                    delta = _openai_tool_delta(event)
                    if delta is not None:
                        await emit(job.chunk(delta))
            elif item.kind == "answer":
                await emit(job.chunk({"content": item.text}))
            elif item.kind == "done":
                result = item.result
        if parser is not None and result is not None:
            events, _, calls = parser.finish(cut=result.finish_reason == "length")
            for event in events:
                delta = _openai_tool_delta(event)
                if delta is not None:
                    await emit(job.chunk(delta))
        if result is not None and result.finish_reason == "cancelled":
            if job.stop_reason == "shutdown":
                await emit(error_body("the server shut down before the generation finished",
                                      type="server_error", code="shutting_down"))
        elif result is not None:
            usage = _usage(result)
            # OpenAI sends usage in an extra chunk with no choices when asked (stream_options.include_usage);
            # clients that did not ask get it on the final chunk, where choice-indexing code still works.
            await emit(job.chunk({}, tool_finish(result, calls), None if job.params.include_usage else usage))
            if job.params.include_usage:
                final = job._envelope("chat.completion.chunk")
                final["choices"], final["usage"] = [], usage
                await emit(final)
        await emit("[DONE]")
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        job.answered = True


async def _watch_disconnect(receive, job: Job) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            job.stop("client")
            return


async def send_json(send, status: int, body: dict, headers: dict[str, str] | None = None) -> None:
    data = json.dumps(body, ensure_ascii=False).encode("utf-8")
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    raw += [(k.lower().encode(), str(v).encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": data, "more_body": False})
