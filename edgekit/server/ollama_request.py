"""Ollama's request bodies (``/api/chat``, ``/api/generate``) checked and turned into :class:`OllamaParams`.

Sampling options come in ``options`` with Ollama's names (``repeat_penalty``, ``num_predict`` ...); an option
this server does not apply is refused with a 400 naming it, never ignored. ``format`` is "json" or a JSON
schema; ``think: false`` gives an R1 bundle no thinking budget; messages and tool turns are turned into
OpenAI's shape and checked as on the OpenAI API; ``images``, ``suffix``, ``template`` and ``context`` are
refused with a 400 saying so.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from ..runtime.answer_format import AnswerFormat, json_answer
from .api_errors import ApiError, bad
from .fields import bool_field, float_field, int_field, json_type, show, stop_field, utf8_text
from .messages import parse_messages, parse_tools_fields
from .schemas import ChatParams

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


def check_model_name(body: dict, state) -> str:
    """The model name the request sent (echoed in the answer); 404 unless it is the one this server serves."""
    name = body.get("model", body.get("name"))   # "name" is Ollama's older spelling
    if name is None or name == "":
        raise bad("model is required: send the name GET /api/tags lists", "model")
    if not isinstance(name, str):
        raise bad(f"model must be a string, got {json_type(name)}", "model")
    served = state.model_id or "edgekit"
    if name not in (served, served + ":latest"):
        raise ApiError(404, f"model {show(name)} not found: this server serves {json.dumps(served)} "
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
        raise bad(f"options must be an object such as {{\"temperature\": 0.7}}, got {json_type(opts)}", "options")
    unknown = sorted(k for k, v in opts.items() if k not in _OPTIONS and v is not None)
    if unknown:
        raise bad(f"options.{unknown[0][:60]} is not supported by edgekit serve: use {', '.join(_OPTIONS)}",
                  f"options.{unknown[0][:60]}")
    # Checked under their full names, so a message says "options.top_p", the field the client sent.
    o = {f"options.{k}": v for k, v in opts.items()}
    out: dict[str, Any] = {
        "temperature": float_field(o, "options.temperature", 0, 2),
        "top_p": float_field(o, "options.top_p", 0, 1),
        "top_k": int_field(o, "options.top_k", 0, what=" (0 = off)"),
        "min_p": float_field(o, "options.min_p", 0, 1, hi_open=True, what=" (0 = off)"),
        "repetition_penalty": float_field(o, "options.repeat_penalty", 0, float("inf"), lo_open=True, hi_open=True,
                                     what=" (1 = off)"),
        "seed": int_field(o, "options.seed", -(2**63), 2**64 - 1),
    }
    if out["top_p"] == 0:      # as on the OpenAI API: the smallest set with mass >= 0 is the top token
        out["temperature"], out["top_p"] = 0.0, None
    if out["seed"] is not None and out["seed"] < 0:
        out["seed"] %= 2**64   # Ollama's default seed is -1; the sampler wants a non-negative one
    num_predict = int_field(o, "options.num_predict", -2, what=" (-1 = until the context is full)")
    if num_predict == 0:
        raise bad("invalid options.num_predict 0: use a whole number >= 1, or -1 to generate until the context "
                  "is full", "options.num_predict")
    # -1 (and Ollama's -2, fill the context): as many as the context holds; run() stops at its end.
    out["max_tokens"] = model.max_context if num_predict is not None and num_predict < 0 else num_predict
    num_ctx = int_field(o, "options.num_ctx", 1)
    if num_ctx is not None and num_ctx > model.max_context:
        raise bad(f"options.num_ctx {num_ctx} is larger than this server's context of {model.max_context} tokens "
                  f"(edgekit serve --max-context): send num_ctx <= {model.max_context} (in Home Assistant: the "
                  "integration's context window size)", "options.num_ctx")
    out["num_ctx"] = num_ctx
    try:
        out["stop"] = stop_field(opts.get("stop"))
    except ApiError as e:
        raise bad("options." + e.message, "options.stop") from None
    return out


def _think(body: dict, model) -> dict[str, Any]:
    """``think`` and the thinking budget it asks for: None = the default, 0 = answer at once."""
    think = bool_field(body, "think")
    reasoning = bool(model.defaults.get("reasoning"))
    if think and not reasoning:
        raise bad(f"{json.dumps(body.get('model'))} does not support thinking: send the request without think "
                  "(only R1 bundles reason)", "think")
    return {"think": think, "thinking_budget": 0 if think is False and reasoning else None}


def _chat_messages(value: Any) -> list[dict[str, str]]:
    if isinstance(value, list):
        for i, m in enumerate(value):
            if not isinstance(m, dict):
                continue   # parse_messages names it
            if m.get("images"):
                raise bad(f"messages[{i}].images: this model reads text only", f"messages[{i}].images")
            thinking = m.get("thinking")
            if thinking is not None and not isinstance(thinking, str):
                raise bad(f"messages[{i}].thinking must be a string", f"messages[{i}].thinking")
            # An assistant turn's thinking is not sent back to the model (DeepSeek's guidance for R1).
        value = _openai_tool_messages(value)
    return parse_messages(value)


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
    name = check_model_name(body, state)
    _refuse_unsupported(body)
    stream = bool_field(body, "stream")
    keep_alive = body.get("keep_alive")   # the model stays loaded for the server's life: nothing to schedule
    if keep_alive is not None and not isinstance(keep_alive, (str, int, float)):
        raise bad(f"keep_alive must be a duration such as \"5m\" or a number of seconds, got "
                  f"{json_type(keep_alive)}", "keep_alive")
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
        raise bad(f"format must be \"json\" or a JSON schema object, got {json_type(value)} {show(value)}",
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
        raise bad(f"prompt must be a string, got {json_type(prompt)}", "prompt")
    if system is not None and not isinstance(system, str):
        raise bad(f"system must be a string, got {json_type(system)}", "system")
    prompt = utf8_text(prompt, "prompt")
    if bool_field(body, "raw"):
        if system:
            raise bad("system has no effect with raw: true (no template is applied): put it in the prompt",
                      "system")
        return _common(body, model, state, messages=None, prompt=prompt, chat=False)
    messages = [{"role": "system", "content": utf8_text(system, "system")}] if system else []
    return _common(body, model, state, messages=messages + [{"role": "user", "content": prompt}], chat=False)
