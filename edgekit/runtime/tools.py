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

Definitions and ``tool_choice`` from a client are checked in :mod:`edgekit.runtime.tool_defs`. The answer format
(:mod:`edgekit.runtime.answer_format`) makes every call parse: the name is one of the tools'
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
from .tool_defs import MAX_CALLS, Tool, ToolChoice, closed, json_kind, parse_tool_choice, parse_tools


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
        raise ToolError(f"{at}.function.arguments must be a JSON object, got {json_kind(parsed)}",
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
