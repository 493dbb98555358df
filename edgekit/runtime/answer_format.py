"""What an answer must look like: a small grammar of edgekit's own, independent of the constraint library.

Callers (the Python API's ``answer_format=``, the servers' ``response_format`` / ``format`` / ``tools``) describe
the answer with these parts; :mod:`edgekit.runtime.constrain` lowers them to the chosen constraint library and
masks the logits while decoding. Keeping the description here means a server or tool-call layer never imports
the library, and swapping the library changes one module.

    Json(schema)            one JSON value valid against ``schema`` (None: any JSON object — OpenAI's json_object)
    Literal(text)           exactly this text (may be or contain a special token, e.g. "<｜tool▁call▁begin｜>")
    Text(stop=(...))        free text that does not contain any of ``stop`` (the next part usually starts with one)
    Seq(a, b, ...)          a, then b, ...
    Choice(a, b, ...)       one of them
    Repeat(a, min, max)     a, between min and max times (max None: unbounded)

Semantics during generation (enforced by the runtime, not here):
- A reasoning model (R1) thinks freely: the grammar applies to the answer, after ``</think>``; the thinking
  budget still ends the thought.
- When the grammar is complete, only end-of-sequence may follow (finish_reason "stop").
- If ``max_new_tokens`` or the cache ends the answer first, finish_reason is "length" and the result says the
  format is incomplete: a cut JSON value is never reported as valid.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Json:
    schema: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class Literal:
    text: str


@dataclass(frozen=True)
class Text:
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class Seq:
    parts: tuple[Part, ...]

    def __init__(self, *parts: Part):
        object.__setattr__(self, "parts", tuple(parts))


@dataclass(frozen=True)
class Choice:
    parts: tuple[Part, ...]

    def __init__(self, *parts: Part):
        object.__setattr__(self, "parts", tuple(parts))


@dataclass(frozen=True)
class Repeat:
    part: Part
    min: int = 0
    max: int | None = None


Part = Json | Literal | Text | Seq | Choice | Repeat


@dataclass(frozen=True)
class AnswerFormat:
    """The whole answer's shape. ``name`` appears in errors ("response_format", "tools", ...)."""

    grammar: Part
    name: str = "answer"


def json_answer(schema: Mapping[str, Any] | None = None, *, name: str = "response_format") -> AnswerFormat:
    """An answer that is exactly one JSON value (valid against ``schema``; any JSON object when None)."""
    return AnswerFormat(Json(schema), name=name)


def json_type(value: Any) -> str:
    """The JSON type name of a value, for messages ("got a string"); a non-JSON Python object gives its class name."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, (list, tuple)):
        return "array"
    if isinstance(value, Mapping):
        return "object"
    return type(value).__name__
