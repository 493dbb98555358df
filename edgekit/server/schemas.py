"""Request validation for the OpenAI chat-completions API: a body becomes :class:`ChatParams` or a 400.

Errors come in OpenAI's shape (:mod:`edgekit.server.api_errors`); single fields are checked by
:mod:`edgekit.server.fields`, messages and tools by :mod:`edgekit.server.messages`. Fields this server
does not know are ignored (clients send many: ``user``, ``store``, ``metadata`` ...); fields it knows are
type- and range-checked here, before anything is tokenized. ``response_format`` ("text", "json_object",
"json_schema") becomes an :class:`~edgekit.runtime.answer_format.AnswerFormat`; the schema
itself is compiled for the model's tokenizer when the request is prepared (a 400 naming
``response_format.json_schema.schema`` when the constraint library rejects it).
Extensions beyond OpenAI's fields (sent top-level, which is what the openai client's ``extra_body`` does):
``thinking_budget``, ``top_k``, ``min_p``, ``repetition_penalty``, ``ignore_eos``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ..runtime.answer_format import AnswerFormat, json_answer
from .api_errors import bad
from .fields import bool_field, float_field, int_field, json_type, show, stop_field
from .messages import parse_messages, parse_tools_fields


@dataclass(frozen=True)
class ChatParams:
    messages: list[dict[str, str]]
    stream: bool = False
    include_usage: bool = False
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: list[str] | None = None
    thinking_budget: int | None = None
    ignore_eos: bool = False
    answer_format: AnswerFormat | None = None   # response_format (OpenAI) / format (Ollama)
    # tools (runtime.tools): what the client sent, and the plan made for the model's template in admit()
    tools: tuple = ()
    tool_choice: Any = None
    parallel_tool_calls: bool = False
    tool_plan: Any = None

    @property
    def uses_tools(self) -> bool:
        """Tools offered, or tool calls / results in the conversation (which the template must get right)."""
        return bool(self.tools) or any(m.get("tool_calls") or m.get("role") == "tool" for m in self.messages or ())

    def runtime_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``Model.stream``/``Model.request`` (None = the bundle's default)."""
        kwargs = {"messages": self.messages, "max_new_tokens": self.max_tokens, "temperature": self.temperature,
                  "top_p": self.top_p, "top_k": self.top_k, "min_p": self.min_p,
                  "repetition_penalty": self.repetition_penalty, "seed": self.seed, "stop": self.stop,
                  "thinking_budget": self.thinking_budget, "ignore_eos": self.ignore_eos,
                  "answer_format": self.answer_format}
        plan = self.tool_plan
        if plan is not None:
            kwargs["messages"] = plan.messages
            if plan.template_tools:
                kwargs["tools"] = plan.template_tools
            if plan.answer_format is not None:   # admit() refuses tools together with response_format
                kwargs["answer_format"] = plan.answer_format
        return kwargs


def parse_chat(body: dict[str, Any]) -> ChatParams:
    """Validate a chat-completions request body (already a JSON object); raises a 400 ApiError."""
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise bad(f"model must be a string, got {json_type(model)}", "model", "invalid_type")
    messages = parse_messages(body.get("messages"))

    if body.get("n") not in (None, 1):
        raise bad(f"n must be 1, got {show(body['n'])}: this server returns one choice per request", "n")
    # max_completion_tokens is OpenAI's current name; max_tokens the older one. Both count reasoning tokens.
    mct = int_field(body, "max_completion_tokens", 1)
    max_tokens = mct if mct is not None else int_field(body, "max_tokens", 1)

    temperature = float_field(body, "temperature", 0, 2)
    top_p = float_field(body, "top_p", 0, 1)
    if top_p == 0:
        # OpenAI accepts top_p 0; keeping the smallest set with mass >= 0 keeps the top token: greedy.
        temperature, top_p = 0.0, None
    for name in ("frequency_penalty", "presence_penalty"):   # accepted for compatibility, not applied
        float_field(body, name, -2, 2)
    top_k = int_field(body, "top_k", 0, what=" (0 = off)")
    min_p = float_field(body, "min_p", 0, 1, hi_open=True, what=" (0 = off)")
    repetition_penalty = float_field(body, "repetition_penalty", 0, math.inf, lo_open=True, hi_open=True,
                                what=" (1 = off)")

    seed = int_field(body, "seed", -(2**63), 2**64 - 1)
    if seed is not None and seed < 0:
        seed %= 2**64  # OpenAI takes any 64-bit integer; the sampler wants a non-negative one

    stream = bool(bool_field(body, "stream"))
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not isinstance(options, dict):
            raise bad(f"stream_options must be an object, got {json_type(options)}", "stream_options",
                      "invalid_type")
        if options.get("include_usage") not in (None, True, False):
            raise bad("stream_options.include_usage must be true or false", "stream_options.include_usage",
                      "invalid_type")
        include_usage = bool(options.get("include_usage"))

    tools, tool_choice = parse_tools_fields(body.get("tools"), body.get("tool_choice"))
    return ChatParams(
        tools=tools, tool_choice=tool_choice, parallel_tool_calls=bool(bool_field(body, "parallel_tool_calls")),
        messages=messages, stream=stream, include_usage=include_usage, max_tokens=max_tokens,
        temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p, repetition_penalty=repetition_penalty,
        seed=seed, stop=stop_field(body.get("stop")),
        thinking_budget=int_field(body, "thinking_budget", 0, what=" (reasoning tokens before the answer is forced)"),
        ignore_eos=bool(bool_field(body, "ignore_eos")), answer_format=_response_format(body.get("response_format")))


RESPONSE_FORMATS = ("text", "json_object", "json_schema")


def _response_format(value: Any) -> AnswerFormat | None:
    """OpenAI's response_format: None/"text" (free text), "json_object" (any JSON object), "json_schema"."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise bad(f"response_format must be an object such as {{\"type\": \"json_object\"}}, got {json_type(value)}",
                  "response_format", "invalid_type")
    kind = value.get("type")
    if kind not in RESPONSE_FORMATS:
        raise bad(f"response_format.type {show(kind)} is not valid: use one of {', '.join(RESPONSE_FORMATS)}",
                  "response_format.type")
    if kind == "text":
        return None
    if kind == "json_object":
        return json_answer(None, name="response_format")
    spec = value.get("json_schema")
    if not isinstance(spec, dict):
        raise bad(f"response_format.json_schema must be an object with name and schema, got {json_type(spec)}",
                  "response_format.json_schema", "invalid_type")
    name = spec.get("name")
    if not isinstance(name, str) or not 1 <= len(name) <= 64 or not all(c.isascii() and (c.isalnum() or c in "_-")
                                                                         for c in name):
        raise bad(f"response_format.json_schema.name {show(name)} is not valid: use 1 to 64 letters, digits, _ "
                  "or -", "response_format.json_schema.name")
    if spec.get("strict") not in (None, True, False):
        raise bad("response_format.json_schema.strict must be true or false", "response_format.json_schema.strict",
                  "invalid_type")
    schema = spec.get("schema")
    if schema is None:    # OpenAI's schema is optional: then any JSON object
        return json_answer(None, name="response_format.json_schema.schema")
    if not isinstance(schema, dict):
        raise bad(f"response_format.json_schema.schema must be a JSON schema object, got {json_type(schema)}",
                  "response_format.json_schema.schema", "invalid_type")
    return json_answer(schema, name="response_format.json_schema.schema")
