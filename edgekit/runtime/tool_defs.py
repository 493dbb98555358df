"""Tool definitions and ``tool_choice`` as a client sends them, checked: one-line ToolErrors for bad input.

A definition is OpenAI-shaped (``{"type": "function", "function": {"name", "description", "parameters"}}``);
its ``parameters`` JSON Schema is checked to be one the answer format (:mod:`edgekit.runtime.answer_format`) can
enforce. What the model then sees and how its calls are parsed is :mod:`edgekit.runtime.tools`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from ..errors import ToolError

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
def json_kind(v: Any) -> str:
    """The JSON type name of a value, for error messages."""
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(v), "number" if isinstance(v, (int, float)) else type(v).__name__)


def parse_tools(value: Any, where: str = "tools") -> list[Tool]:
    """OpenAI/Ollama ``tools`` ([{"type": "function", "function": {"name", "description", "parameters"}}])."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise ToolError(f"{where} must be a list of tool objects, got {json_kind(value)}", param=where)
    if len(value) > MAX_TOOLS:
        raise ToolError(f"{where} has {len(value)} tools: use at most {MAX_TOOLS}", param=where)
    tools, seen = [], set()
    for i, t in enumerate(value):
        at = f"{where}[{i}]"
        if not isinstance(t, dict):
            raise ToolError(f"{at} must be an object such as {{\"type\": \"function\", \"function\": {{\"name\": "
                            "...}}}}, got " + json_kind(t), param=at)
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
        raise ToolError(f"{where} must be a JSON schema object, got {json_kind(schema)}", param=where)
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
    raise ToolError(f"{where} must be a string or an object, got {json_kind(value)}", param=where)


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
