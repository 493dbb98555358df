"""Ollama's API (``/api/chat``, ``/api/generate``, ``/api/tags``, ``/api/show``, ``/api/version``, ``/api/ps``)
over the same model, slot, queue and worker thread as the OpenAI API.

Clients written for Ollama (Home Assistant's Ollama integration, the ``ollama`` Python client, Open WebUI)
point at ``edgekit serve`` unchanged. Requests go through :func:`edgekit.server.app.admit` (parse, render,
tokenize, take a place at the slot) and :class:`edgekit.server.jobs.Job` (worker thread, cancellation on
disconnect); only the request fields and the answer's shape differ:

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
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from .. import __version__
from ..runtime.answer_format import AnswerFormat, json_answer
from .jobs import _END, _SHUT_DOWN, ChatResponse, _failure
from .schemas import (
    ApiError,
    ChatParams,
    _bool,
    _float,
    _int,
    _json_type,
    _messages,
    _show,
    _stop,
    _utf8,
    bad,
    parse_tools_fields,
)

_NDJSON = [(b"content-type", b"application/x-ndjson"), (b"cache-control", b"no-cache"),
           (b"x-accel-buffering", b"no")]
# The options this server applies (Ollama's names); any other is refused with a 400 naming it.
_OPTIONS = ("temperature", "top_p", "top_k", "min_p", "repeat_penalty", "seed", "num_predict", "stop", "num_ctx")
_NOT_YET = {"images": "this model reads text only: send the request without images",
            "suffix": "fill-in-the-middle (suffix) is not supported: send the request without suffix",
            "template": "a per-request template is not supported: the bundle's chat template is used; send the "
                        "request without template",
            "context": "context (token ids of an earlier answer) is not supported: send the conversation as "
                       "messages to /api/chat"}


@dataclass(frozen=True)
class OllamaParams(ChatParams):
    """One /api/chat or /api/generate request: ChatParams, or a raw prompt instead of messages."""

    model: str = ""                    # the name the client sent, echoed in the answer
    prompt: str | None = None          # /api/generate with raw: true (no chat template); messages is None
    chat: bool = True                  # answer as /api/chat (message) or /api/generate (response)
    num_ctx: int | None = None
    think: bool | None = None          # False: no thinking is shown (the forced-closed thought is a newline)

    def runtime_kwargs(self) -> dict[str, Any]:
        kwargs = super().runtime_kwargs()
        if self.messages is None:
            del kwargs["messages"]
            kwargs["prompt"] = self.prompt
        return kwargs


# ----- request parsing ----------------------------------------------------------------------------------
def _model_name(body: dict, state) -> str:
    name = body.get("model", body.get("name"))   # "name" is Ollama's older spelling
    if name is None or name == "":
        raise bad("model is required: send the name GET /api/tags lists", "model")
    if not isinstance(name, str):
        raise bad(f"model must be a string, got {_json_type(name)}", "model")
    served = state.model_id or "edgekit"
    if name not in (served, served + ":latest"):
        raise ApiError(404, f"model {_show(name)} not found: this server serves {json.dumps(served)} "
                            "(GET /api/tags lists it)", param="model", code="model_not_found")
    return name


def _refuse_unsupported(body: dict) -> None:
    for name, why in _NOT_YET.items():
        if body.get(name) not in (None, [], ""):
            raise bad(why, name)


def _options(body: dict, model) -> dict[str, Any]:
    opts = body.get("options")
    if opts is None:
        return {}
    if not isinstance(opts, dict):
        raise bad(f"options must be an object such as {{\"temperature\": 0.7}}, got {_json_type(opts)}", "options")
    unknown = sorted(k for k, v in opts.items() if k not in _OPTIONS and v is not None)
    if unknown:
        raise bad(f"options.{unknown[0][:60]} is not supported by edgekit serve: use {', '.join(_OPTIONS)}",
                  f"options.{unknown[0][:60]}")
    # Checked under their full names, so a message says "options.top_p", the field the client sent.
    o = {f"options.{k}": v for k, v in opts.items()}
    out: dict[str, Any] = {
        "temperature": _float(o, "options.temperature", 0, 2),
        "top_p": _float(o, "options.top_p", 0, 1),
        "top_k": _int(o, "options.top_k", 0, what=" (0 = off)"),
        "min_p": _float(o, "options.min_p", 0, 1, hi_open=True, what=" (0 = off)"),
        "repetition_penalty": _float(o, "options.repeat_penalty", 0, float("inf"), lo_open=True, hi_open=True,
                                     what=" (1 = off)"),
        "seed": _int(o, "options.seed", -(2**63), 2**64 - 1),
    }
    if out["top_p"] == 0:      # as on the OpenAI API: the smallest set with mass >= 0 is the top token
        out["temperature"], out["top_p"] = 0.0, None
    if out["seed"] is not None and out["seed"] < 0:
        out["seed"] %= 2**64   # Ollama's default seed is -1; the sampler wants a non-negative one
    num_predict = _int(o, "options.num_predict", -2, what=" (-1 = until the context is full)")
    if num_predict == 0:
        raise bad("invalid options.num_predict 0: use a whole number >= 1, or -1 to generate until the context "
                  "is full", "options.num_predict")
    # -1 (and Ollama's -2, fill the context): as many as the context holds; run() stops at its end.
    out["max_tokens"] = model.max_context if num_predict is not None and num_predict < 0 else num_predict
    num_ctx = _int(o, "options.num_ctx", 1)
    if num_ctx is not None and num_ctx > model.max_context:
        raise bad(f"options.num_ctx {num_ctx} is larger than this server's context of {model.max_context} tokens "
                  f"(edgekit serve --max-context): send num_ctx <= {model.max_context} (in Home Assistant: the "
                  "integration's context window size)", "options.num_ctx")
    out["num_ctx"] = num_ctx
    try:
        out["stop"] = _stop(opts.get("stop"))
    except ApiError as e:
        raise bad("options." + e.message, "options.stop") from None
    return out


def _think(body: dict, model) -> dict[str, Any]:
    """``think`` and the thinking budget it asks for: None = the default, 0 = answer at once."""
    think = _bool(body, "think")
    reasoning = bool(model.defaults.get("reasoning"))
    if think and not reasoning:
        raise bad(f"{json.dumps(body.get('model'))} does not support thinking: send the request without think "
                  "(only R1 bundles reason)", "think")
    return {"think": think, "thinking_budget": 0 if think is False and reasoning else None}


def _chat_messages(value: Any) -> list[dict[str, str]]:
    if isinstance(value, list):
        for i, m in enumerate(value):
            if not isinstance(m, dict):
                continue   # _messages names it
            if m.get("images"):
                raise bad(f"messages[{i}].images: this model reads text only", f"messages[{i}].images")
            thinking = m.get("thinking")
            if thinking is not None and not isinstance(thinking, str):
                raise bad(f"messages[{i}].thinking must be a string", f"messages[{i}].thinking")
            # An assistant turn's thinking is not sent back to the model (DeepSeek's guidance for R1).
        value = _openai_tool_messages(value)
    return _messages(value)


def _openai_tool_messages(value: list) -> list:
    """Ollama's tool turns in OpenAI's shape (what schemas._messages checks): a call's arguments are an object
    here, a JSON string there; a tool result names the tool (``tool_name``) or nothing (Home Assistant sends
    only the content) and gets the id of the call it answers, in order."""
    out, pending = [], []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            out.append(m)
            continue
        calls = m.get("tool_calls")
        if m.get("role") == "assistant" and calls is not None:
            if not isinstance(calls, list):
                raise bad(f"messages[{i}].tool_calls must be a list of tool calls", f"messages[{i}].tool_calls")
            converted = []
            for j, c in enumerate(calls):
                f = c.get("function") if isinstance(c, dict) else None
                if not isinstance(f, dict):
                    raise bad(f"messages[{i}].tool_calls[{j}] must be {{\"function\": {{\"name\": ..., "
                              "\"arguments\": {...}}}}}", f"messages[{i}].tool_calls[{j}]")
                args = f.get("arguments", {})
                if not isinstance(args, dict):
                    raise bad(f"messages[{i}].tool_calls[{j}].function.arguments must be an object",
                              f"messages[{i}].tool_calls[{j}].function.arguments")
                cid = c.get("id") if isinstance(c.get("id"), str) and c.get("id") else f"call_{i}_{j}"
                converted.append({"id": cid, "type": "function", "function": {
                    "name": f.get("name"), "arguments": json.dumps(args, ensure_ascii=False)}})
            pending = [(c["id"], c["function"]["name"]) for c in converted]
            m = {**m, "tool_calls": converted}
        elif m.get("role") == "tool":
            name = m.get("tool_name", m.get("name"))
            if name is not None and not isinstance(name, str):
                raise bad(f"messages[{i}].tool_name must be a string", f"messages[{i}].tool_name")
            at = next((k for k, (_, n) in enumerate(pending) if name is None or n == name), None)
            cid, called = pending.pop(at) if at is not None else (f"call_{i}", name)
            m = {**m, "tool_call_id": m.get("tool_call_id") or cid, "name": name or called}
        out.append(m)
    return out


def _common(body: dict, model, state, **text) -> OllamaParams:
    name = _model_name(body, state)
    _refuse_unsupported(body)
    stream = _bool(body, "stream")
    keep_alive = body.get("keep_alive")   # the model stays loaded for the server's life: nothing to schedule
    if keep_alive is not None and not isinstance(keep_alive, (str, int, float)):
        raise bad(f"keep_alive must be a duration such as \"5m\" or a number of seconds, got "
                  f"{_json_type(keep_alive)}", "keep_alive")
    return OllamaParams(model=name, stream=stream is not False, **_think(body, model),
                        **_options(body, model), answer_format=_format(body.get("format")), **text)


def _format(value: Any) -> AnswerFormat | None:
    """Ollama's ``format``: "json" (any JSON object) or a JSON schema object; the schema is compiled later,
    for the model's tokenizer (a 400 naming ``format`` if the constraint library rejects it)."""
    if value is None or value == "":
        return None
    if value == "json":
        return json_answer(None, name="format")
    if not isinstance(value, dict):
        raise bad(f"format must be \"json\" or a JSON schema object, got {_json_type(value)} {_show(value)}",
                  "format")
    return json_answer(value, name="format")


def parse_chat(body: dict, model, state) -> OllamaParams:
    tools, choice = parse_tools_fields(body.get("tools"), None)   # Ollama has no tool_choice: "auto"
    return _common(body, model, state, messages=_chat_messages(body.get("messages")), tools=tools,
                   tool_choice=choice)


def parse_generate(body: dict, model, state) -> OllamaParams:
    if body.get("tools") not in (None, []):
        raise bad("tools are for /api/chat: send the request there, as messages", "tools")
    prompt, system = body.get("prompt"), body.get("system")
    if not isinstance(prompt, str):
        raise bad(f"prompt must be a string, got {_json_type(prompt)}", "prompt")
    if system is not None and not isinstance(system, str):
        raise bad(f"system must be a string, got {_json_type(system)}", "system")
    prompt = _utf8(prompt, "prompt")
    if _bool(body, "raw"):
        if system:
            raise bad("system has no effect with raw: true (no template is applied): put it in the prompt",
                      "system")
        return _common(body, model, state, messages=None, prompt=prompt, chat=False)
    messages = [{"role": "system", "content": _utf8(system, "system")}] if system else []
    return _common(body, model, state, messages=messages + [{"role": "user", "content": prompt}], chat=False)


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
            if item is _END:
                break
            if isinstance(item, BaseException):
                await emit(self.error_json(_failure(item)))
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
                await emit(self.error_json(_SHUT_DOWN))
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
    from .app import admit  # app imports this module for its routes

    state = request.app.state.server
    model = state.require_model()
    loaded: dict = {}

    def parse_body(body: dict) -> OllamaParams:
        if _loaded_only(body, parse is parse_chat):
            loaded["name"] = _model_name(body, state)
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
    from .app import _read_body
    from .schemas import parse_json_body

    state = request.app.state.server
    model = state.require_model()
    body = parse_json_body(await _read_body(request, 64 * 1024), request.headers.get("content-type"))
    _model_name(body, state)
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
