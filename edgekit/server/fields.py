"""The JSON body and its fields, checked: types and ranges, with messages that name the field and what is valid.

Shared by the OpenAI request parsing (:mod:`edgekit.server.schemas`) and Ollama's
(:mod:`edgekit.server.ollama_request`): a value is refused with a 400 naming the field the client sent.
"""

from __future__ import annotations

import json
import math
from typing import Any

from ..runtime.answer_format import json_type
from .api_errors import ApiError, bad

MAX_STOP = 16                 # OpenAI allows 4; a few more costs nothing here


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
        raise bad(f"the body must be a JSON object, got a JSON {json_type(obj)}", code="invalid_json")
    return obj


def utf8_text(value: str, param: str) -> str:
    # JSON may carry "\ud800" escapes: Python accepts the lone surrogate, the tokenizer would fail on it.
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise bad(f"{param} contains an unpaired UTF-16 surrogate (e.g. \\ud800): send valid Unicode text",
                  param) from None
    return value


def int_field(body: dict, name: str, lo: int, hi: int | None = None, what: str = "") -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if not isinstance(v, int) or isinstance(v, bool):
        raise bad(f"{name} must be a whole number, got {json_type(v)} {show(v)}{what}", name, "invalid_type")
    if v < lo or (hi is not None and v > hi):
        rng = f">= {lo}" if hi is None else f"between {lo} and {hi}"
        raise bad(f"invalid {name} {v}: use a whole number {rng}{what}", name)
    return v


def float_field(body: dict, name: str, lo: float, hi: float, *, lo_open=False, hi_open=False,
                what="") -> float | None:
    v = body.get(name)
    if v is None:
        return None
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        raise bad(f"{name} must be a number, got {json_type(v)} {show(v)}{what}", name, "invalid_type")
    v = float(v)
    below = v <= lo if lo_open else v < lo
    above = v >= hi if hi_open else v > hi
    if not math.isfinite(v) or below or above:
        rng = f"{'(' if lo_open else '['}{lo:g}, {'inf' if hi == math.inf else f'{hi:g}'}{')' if hi_open else ']'}"
        raise bad(f"invalid {name} {v:g}: use a number in {rng}{what}", name)
    return v


def bool_field(body: dict, name: str) -> bool | None:
    v = body.get(name)
    if v is None:
        return None
    if not isinstance(v, bool):
        raise bad(f"{name} must be true or false, got {json_type(v)} {show(v)}", name, "invalid_type")
    return v


def show(v: Any) -> str:
    text = json.dumps(v, ensure_ascii=True) if not isinstance(v, str) else json.dumps(v[:40], ensure_ascii=True)
    return text if len(text) <= 60 else text[:57] + "..."


def stop_field(value: Any) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise bad("stop must be a string or a list of strings", "stop", "invalid_type")
    if len(value) > MAX_STOP:
        raise bad(f"stop has {len(value)} sequences: use at most {MAX_STOP}", "stop")
    return [utf8_text(s, "stop") for s in value if s]
