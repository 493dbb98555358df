"""Chat messages and tools in OpenAI's shape, checked: roles, text content, tool calls and tool results.

Used by both APIs: Ollama's messages are turned into this shape first (:mod:`edgekit.server.ollama_request`).
"""

from __future__ import annotations

import json
from typing import Any

from .api_errors import bad
from .fields import json_type, show, utf8_text

ROLES = ("system", "developer", "user", "assistant", "tool")


def _content(value: Any, param: str, role: str) -> str:
    if isinstance(value, str):
        return utf8_text(value, param)
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
                raise bad(f"{where} has type {show(kind)}: this model reads text only, send parts of type "
                          "\"text\"", where, "unsupported_content")
            if not isinstance(part.get("text"), str):
                raise bad(f"{where}.text must be a string", f"{where}.text", "invalid_type")
            parts.append(utf8_text(part["text"], f"{where}.text"))
        return "\n".join(parts)
    raise bad(f"{param} must be a string or a list of text parts, got {json_type(value)}", param, "invalid_type")


def parse_messages(value: Any) -> list[dict[str, str]]:
    if value is None:
        raise bad("messages is required: a list such as [{\"role\": \"user\", \"content\": \"Hello\"}]",
                  "messages", "missing_required_parameter")
    if not isinstance(value, list) or not value:
        raise bad(f"messages must be a non-empty list of message objects, got {json_type(value)}"
                  f"{' (empty)' if value == [] else ''}", "messages", "invalid_type")
    out = []
    for i, m in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad(f"{where} must be an object with role and content, got {json_type(m)}", where, "invalid_type")
        role = m.get("role")
        if role not in ROLES:
            raise bad(f"{where}.role {show(role)} is not valid: use one of {', '.join(ROLES)}", f"{where}.role")
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
                      "function": {"name": utf8_text(f["name"], f"{at}.function.name"),
                                   "arguments": utf8_text(args, f"{at}.function.arguments")}})
    return calls


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
