"""Request validation for the OpenAI chat-completions API, and errors in OpenAI's shape.

Clients are written against OpenAI's API, so a bad request gets what OpenAI would send: a 4xx status and
``{"error": {"message", "type", "param", "code"}}`` whose message says what was wrong and what is valid.
Fields this server does not know are ignored (clients send many: ``user``, ``store``, ``metadata`` ...); fields
it knows are type- and range-checked here, before anything is tokenized. ``response_format`` ("text",
"json_object", "json_schema") becomes an :class:`~edgekit.runtime.answer_format.AnswerFormat`; the schema
itself is compiled for the model's tokenizer when the request is prepared (a 400 naming
``response_format.json_schema.schema`` when the constraint library rejects it).
Extensions beyond OpenAI's fields (sent top-level, which is what the openai client's ``extra_body`` does):
``thinking_budget``, ``top_k``, ``min_p``, ``repetition_penalty``, ``ignore_eos``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from ..runtime.answer_format import AnswerFormat, json_answer

MAX_STOP = 16                 # OpenAI allows 4; a few more costs nothing here
ROLES = ("system", "developer", "user", "assistant", "tool")


class ApiError(Exception):
    """An HTTP error answered in OpenAI's shape. Raised by handlers; never leaves the server."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, type=self.type, param=self.param, code=self.code)


def error_body(message: str, *, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad(message: str, param: str | None = None, code: str | None = "invalid_value") -> ApiError:
    return ApiError(400, message, param=param, code=code)


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def parse_json_body(raw: bytes, content_type: str | None) -> dict[str, Any]:
    """The request body as a JSON object, or a 4xx ApiError saying what is wrong with it."""
    if content_type:
        media = content_type.split(";", 1)[0].strip().lower()
        if media != "application/json" and not media.endswith("+json"):
            raise ApiError(415, f"unsupported Content-Type {media[:100]!r}: send the body as JSON with "
                                "Content-Type: application/json", code="unsupported_media_type")
    if not raw or raw.isspace():   # (not raw.strip(): that copies megabytes)
        raise bad("the request body is empty: send a JSON object such as "
                  '{"messages": [{"role": "user", "content": "Hello"}]}', code="invalid_json")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise bad(f"the request body is not valid UTF-8 (bad byte at offset {e.start}): send JSON encoded as "
                  "UTF-8", code="invalid_json") from None
    try:
        obj = json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise bad("the JSON body is nested too deeply", code="invalid_json") from None
    except json.JSONDecodeError as e:
        raise bad(f"the body is not valid JSON ({e.msg} at line {e.lineno} column {e.colno})",
                  code="invalid_json") from None
    except ValueError as e:   # NaN/Infinity, or an integer too long to convert
        raise bad(f"the body is not valid JSON ({str(e)[:120]})", code="invalid_json") from None
    if not isinstance(obj, dict):
        raise bad(f"the body must be a JSON object, got a JSON {_json_type(obj)}", code="invalid_json")
    return obj


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def _utf8(value: str, param: str) -> str:
    # JSON may carry "\ud800" escapes: Python accepts the lone surrogate, the tokenizer would fail on it.
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise bad(f"{param} contains an unpaired UTF-16 surrogate (e.g. \\ud800): send valid Unicode text",
                  param) from None
    return value


def _int(body: dict, name: str, lo: int, hi: int | None = None, what: str = "") -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if not isinstance(v, int) or isinstance(v, bool):
        raise bad(f"{name} must be a whole number, got {_json_type(v)} {_show(v)}{what}", name, "invalid_type")
    if v < lo or (hi is not None and v > hi):
        rng = f">= {lo}" if hi is None else f"between {lo} and {hi}"
        raise bad(f"invalid {name} {v}: use a whole number {rng}{what}", name)
    return v


def _float(body: dict, name: str, lo: float, hi: float, *, lo_open=False, hi_open=False, what="") -> float | None:
    v = body.get(name)
    if v is None:
        return None
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        raise bad(f"{name} must be a number, got {_json_type(v)} {_show(v)}{what}", name, "invalid_type")
    v = float(v)
    below = v <= lo if lo_open else v < lo
    above = v >= hi if hi_open else v > hi
    if not math.isfinite(v) or below or above:
        rng = f"{'(' if lo_open else '['}{lo:g}, {'inf' if hi == math.inf else f'{hi:g}'}{')' if hi_open else ']'}"
        raise bad(f"invalid {name} {v:g}: use a number in {rng}{what}", name)
    return v


def _bool(body: dict, name: str) -> bool | None:
    v = body.get(name)
    if v is None:
        return None
    if not isinstance(v, bool):
        raise bad(f"{name} must be true or false, got {_json_type(v)} {_show(v)}", name, "invalid_type")
    return v


def _show(v: Any) -> str:
    text = json.dumps(v, ensure_ascii=True) if not isinstance(v, str) else json.dumps(v[:40], ensure_ascii=True)
    return text if len(text) <= 60 else text[:57] + "..."


def _content(value: Any, param: str, role: str) -> str:
    if isinstance(value, str):
        return _utf8(value, param)
    if value is None:
        if role in ("assistant", "tool"):
            return ""  # an assistant turn that only made tool calls has no content
        raise bad(f"{param} is missing: a {role} message needs text content", param, "invalid_type")
    if isinstance(value, list):
        parts = []
        for i, part in enumerate(value):
            where = f"{param}[{i}]"
            if not isinstance(part, dict):
                raise bad(f"{where} must be an object such as {{\"type\": \"text\", \"text\": \"...\"}}", where,
                          "invalid_type")
            kind = part.get("type")
            if kind != "text":
                raise bad(f"{where} has type {_show(kind)}: this model reads text only, send parts of type "
                          "\"text\"", where, "unsupported_content")
            if not isinstance(part.get("text"), str):
                raise bad(f"{where}.text must be a string", f"{where}.text", "invalid_type")
            parts.append(_utf8(part["text"], f"{where}.text"))
        return "\n".join(parts)
    raise bad(f"{param} must be a string or a list of text parts, got {_json_type(value)}", param, "invalid_type")


def _messages(value: Any) -> list[dict[str, str]]:
    if value is None:
        raise bad("messages is required: a list such as [{\"role\": \"user\", \"content\": \"Hello\"}]",
                  "messages", "missing_required_parameter")
    if not isinstance(value, list) or not value:
        raise bad(f"messages must be a non-empty list of message objects, got {_json_type(value)}"
                  f"{' (empty)' if value == [] else ''}", "messages", "invalid_type")
    out = []
    for i, m in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad(f"{where} must be an object with role and content, got {_json_type(m)}", where, "invalid_type")
        role = m.get("role")
        if role not in ROLES:
            raise bad(f"{where}.role {_show(role)} is not valid: use one of {', '.join(ROLES)}", f"{where}.role")
        # "developer" is OpenAI's newer name for the system message; templates only know "system".
        # An assistant turn's reasoning_content is not sent back to the model (DeepSeek's guidance for R1).
        message = {"role": "system" if role == "developer" else role,
                   "content": _content(m.get("content"), f"{where}.content", role)}
        if role == "assistant" and m.get("tool_calls") is not None:
            message["tool_calls"] = _tool_calls(m["tool_calls"], f"{where}.tool_calls")
            message["content"] = message["content"] or None   # a turn that only calls tools (R1's template)
        elif role == "tool":
            tool_call_id = m.get("tool_call_id")
            if not isinstance(tool_call_id, str) or not tool_call_id:
                raise bad(f"{where}.tool_call_id is required: a tool message answers the call with that id",
                          f"{where}.tool_call_id", "invalid_type")
            message["tool_call_id"] = tool_call_id
            if isinstance(m.get("name"), str):
                message["name"] = m["name"]
        out.append(message)
    return out


def _tool_calls(value: Any, where: str) -> list[dict]:
    """An assistant turn's tool_calls, OpenAI's shape: arguments a JSON string (checked, kept as sent)."""
    if not isinstance(value, list):
        raise bad(f"{where} must be a list of tool calls", where, "invalid_type")
    calls = []
    for j, c in enumerate(value):
        at = f"{where}[{j}]"
        f = c.get("function") if isinstance(c, dict) else None
        if not isinstance(f, dict) or not isinstance(f.get("name"), str) or not f["name"]:
            raise bad(f"{at} must be {{\"id\": ..., \"type\": \"function\", \"function\": {{\"name\": ..., "
                      "\"arguments\": \"{...}\"}}}}", at, "invalid_type")
        if c.get("type", "function") != "function":
            raise bad(f"{at}.type must be \"function\"", f"{at}.type")
        args = f.get("arguments", "{}")
        if not isinstance(args, str):
            raise bad(f"{at}.function.arguments must be a string holding a JSON object", f"{at}.function.arguments",
                      "invalid_type")
        try:
            parsed = json.loads(args) if args.strip() else {}
        except ValueError:
            parsed = None
        if not isinstance(parsed, dict):
            raise bad(f"{at}.function.arguments is not a JSON object: send the arguments the call was made with",
                      f"{at}.function.arguments")
        cid = c.get("id")
        calls.append({"id": cid if isinstance(cid, str) and cid else f"call_{j}", "type": "function",
                      "function": {"name": _utf8(f["name"], f"{at}.function.name"),
                                   "arguments": _utf8(args, f"{at}.function.arguments")}})
    return calls


def _stop(value: Any) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise bad("stop must be a string or a list of strings", "stop", "invalid_type")
    if len(value) > MAX_STOP:
        raise bad(f"stop has {len(value)} sequences: use at most {MAX_STOP}", "stop")
    return [_utf8(s, "stop") for s in value if s]


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
        raise bad(f"model must be a string, got {_json_type(model)}", "model", "invalid_type")
    messages = _messages(body.get("messages"))

    if body.get("n") not in (None, 1):
        raise bad(f"n must be 1, got {_show(body['n'])}: this server returns one choice per request", "n")
    # max_completion_tokens is OpenAI's current name; max_tokens the older one. Both count reasoning tokens.
    mct = _int(body, "max_completion_tokens", 1)
    max_tokens = mct if mct is not None else _int(body, "max_tokens", 1)

    temperature = _float(body, "temperature", 0, 2)
    top_p = _float(body, "top_p", 0, 1)
    if top_p == 0:
        # OpenAI accepts top_p 0; keeping the smallest set with mass >= 0 keeps the top token: greedy.
        temperature, top_p = 0.0, None
    for name in ("frequency_penalty", "presence_penalty"):   # accepted for compatibility, not applied
        _float(body, name, -2, 2)
    top_k = _int(body, "top_k", 0, what=" (0 = off)")
    min_p = _float(body, "min_p", 0, 1, hi_open=True, what=" (0 = off)")
    repetition_penalty = _float(body, "repetition_penalty", 0, math.inf, lo_open=True, hi_open=True,
                                what=" (1 = off)")

    seed = _int(body, "seed", -(2**63), 2**64 - 1)
    if seed is not None and seed < 0:
        seed %= 2**64  # OpenAI takes any 64-bit integer; the sampler wants a non-negative one

    stream = bool(_bool(body, "stream"))
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not isinstance(options, dict):
            raise bad(f"stream_options must be an object, got {_json_type(options)}", "stream_options",
                      "invalid_type")
        if options.get("include_usage") not in (None, True, False):
            raise bad("stream_options.include_usage must be true or false", "stream_options.include_usage",
                      "invalid_type")
        include_usage = bool(options.get("include_usage"))

    tools, tool_choice = parse_tools_fields(body.get("tools"), body.get("tool_choice"))
    return ChatParams(
        tools=tools, tool_choice=tool_choice, parallel_tool_calls=bool(_bool(body, "parallel_tool_calls")),
        messages=messages, stream=stream, include_usage=include_usage, max_tokens=max_tokens,
        temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p, repetition_penalty=repetition_penalty,
        seed=seed, stop=_stop(body.get("stop")),
        thinking_budget=_int(body, "thinking_budget", 0, what=" (reasoning tokens before the answer is forced)"),
        ignore_eos=bool(_bool(body, "ignore_eos")), answer_format=_response_format(body.get("response_format")))


RESPONSE_FORMATS = ("text", "json_object", "json_schema")


def _response_format(value: Any) -> AnswerFormat | None:
    """OpenAI's response_format: None/"text" (free text), "json_object" (any JSON object), "json_schema"."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise bad(f"response_format must be an object such as {{\"type\": \"json_object\"}}, got {_json_type(value)}",
                  "response_format", "invalid_type")
    kind = value.get("type")
    if kind not in RESPONSE_FORMATS:
        raise bad(f"response_format.type {_show(kind)} is not valid: use one of {', '.join(RESPONSE_FORMATS)}",
                  "response_format.type")
    if kind == "text":
        return None
    if kind == "json_object":
        return json_answer(None, name="response_format")
    spec = value.get("json_schema")
    if not isinstance(spec, dict):
        raise bad(f"response_format.json_schema must be an object with name and schema, got {_json_type(spec)}",
                  "response_format.json_schema", "invalid_type")
    name = spec.get("name")
    if not isinstance(name, str) or not 1 <= len(name) <= 64 or not all(c.isascii() and (c.isalnum() or c in "_-")
                                                                         for c in name):
        raise bad(f"response_format.json_schema.name {_show(name)} is not valid: use 1 to 64 letters, digits, _ "
                  "or -", "response_format.json_schema.name")
    if spec.get("strict") not in (None, True, False):
        raise bad("response_format.json_schema.strict must be true or false", "response_format.json_schema.strict",
                  "invalid_type")
    schema = spec.get("schema")
    if schema is None:    # OpenAI's schema is optional: then any JSON object
        return json_answer(None, name="response_format.json_schema.schema")
    if not isinstance(schema, dict):
        raise bad(f"response_format.json_schema.schema must be a JSON schema object, got {_json_type(schema)}",
                  "response_format.json_schema.schema", "invalid_type")
    return json_answer(schema, name="response_format.json_schema.schema")



def parse_tools_fields(tools: Any, tool_choice: Any) -> tuple[tuple, Any]:
    """``tools`` and ``tool_choice`` checked (a 400 naming the field, e.g. ``tools[0].function.parameters``)."""
    from ..errors import ToolError
    from ..runtime.tool_defs import parse_tool_choice, parse_tools

    try:
        parsed = parse_tools(tools)
        # None: the server's default (edgekit serve --tool-choice) is applied in admit()
        return tuple(parsed), None if tool_choice is None else parse_tool_choice(tool_choice, parsed)
    except ToolError as e:
        raise bad(str(e), e.param) from None
