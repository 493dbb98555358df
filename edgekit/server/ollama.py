"""Ollama's API (``/api/chat``, ``/api/generate``, ``/api/tags``, ``/api/show``, ``/api/version``, ``/api/ps``)
over the same model, slot, queue and worker thread as the OpenAI API.

Clients written for Ollama (Home Assistant's Ollama integration, the ``ollama`` Python client, Open WebUI)
point at ``edgekit serve`` unchanged. Requests go through :func:`edgekit.server.admit.admit` (parse, render,
tokenize, take a place at the slot) and :class:`edgekit.server.jobs.Job` (worker thread, cancellation on
disconnect); only the request fields (:mod:`edgekit.server.ollama_request`) and the answer's shape (here) differ:

- streaming is the default (NDJSON, one object per line, ``done: true`` on the last), ``stream: false`` answers
  one object; durations are in nanoseconds;
- sampling options come in ``options`` with Ollama's names (``repeat_penalty``, ``num_predict`` ...); an option
  this server does not apply is refused with a 400 naming it, never ignored;
- an R1 bundle's reasoning goes in ``thinking`` (``message.thinking`` for chat), never mixed into the content;
  ``think: false`` gives the model no thinking budget (it answers at once);
- errors are ``{"error": "..."}`` with the HTTP status;
- ``format`` constrains the answer (after an R1 thought): ``"json"`` any JSON object, or a JSON schema object;
- ``tools`` on /api/chat work as on the OpenAI API (:mod:`edgekit.runtime.tools`): a call comes back as
  ``message.tool_calls`` ([{"function": {"index", "name", "arguments": {...}}}]) in one chunk once it is complete;
  earlier calls come with arguments as objects, results as ``role: tool`` (``tool_name`` optional: Home Assistant
  sends only the content; a result answers the earliest unanswered call);
- ``images``, ``suffix``, ``template`` and ``context`` are refused with a 400 saying so.
"""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from .. import __version__
from .admit import admit, read_body
from .api_errors import ApiError
from .fields import parse_json_body
from .jobs import END, SHUT_DOWN, ChatResponse, generation_error
from .ollama_request import OllamaParams, check_model_name, parse_chat, parse_generate

_NDJSON = [(b"content-type", b"application/x-ndjson"), (b"cache-control", b"no-cache"),
           (b"x-accel-buffering", b"no")]


# ----- answers ------------------------------------------------------------------------------------------
def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _line(obj: dict) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n"


def _error(exc: ApiError) -> Response:
    return JSONResponse({"error": exc.message}, status_code=exc.status, headers=exc.headers)


class OllamaResponse(ChatResponse):
    """A Job answered in Ollama's shapes; waiting, generating and cancelling are ChatResponse's."""

    def _piece(self, answer: str = "", thinking: str = "") -> dict:
        job = self.job
        if job.params.think is False:
            thinking = ""
        body: dict[str, Any] = {"model": job.params.model, "created_at": _now()}
        if job.params.chat:
            body["message"] = {"role": "assistant", "content": answer}
            if thinking:
                body["message"]["thinking"] = thinking
        else:
            body["response"] = answer
            if thinking:
                body["thinking"] = thinking
        body["done"] = False
        return body

    def _last(self, result, answer: str = "", thinking: str = "") -> dict:
        job = self.job
        body = self._piece(answer, thinking)
        prefill_ns = int(result.ttft_ms * 1e6)
        body.update(done=True, done_reason="length" if result.finish_reason == "length" else "stop",
                    total_duration=int((time.perf_counter() - job.admitted) * 1e9),
                    load_duration=int((job.began - job.admitted) * 1e9),   # waiting for the generation slot
                    prompt_eval_count=result.prompt_tokens, prompt_eval_duration=prefill_ns,
                    eval_count=result.completion_tokens,
                    eval_duration=max(0, int(result.total_ms * 1e6) - prefill_ns))
        return body

    def answer_json(self, result) -> dict:
        plan = self.job.params.tool_plan
        if plan is None:
            return self._last(result, result.answer, result.reasoning)
        # the answer only: the thinking is never read for calls
        content, calls = plan.parse(result.answer, result.finish_reason)
        body = self._last(result, result.answer if not calls else content or "", result.reasoning)
        if calls:
            body["message"]["tool_calls"] = [c.ollama(k) for k, c in enumerate(calls)]
        return body

    def _tool_pieces(self, events: list[tuple]) -> list[dict]:
        """Parser events as Ollama chunks: content as it comes, each call in one chunk once it is complete."""
        pieces = []
        for event in events:
            if event[0] == "content":
                pieces.append(self._piece(answer=event[1]))
            elif event[0] == "done":
                piece = self._piece()
                piece["message"]["tool_calls"] = [event[2].ollama(event[1])]
                pieces.append(piece)
        return pieces

    def error_json(self, error: ApiError) -> dict:
        return {"error": error.message}

    async def _stream(self, send) -> None:
        job = self.job
        await send({"type": "http.response.start", "status": 200, "headers": _NDJSON})

        async def emit(obj: dict) -> None:
            await send({"type": "http.response.body", "body": _line(obj), "more_body": True})

        result = None
        plan = job.params.tool_plan
        parser = plan.parser() if plan is not None and job.params.chat else None
        while True:
            item = await job.events.get()
            if item is END:
                break
            if isinstance(item, BaseException):
                await emit(self.error_json(generation_error(item)))
            elif item.kind == "reasoning" and job.params.think is not False:
                await emit(self._piece(thinking=item.text))
            elif item.kind == "answer" and parser is not None:
                for piece in self._tool_pieces(parser.feed(item.text)):
                    await emit(piece)
            elif item.kind == "answer":
                await emit(self._piece(answer=item.text))
            elif item.kind == "done":
                result = item.result
        if parser is not None and result is not None and result.finish_reason != "cancelled":
            for piece in self._tool_pieces(parser.finish(cut=result.finish_reason == "length")[0]):
                await emit(piece)
        if result is not None and result.finish_reason == "cancelled":
            if job.stop_reason == "shutdown":
                await emit(self.error_json(SHUT_DOWN))
        elif result is not None:
            await emit(self._last(result))
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        job.answered = True


# ----- endpoints ----------------------------------------------------------------------------------------
def _ollama_errors(handler):
    """Answer an ApiError raised anywhere in ``handler`` in Ollama's shape: ``{"error": "..."}``."""

    async def wrapped(request: Request) -> Response:
        try:
            return await handler(request)
        except ApiError as e:
            return _error(e)

    wrapped.__name__ = handler.__name__
    return wrapped


def _loaded_only(body: dict, chat: bool) -> bool:
    """Ollama answers a request with no messages (/api/chat) or no prompt (/api/generate) by loading the model;
    it is loaded already: the answer says so without generating."""
    return body.get("messages" if chat else "prompt") in (None, [], "")


async def _generating(request: Request, parse) -> Response:
    state = request.app.state.server
    model = state.require_model()
    loaded: dict = {}

    def parse_body(body: dict) -> OllamaParams:
        if _loaded_only(body, parse is parse_chat):
            loaded["name"] = check_model_name(body, state)
            raise _LoadOnly()
        return parse(body, model, state)

    try:
        job = await admit(request, parse_body)
    except _LoadOnly:
        chat = parse is parse_chat
        body = {"model": loaded["name"], "created_at": _now(),
                **({"message": {"role": "assistant", "content": ""}} if chat else {"response": ""}),
                "done": True, "done_reason": "load"}
        return JSONResponse(body)
    return OllamaResponse(job)


class _LoadOnly(Exception):
    """The request only asks for the model to be loaded (no prompt / no messages)."""


@_ollama_errors
async def api_chat(request: Request) -> Response:
    return await _generating(request, parse_chat)


@_ollama_errors
async def api_generate(request: Request) -> Response:
    return await _generating(request, parse_generate)


def _details(model) -> dict:
    spec = model.spec
    family = getattr(spec, "family", "") or getattr(spec, "architecture", "")
    return {"parent_model": "", "format": "onnx", "family": family, "families": [family],
            "parameter_size": "", "quantization_level": str(model.manifest.precision)}


def _card(state) -> dict:
    model, name = state.model, state.model_id or "edgekit"
    size = sum(int(f.get("size", 0)) for f in model.manifest.files.values())
    return {"name": name, "model": name, "modified_at": _modified(model), "size": size,
            "digest": model.manifest.id, "details": _details(model)}


def _modified(model) -> str:
    return str(model.manifest.created)   # when the bundle was built


@_ollama_errors
async def api_tags(request: Request) -> Response:
    state = request.app.state.server
    return JSONResponse({"models": [_card(state)] if state.model is not None else []})


@_ollama_errors
async def api_ps(request: Request) -> Response:
    state = request.app.state.server
    if state.model is None or state.draining:
        return JSONResponse({"models": []})
    card = _card(state)
    memory = getattr(state.model.memory, "total_bytes", card["size"])
    card.update(size=int(memory), size_vram=0, expires_at="9999-12-31T23:59:59Z",   # loaded for the server's life
                context_length=state.model.max_context)
    return JSONResponse({"models": [card]})


@_ollama_errors
async def api_show(request: Request) -> Response:
    state = request.app.state.server
    model = state.require_model()
    body = parse_json_body(await read_body(request, 64 * 1024), request.headers.get("content-type"))
    check_model_name(body, state)
    spec, d = model.spec, model.defaults
    capabilities = ["completion", "tools"] + (["thinking"] if d.get("reasoning") else [])
    params = {"temperature": d.get("temperature"), "top_p": d.get("top_p"), "top_k": d.get("top_k"),
              "min_p": d.get("min_p"), "repeat_penalty": d.get("repetition_penalty"),
              "num_predict": d.get("max_new_tokens"), "num_ctx": model.max_context}
    arch = getattr(spec, "architecture", "") or "unknown"
    return JSONResponse({
        "modelfile": "", "template": "", "license": "",
        "parameters": "\n".join(f"{k:<16}{v}" for k, v in params.items() if v is not None),
        "details": _details(model),
        "model_info": {"general.architecture": arch, f"{arch}.context_length": model.max_context,
                       f"{arch}.block_count": spec.num_layers, f"{arch}.embedding_length": spec.hidden_size},
        "capabilities": capabilities,
        "modified_at": _modified(model)})


async def api_version(request: Request) -> Response:
    return JSONResponse({"version": __version__})


def routes() -> list:
    from starlette.routing import Route

    return [Route("/api/chat", api_chat, methods=["POST"]),
            Route("/api/generate", api_generate, methods=["POST"]),
            Route("/api/tags", api_tags, methods=["GET"]),
            Route("/api/show", api_show, methods=["POST"]),
            Route("/api/ps", api_ps, methods=["GET"]),
            Route("/api/version", api_version, methods=["GET"])]
