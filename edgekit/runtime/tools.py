"""Tool calls: definitions, the prompt that presents them, the answer format that forces a valid call, the parse.

Usable from Python as well as from the servers (which only translate their protocol to and from this)::

    plan = tools.plan(model.codec, messages, [weather_tool], tool_choice="auto")
    result = model.generate(messages=plan.messages, tools=plan.template_tools, answer_format=plan.answer_format)
    content, calls = plan.parse(result.answer)         # calls: [ToolCall(id, name, arguments)]

Messages are HF/OpenAI-shaped: an assistant turn may carry ``tool_calls`` ([{"id", "type": "function",
"function": {"name", "arguments"}}], arguments a JSON string or an object) and ``content`` None; a tool result is
``{"role": "tool", "content": "...", "tool_call_id": ..., "name": ...}``.

How a conversation with tools reaches the model depends on what its chat template renders, found by rendering
small probes through it once per codec (:func:`template_support`):

- tool definitions: passed as the template's ``tools`` variable when it renders them; otherwise (R1-Distill,
  SmolLM2) a **fallback block** is appended to the system message (one is added if there is none): the tools as
  JSON lines in ``<tools>`` and the call format (:func:`fallback_prompt`);
- earlier calls and results: passed as ``tool_calls`` / ``role: tool`` when the template renders them (R1's
  renders both; arguments as a JSON string there, as an object for HF templates that ``tojson`` them);
  otherwise a call becomes assistant text in the call format and a result a user turn in ``<tool_response>``.
- the call format: the template's own when it is DeepSeek's (``<｜tool▁calls▁begin｜>...``), else Hermes-style
  ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`` (what Qwen2.5 and SmolLM2 were tuned on).

The answer format (:mod:`edgekit.runtime.answer_format`) makes every call parse: the name is one of the tools'
names and the arguments a JSON value valid against that tool's ``parameters``.
"""

from __future__ import annotations

import json
import weakref
from dataclasses import dataclass, field
from typing import Any

from ..errors import GenerationError, ToolError
from .answer_format import AnswerFormat, Choice, Json, Literal, Repeat, Seq, Text
from .tool_calls import DEEPSEEK, HERMES, CallFormat, ToolCall, ToolCallParser, parse_calls

CHOICES = ("auto", "required", "none")
MAX_TOOLS = 128
MAX_CALLS = 8                      # calls in one answer (OpenAI's parallel_tool_calls); a loop stops here
_NO_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}
_TYPES = ("object", "array", "string", "number", "integer", "boolean", "null")
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions")
_SCHEMA_ONE = ("items", "additionalProperties", "not", "contains", "propertyNames", "if", "then", "else")


@dataclass(frozen=True)
class Tool:
    name: str
    parameters: dict
    description: str = ""

    def definition(self) -> dict:
        """OpenAI's shape, also what HF chat templates read from ``tools``."""
        function: dict[str, Any] = {"name": self.name}
        if self.description:
            function["description"] = self.description
        function["parameters"] = self.parameters
        return {"type": "function", "function": function}


# ----- validating what a client sent -------------------------------------------------------------------
def _kind(v: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(v), "number" if isinstance(v, (int, float)) else type(v).__name__)


def parse_tools(value: Any, where: str = "tools") -> list[Tool]:
    """OpenAI/Ollama ``tools`` ([{"type": "function", "function": {"name", "description", "parameters"}}])."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise ToolError(f"{where} must be a list of tool objects, got {_kind(value)}", param=where)
    if len(value) > MAX_TOOLS:
        raise ToolError(f"{where} has {len(value)} tools: use at most {MAX_TOOLS}", param=where)
    tools, seen = [], set()
    for i, t in enumerate(value):
        at = f"{where}[{i}]"
        if not isinstance(t, dict):
            raise ToolError(f"{at} must be an object such as {{\"type\": \"function\", \"function\": {{\"name\": "
                            "...}}}}, got " + _kind(t), param=at)
        if t.get("type", "function") != "function":
            raise ToolError(f"{at}.type {json.dumps(t.get('type'))[:40]} is not supported: use \"function\"",
                            param=f"{at}.type")
        f = t.get("function")
        if not isinstance(f, dict):
            raise ToolError(f"{at}.function must be an object with name, description and parameters",
                            param=f"{at}.function")
        name = f.get("name")
        if not isinstance(name, str) or not name or len(name) > 64 \
                or not all(c.isascii() and (c.isalnum() or c in "_-.") for c in name):
            raise ToolError(f"{at}.function.name must be 1-64 letters, digits, '_', '-' or '.', got "
                            f"{json.dumps(name)[:70]}", param=f"{at}.function.name")
        if name in seen:
            raise ToolError(f"{at}.function.name {json.dumps(name)} is defined twice: give each tool its own name",
                            param=f"{at}.function.name")
        seen.add(name)
        description = f.get("description")
        if description is not None and not isinstance(description, str):
            raise ToolError(f"{at}.function.description must be a string", param=f"{at}.function.description")
        params = f.get("parameters")
        if params is None:
            params = _NO_PARAMETERS
        else:
            check_schema(params, f"{at}.function.parameters")
            if not isinstance(params, dict) or params.get("type", "object") != "object":
                raise ToolError(f"{at}.function.parameters must be a JSON schema of an object "
                                "({\"type\": \"object\", \"properties\": {...}})", param=f"{at}.function.parameters")
        tools.append(Tool(name, params, description or ""))
    return tools


def check_schema(schema: Any, where: str, depth: int = 0) -> None:
    """The structural rules of JSON Schema that a constrained decoder relies on; names the first bad field."""
    if isinstance(schema, bool):
        return
    if not isinstance(schema, dict):
        raise ToolError(f"{where} must be a JSON schema object, got {_kind(schema)}", param=where)
    if depth > 32:
        raise ToolError(f"{where} is nested more than 32 levels deep", param=where)
    t = schema.get("type")
    if t is not None:
        for one in (t if isinstance(t, list) else [t]):
            if one not in _TYPES:
                raise ToolError(f"{where}.type {json.dumps(one)[:40]} is not a JSON schema type: use one of "
                                f"{', '.join(_TYPES)}", param=f"{where}.type")
    for key in _SCHEMA_MAPS:
        if key in schema:
            if not isinstance(schema[key], dict):
                raise ToolError(f"{where}.{key} must be an object of schemas", param=f"{where}.{key}")
            for name, sub in schema[key].items():
                check_schema(sub, f"{where}.{key}.{name}", depth + 1)
    for key in _SCHEMA_LISTS:
        if key in schema:
            if not isinstance(schema[key], list) or (key != "prefixItems" and not schema[key]):
                raise ToolError(f"{where}.{key} must be a non-empty list of schemas", param=f"{where}.{key}")
            for i, sub in enumerate(schema[key]):
                check_schema(sub, f"{where}.{key}[{i}]", depth + 1)
    for key in _SCHEMA_ONE:
        if key in schema:
            check_schema(schema[key], f"{where}.{key}", depth + 1)
    if "required" in schema and (not isinstance(schema["required"], list)
                                 or not all(isinstance(r, str) for r in schema["required"])):
        raise ToolError(f"{where}.required must be a list of property names", param=f"{where}.required")
    if "enum" in schema and (not isinstance(schema["enum"], list) or not schema["enum"]):
        raise ToolError(f"{where}.enum must be a non-empty list", param=f"{where}.enum")
    for key in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf"):
        if key in schema and (isinstance(schema[key], bool) or not isinstance(schema[key], (int, float))):
            raise ToolError(f"{where}.{key} must be a number", param=f"{where}.{key}")
    for key in ("minLength", "maxLength", "minItems", "maxItems", "minProperties", "maxProperties"):
        if key in schema and (isinstance(schema[key], bool) or not isinstance(schema[key], int) or schema[key] < 0):
            raise ToolError(f"{where}.{key} must be a whole number >= 0", param=f"{where}.{key}")
    ref = schema.get("$ref")
    if ref is not None and (not isinstance(ref, str) or not ref.startswith("#")):
        raise ToolError(f"{where}.$ref must point inside the schema (\"#/$defs/...\"), got {json.dumps(ref)[:60]}",
                        param=f"{where}.$ref")


@dataclass(frozen=True)
class ToolChoice:
    mode: str                      # "auto" | "required" | "none" | "function"
    name: str | None = None


# What a server uses when a request with tools sends no tool_choice (Ollama's API has none, so Home Assistant
# cannot send one): "auto" (OpenAI's default), "required", or "after-user": a call is required when the last
# message is the user's, and after a tool result the model may answer in text. Small models under "auto"
# rarely start a call (SmolLM2-135M writes the tool's name as text); "after-user" gives one call per request and
# then the spoken answer, the loop Home Assistant runs.
DEFAULT_CHOICES = ("auto", "required", "after-user")


def default_choice(policy: str, messages: list[dict]) -> ToolChoice:
    if policy not in DEFAULT_CHOICES:
        raise ToolError(f"invalid default tool choice {policy!r}: use one of {', '.join(DEFAULT_CHOICES)}")
    if policy == "after-user":
        last = messages[-1].get("role") if messages else None
        return ToolChoice("required" if last == "user" else "auto")
    return ToolChoice(policy)


def parse_tool_choice(value: Any, tools: list[Tool], where: str = "tool_choice") -> ToolChoice:
    """OpenAI's ``tool_choice``: "auto" (default with tools), "required", "none" or
    {"type": "function", "function": {"name": NAME}}."""
    if value is None:
        return ToolChoice("auto" if tools else "none")
    if isinstance(value, str):
        if value not in CHOICES:
            raise ToolError(f"invalid {where} {json.dumps(value)[:40]}: use \"auto\", \"required\", \"none\" or "
                            "{\"type\": \"function\", \"function\": {\"name\": ...}}", param=where)
        if value != "none" and not tools:
            raise ToolError(f"{where} {json.dumps(value)} needs tools: send tools, or leave {where} out", param=where)
        return ToolChoice(value)
    if isinstance(value, dict):
        f = value.get("function")
        name = f.get("name") if isinstance(f, dict) else None
        if value.get("type", "function") != "function" or not isinstance(name, str):
            raise ToolError(f"{where} must be {{\"type\": \"function\", \"function\": {{\"name\": NAME}}}} to "
                            "force one tool", param=where)
        if name not in {t.name for t in tools}:
            listed = ", ".join(t.name for t in tools) or "none"
            raise ToolError(f"{where}.function.name {json.dumps(name)[:70]} is not one of the tools "
                            f"({listed[:300]})", param=f"{where}.function.name")
        return ToolChoice("function", name)
    raise ToolError(f"{where} must be a string or an object, got {_kind(value)}", param=where)


# ----- what the chat template renders --------------------------------------------------------------------
@dataclass(frozen=True)
class TemplateSupport:
    definitions: bool              # renders the ``tools`` variable
    calls: bool                    # renders an assistant turn's tool_calls
    arguments: str                 # "object" or "string": how it wants function.arguments
    content_with_calls: bool       # renders tool_calls when the turn also has content (R1's does not)
    outputs: bool                  # renders role "tool"
    format: CallFormat


_PROBE = "edgekit_probe"
_support_cache: weakref.WeakKeyDictionary[Any, TemplateSupport] = weakref.WeakKeyDictionary()


def template_support(codec) -> TemplateSupport:
    """What ``codec``'s chat template does with tools, by rendering probes through it (cached per codec)."""
    cached = _support_cache.get(codec)
    if cached is None:
        cached = _support_cache[codec] = _probe(codec)
    return cached


def _renders(codec, messages, needle: str, **extra) -> str | None:
    try:
        out = codec.render(messages, add_generation_prompt=True, **extra)
    except GenerationError:
        return None
    return out if needle in out else None


def _probe(codec) -> TemplateSupport:
    user = {"role": "user", "content": "hi"}
    tool = Tool(_PROBE + "_def", {"type": "object", "properties": {}}).definition()
    definitions = _renders(codec, [user], _PROBE + "_def", tools=[tool]) is not None
    args = {_PROBE + "_arg": 1}
    calls, arguments, rendered = False, "object", ""
    for form in ("object", "string"):
        call = {"id": "call_0", "type": "function",
                "function": {"name": _PROBE + "_call", "arguments": args if form == "object" else json.dumps(args)}}
        out = _renders(codec, [user, {"role": "assistant", "content": None, "tool_calls": [call]}], _PROBE + "_call")
        # an object rendered with str() shows single quotes: the template wanted a string
        if out is not None and '"' + _PROBE + '_arg"' in out:
            calls, arguments, rendered = True, form, out
            break
    with_content = False
    if calls:
        call = {"id": "call_0", "type": "function", "function": {
            "name": _PROBE + "_call", "arguments": args if arguments == "object" else json.dumps(args)}}
        with_content = _renders(codec, [user, {"role": "assistant", "content": "ok", "tool_calls": [call]}],
                                _PROBE + "_call") is not None
    outputs = _renders(codec, [user, {"role": "assistant", "content": "ok"},
                               {"role": "tool", "content": _PROBE + "_out", "tool_call_id": "call_0",
                                "name": _PROBE + "_call"}], _PROBE + "_out") is not None
    # R1's template writes DeepSeek's markers: answer in them too, so history and answer agree
    fmt = DEEPSEEK if DEEPSEEK.block_open in rendered else HERMES
    return TemplateSupport(definitions, calls, arguments, with_content, outputs, fmt)


# ----- the plan for one request -----------------------------------------------------------------------
@dataclass
class ToolPlan:
    """Everything one request with tools needs: what to render, what to force, how to read the answer."""

    tools: list[Tool]
    choice: ToolChoice
    support: TemplateSupport
    messages: list[dict]                       # ready for the template
    template_tools: list[dict] | None          # the template's ``tools`` variable (None: not rendered by it)
    answer_format: AnswerFormat | None         # None: tool_choice "none" (free text)
    max_calls: int = MAX_CALLS
    names: tuple[str, ...] = field(default=())

    @property
    def format(self) -> CallFormat:
        return self.support.format

    def parse(self, answer: str, finish_reason: str = "stop") -> tuple[str | None, list[ToolCall]]:
        """(content, calls) of a finished answer; no calls when there were no tools or nothing parses. When
        max_tokens cut the answer ("length"), the calls completed before the cut are kept."""
        if self.choice.mode == "none":
            return answer, []
        return parse_calls(answer, self.format, self.names, cut=finish_reason == "length")

    def parser(self) -> ToolCallParser:
        """For streaming: feed answer deltas, get content deltas and call deltas back."""
        return ToolCallParser(self.format, self.names, enabled=self.choice.mode != "none")


def plan(codec, messages: list[dict], tools: list[Tool] | list[dict] | None, tool_choice: Any = None, *,
         parallel: bool = False, system_role: str = "system") -> ToolPlan:
    """The plan for ``messages`` with ``tools`` (Tool objects or OpenAI-shaped dicts) and ``tool_choice``.

    ``parallel``: allow up to MAX_CALLS calls in one answer (OpenAI's ``parallel_tool_calls: true``); by default
    one, because small models that may call again tend to repeat the same call until the limit (the client gets
    the result and can be called again on the next turn, as Home Assistant does). Raises ToolError (with
    ``param``) for bad definitions, choices or tool messages.
    """
    if tools and not isinstance(tools[0], Tool):
        tools = parse_tools(tools)
    tools = list(tools or [])
    choice = tool_choice if isinstance(tool_choice, ToolChoice) else parse_tool_choice(tool_choice, tools)
    support = template_support(codec)
    offered = [] if choice.mode == "none" else tools
    if choice.mode == "function":
        offered = [t for t in tools if t.name == choice.name]
    adapted = adapt_messages(messages, support)
    template_tools = None
    if offered and support.definitions:
        template_tools = [t.definition() for t in offered]
    elif offered:
        adapted = _with_system(adapted, fallback_prompt(offered, support.format, choice), system_role)
    max_calls = MAX_CALLS if parallel else 1
    fmt = answer_format(offered, support.format, choice, max_calls) if offered else None
    return ToolPlan(tools, choice, support, adapted, template_tools, fmt, max_calls,
                    tuple(t.name for t in offered))


def _with_system(messages: list[dict], block: str, role: str) -> list[dict]:
    if messages and messages[0].get("role") == "system":
        first = dict(messages[0])
        first["content"] = (first.get("content") or "").rstrip() + "\n\n" + block
        return [first, *messages[1:]]
    return [{"role": role, "content": block}, *messages]


def fallback_prompt(tools: list[Tool], fmt: CallFormat, choice: ToolChoice) -> str:
    """The documented block that presents ``tools`` to a template that does not render them."""
    lines = ["You can call functions to help with the user's request. The functions, with a JSON schema of their "
             "arguments:", "<tools>"]
    for t in tools:
        lines.append(json.dumps(t.definition()["function"], ensure_ascii=False))
    lines.append("</tools>")
    lines.append("To call a function, answer with:")
    lines.append(fmt.example())
    if choice.mode == "required":
        lines.append("You must call one or more of the functions.")
    elif choice.mode == "function":
        lines.append(f"You must call the function {choice.name}.")
    else:
        lines.append("Call a function when it helps; otherwise answer in plain text.")
    return "\n".join(lines)


def adapt_messages(messages: list[dict], support: TemplateSupport) -> list[dict]:
    """``messages`` as this template can render them: calls and results passed through when it renders them,
    written out as text (call format / ``<tool_response>``) when it does not."""
    out = []
    for i, m in enumerate(messages):
        role = m.get("role")
        calls = m.get("tool_calls")
        if role == "assistant" and calls:
            normalized = [_normalized_call(c, f"messages[{i}].tool_calls[{j}]") for j, c in enumerate(calls)]
            content = m.get("content") or None
            if support.calls:
                rendered = [{"id": c.id, "type": "function", "function": {
                    "name": c.name, "arguments": c.arguments if support.arguments == "string" else c.args}}
                    for c in normalized]
                # R1's template renders the calls only when the turn has no content: the calls matter more
                out.append({"role": "assistant", "content": content if support.content_with_calls else None,
                            "tool_calls": rendered})
            else:
                text = support.format.render(normalized)
                out.append({"role": "assistant", "content": (content + "\n" if content else "") + text})
        elif role == "tool":
            content = m.get("content")
            if not isinstance(content, str):
                raise ToolError(f"messages[{i}].content of a tool message must be a string (the tool's result)",
                                param=f"messages[{i}].content")
            if support.outputs:
                out.append({k: v for k, v in m.items() if v is not None})
            else:
                out.append({"role": "user", "content": f"<tool_response>\n{content}\n</tool_response>"})
        else:
            out.append(m)
    return out


def _normalized_call(c: Any, at: str) -> ToolCall:
    if not isinstance(c, dict) or not isinstance(c.get("function"), dict):
        raise ToolError(f"{at} must be an object such as {{\"id\": ..., \"type\": \"function\", \"function\": "
                        "{\"name\": ..., \"arguments\": ...}}", param=at)
    f = c["function"]
    name = f.get("name")
    if not isinstance(name, str) or not name:
        raise ToolError(f"{at}.function.name must be a non-empty string", param=f"{at}.function.name")
    args = f.get("arguments")
    if isinstance(args, str):
        try:
            parsed = json.loads(args) if args.strip() else {}
        except ValueError:
            raise ToolError(f"{at}.function.arguments is not valid JSON: send the arguments the call was made "
                            "with (a JSON object, as a string)", param=f"{at}.function.arguments") from None
        text = args if args.strip() else "{}"
    elif args is None or isinstance(args, dict):
        parsed = args or {}
        text = json.dumps(parsed, ensure_ascii=False)
    else:
        raise ToolError(f"{at}.function.arguments must be a JSON object (or a string holding one)",
                        param=f"{at}.function.arguments")
    if not isinstance(parsed, dict):
        raise ToolError(f"{at}.function.arguments must be a JSON object, got {_kind(parsed)}",
                        param=f"{at}.function.arguments")
    cid = c.get("id")
    return ToolCall(cid if isinstance(cid, str) and cid else "call_0", name, text)


# ----- the answer's shape ----------------------------------------------------------------------------------
def answer_format(tools: list[Tool], fmt: CallFormat, choice: ToolChoice, max_calls: int = MAX_CALLS) -> AnswerFormat:
    """auto: text, then optionally calls; required / a named function: calls only."""
    one = Choice(*[Seq(Literal(fmt.call_head(t.name)), Json(closed(t.parameters)), Literal(fmt.tail))
                   for t in tools])
    more = [Repeat(Seq(Literal(fmt.separator), one), 0, max_calls - 1)] if max_calls > 1 else []
    calls = Seq(*[p for p in (Literal(fmt.block_open), one, *more, Literal(fmt.block_close))
                  if not (isinstance(p, Literal) and not p.text)])
    if choice.mode == "auto":
        return AnswerFormat(Seq(Text(stop=(fmt.trigger,)), Repeat(calls, 0, 1)), name="tools")
    return AnswerFormat(calls, name="tool_choice" if choice.mode == "function" else "tools")


def closed(schema: Any) -> Any:
    """``schema`` where an object that lists its ``properties`` and says nothing about others allows no others.

    Still within the schema (every value it allows is valid), and what the caller means: a 135M model left free
    adds keys such as "type" or "parameters" to the arguments, which Home Assistant's intent handlers refuse.
    """
    if isinstance(schema, list):
        return [closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: (closed(v) if k in _SCHEMA_ONE or k in _SCHEMA_LISTS else
               {n: closed(s) for n, s in v.items()} if k in _SCHEMA_MAPS and isinstance(v, dict) else v)
           for k, v in schema.items()}
    if "properties" in out and "additionalProperties" not in out and "patternProperties" not in out:
        out["additionalProperties"] = False
    return out
