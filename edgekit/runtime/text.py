"""Tokenizer and chat template: text in, token ids out, and back — incrementally for streaming.

The chat template is rendered the way transformers renders it (a sandboxed jinja2 environment with
``trim_blocks``/``lstrip_blocks``, ``raise_exception`` and ``tojson``), so a bundle produces the same prompt
tokens as the reference. A rendered template already holds its BOS token, so it is encoded without adding
special tokens; a plain prompt gets BOS when the tokenizer asks for it.
"""

from __future__ import annotations

import functools
import json
import re
import sys
import threading
import time
from datetime import datetime
from typing import Any

from ..errors import GenerationError, PromptTooLong

# Limits on one rendering of a bundle's chat template. The template comes with the bundle (it may be broken or
# hostile) and the messages from a client: neither may pin a CPU or exhaust memory. A real chat template
# renders in milliseconds and its output is the prompt, which must fit the context anyway.
RENDER_SECONDS = 5.0
RENDER_MAX_CHARS = 16 * 1024 * 1024


def _raise(message: str):
    raise GenerationError(f"the chat template refused the messages: {message}")


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    if indent is not None and not (isinstance(indent, str) and len(indent) <= 16
                                   or isinstance(indent, int) and 0 <= indent <= 16):
        raise _Limit(f"tojson(indent={str(indent)[:20]}) is not allowed (at most 16)")
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class _Limit(Exception):
    """A rendering limit was hit (time, size of a value or of the output); becomes a GenerationError."""


class _Bounds:
    """The limits of the rendering running on this thread."""

    def __init__(self, seconds: float, max_chars: int):
        self.seconds, self.max_chars = seconds, max_chars
        self.deadline = time.monotonic() + seconds

    def size(self, n: int, what: str) -> None:
        if n > self.max_chars:
            raise _Limit(f"{what} would be {n} long, more than the limit of {self.max_chars}")


_local = threading.local()
_NUMBER = re.compile(r"\d+")


def _bounds() -> _Bounds:
    b = getattr(_local, "bounds", None)
    return b if b is not None else _Bounds(RENDER_SECONDS, RENDER_MAX_CHARS)


def _length(value) -> int | None:
    return len(value) if isinstance(value, (str, bytes, list, tuple, dict, set)) else None


def _check_format(text, b: _Bounds) -> None:
    """A width or precision in a format string ('%999999999s', '{:>999999999}') builds that many characters."""
    if isinstance(text, str):
        for m in _NUMBER.finditer(text):
            if len(m.group()) > 9 or int(m.group()) > b.max_chars:
                raise _Limit(f"the format width {m.group()[:20]} is larger than the output limit")


def _make_environment():
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class BoundedEnvironment(ImmutableSandboxedEnvironment):
        """The sandbox (no attribute escapes, ranges of at most 100,000) plus limits on time and size.

        Time: every line the compiled template runs is checked against the deadline (a trace function on
        the template's own frames only), so loops over anything, recursion and slow filters in a loop stop.
        Size: operations that build large values from small inputs are checked before they run
        (``*``, ``**``, ``+``, ``%``, ``~``, join, replace, format widths, large int arguments), and every
        call's result and the output are checked against the limit.
        """

        intercepted_binops = frozenset(["*", "**", "+", "%"])

        def call_binop(self, context, operator, left, right):
            b = _bounds()
            if operator == "+" and type(left) is str and type(right) is str:   # the common case, made cheap
                if len(left) + len(right) > b.max_chars:
                    b.size(len(left) + len(right), "a sum of values")
                return left + right
            if operator == "*":
                for seq, n in ((left, right), (right, left)):
                    if _length(seq) is not None and isinstance(n, int):
                        b.size(_length(seq) * n, "a repeated value")
                if isinstance(left, int) and isinstance(right, int):
                    _int_bits(left.bit_length() + right.bit_length())
            elif operator == "**":
                if isinstance(left, int) and isinstance(right, (int, float)) and abs(left) > 1:
                    _int_bits(abs(right) * left.bit_length())
            elif operator == "+":
                if _length(left) is not None and _length(right) is not None:
                    b.size(_length(left) + _length(right), "a sum of values")
            elif operator == "%":
                _check_format(left, b)
            return super().call_binop(context, operator, left, right)

        def call(__self, __context, __obj, *args, **kwargs):
            _check_call(__obj, args, kwargs)
            result = ImmutableSandboxedEnvironment.call(__self, __context, __obj, *args, **kwargs)
            n = _length(result)
            if n is not None:
                _bounds().size(n, "a value")
            return result

    return BoundedEnvironment


def _int_bits(bits) -> None:
    # A template has no use for huge numbers, and multiplying them is C code that no deadline interrupts.
    if bits > _MAX_INT_BITS:
        raise _Limit(f"a number of {int(bits)} bits is not allowed (at most {_MAX_INT_BITS})")


_MAX_INT_BITS = 64 * 1024


def _guarded(function):
    """A filter with the checks of a sandboxed call: jinja calls filters directly, not through ``call``."""
    @functools.wraps(function)   # keeps jinja_pass_arg (pass_context, pass_eval_context)
    def filter_(*args, **kwargs):
        _check_call(function, args, kwargs)
        result = function(*args, **kwargs)
        n = _length(result)
        if n is not None:
            _bounds().size(n, "a value")
        return result
    return filter_


def _check_call(func, args, kwargs) -> None:
    """The checks before a call from the template (a function, a method or a filter) runs."""
    b = _bounds()
    for v in (*args, *kwargs.values()):
        if isinstance(v, int) and not isinstance(v, bool) and abs(v) > b.max_chars:
            raise _Limit(f"the argument {str(v)[:20]} is larger than the output limit")
        if isinstance(v, (list, tuple)) and sum(len(x) for x in v if isinstance(x, str)) > b.max_chars:
            raise _Limit("a list of strings longer than the output limit")
    name = getattr(func, "__name__", "")
    if name in ("format", "format_map"):   # str.format, wrapped by the sandbox (the string is __self__)
        _check_format(getattr(getattr(func, "__wrapped__", func), "__self__", None), b)
    elif name == "do_format":              # the format filter: '%s'|format(...)
        _check_format(args[0] if args else None, b)
    if name in ("replace", "do_replace"):
        # (s.replace(old, new) or s|replace(old, new)): the result can be len(s) * len(new) long
        text = getattr(func, "__self__", None) if name == "replace" else (args[1] if len(args) > 1 else None)
        rest = args if name == "replace" else args[2:]
        if isinstance(text, str) and len(rest) >= 2 and isinstance(rest[0], str) and isinstance(rest[1], str):
            count = len(text) + 1 if rest[0] == "" else text.count(rest[0])
            b.size(len(text) + count * len(rest[1]), "a replaced string")


def _checked_join(original):
    """The template's ``~`` (str_join/markup_join), checking the result's length before building it."""
    def join(seq):
        parts = list(seq)
        b = _bounds()
        b.size(sum(len(p) if isinstance(p, str) else len(str(p)) for p in parts), "a joined string")
        return original(parts)
    return join


def _tracer(b: _Bounds):
    """sys.settrace function: a deadline check on every line of the compiled template's frames (only)."""
    deadline, clock = b.deadline, time.monotonic

    def line(frame, event, arg):
        if event == "line" and clock() > deadline:
            raise _Limit(f"it ran longer than {b.seconds:g}s")
        return line

    def call(frame, event, arg):
        return line if frame.f_code.co_filename == "<template>" else None
    return call


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return type(e).__name__ + (f": {text[:200]}" if text else "")


class TextCodec:
    def __init__(self, tokenizer_json: str, chat_template: str | None, special: dict[str, Any]):
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_str(tokenizer_json)
        self.special = special
        self.bos_token = special.get("bos_token")
        self.eos_token = special.get("eos_token")
        self.add_bos = bool(special.get("add_bos_token", False))
        self.bos_id = special.get("bos_token_id")
        self.eos_ids = set(special.get("eos_token_ids") or [])
        self.render_seconds = RENDER_SECONDS
        self.render_max_chars = RENDER_MAX_CHARS
        self._max_token_chars: int | None = None
        self._template = None
        if chat_template:
            from jinja2.exceptions import TemplateError

            env = _make_environment()(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
            env.filters["tojson"] = _tojson
            env.filters = {name: _guarded(f) for name, f in env.filters.items()}
            env.globals["raise_exception"] = _raise
            env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
            try:
                self._template = env.from_string(chat_template)
            except (TemplateError, RecursionError, MemoryError, ValueError) as e:
                raise GenerationError(f"the bundle's chat template does not parse ({_one_line(e)}): rebuild the "
                                      "bundle") from None
            names = self._template.root_render_func.__globals__   # the compiled template module's namespace
            for join in ("str_join", "markup_join"):
                if join in names:
                    names[join] = _checked_join(names[join])

    @property
    def has_chat_template(self) -> bool:
        return self._template is not None

    @property
    def max_token_chars(self) -> int:
        """An upper bound on the characters one token stands for: a text of N characters has at least
        N / max_token_chars tokens. From the vocabulary (byte-level and sentencepiece pieces carry one character
        per byte or symbol), times 4 when a normalizer could merge characters (NFC composes up to 3 into 1)."""
        if self._max_token_chars is None:
            vocab = self.tokenizer.get_vocab(with_added_tokens=True)
            longest = max((len(t) for t in vocab), default=1)
            self._max_token_chars = max(1, longest) * (4 if self.tokenizer.normalizer is not None else 1)
        return self._max_token_chars

    def render(self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True,
               max_chars: int | None = None, **extra) -> str:
        """The chat template applied to ``messages``. Bounded: at most ``render_seconds`` and ``max_chars``
        characters of output (default ``render_max_chars``; PromptTooLong beyond it, stopped as soon as it is
        passed); any failure of the template is a one-line GenerationError."""
        if self._template is None:
            raise GenerationError("this bundle has no chat template: pass a plain prompt instead of messages")
        _check_messages(messages)
        from jinja2.exceptions import TemplateError

        limit = self.render_max_chars if max_chars is None else min(max_chars, self.render_max_chars)
        # values inside the template are held to the codec's limit; only the output to ``max_chars``
        b = _Bounds(self.render_seconds, self.render_max_chars)
        parts, size = [], 0
        before, _local.bounds = getattr(_local, "bounds", None), b
        previous_trace = sys.gettrace()
        sys.settrace(_tracer(b))
        chunks = self._template.generate(messages=messages, add_generation_prompt=add_generation_prompt,
                                         bos_token=self.bos_token or "", eos_token=self.eos_token or "", **extra)
        try:
            for chunk in chunks:
                size += len(chunk)
                if size > limit:
                    raise PromptTooLong(f"the rendered prompt has more than {limit} characters", limit=limit)
                parts.append(chunk)
        except GenerationError:
            raise
        except _Limit as e:
            raise GenerationError(f"the bundle's chat template was stopped on these messages: {e}; fix or replace "
                                  "the bundle's chat_template.jinja") from None
        except TemplateError as e:
            raise GenerationError(f"the chat template failed on these messages ({_one_line(e)})") from None
        except Exception as e:  # a template can raise anything (1/0, bad types, recursion): the messages' problem
            raise GenerationError(f"the chat template failed on these messages ({_one_line(e)})") from None
        finally:
            chunks.close()
            sys.settrace(previous_trace)
            _local.bounds = before
        return "".join(parts)

    def encode(self, text: str, *, add_special_tokens: bool) -> list[int]:
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        if add_special_tokens and self.add_bos and self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids = [int(self.bos_id), *ids]
        return ids

    def decode(self, ids: list[int], *, skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def stream(self, *, skip_special_tokens: bool = True) -> DeltaDecoder:
        return DeltaDecoder(self.tokenizer, skip_special_tokens)


class DeltaDecoder:
    """Token ids in, text deltas out; never splits a UTF-8 character (a partial one waits for the next token)."""

    def __init__(self, tokenizer, skip_special_tokens: bool):
        from tokenizers.decoders import DecodeStream

        self.tokenizer = tokenizer
        self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)

    def push(self, token_id: int) -> str:
        return self._stream.step(self.tokenizer, int(token_id)) or ""


def _check_messages(messages) -> None:
    if not isinstance(messages, list) or not messages:
        raise GenerationError("messages must be a non-empty list of {'role': ..., 'content': ...} objects")
    for m in messages:
        # an assistant turn that only calls tools has content None (what R1's template tests for)
        call_only = isinstance(m, dict) and m.get("content") is None and bool(m.get("tool_calls"))
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not (
                isinstance(m.get("content"), str) or call_only):
            raise GenerationError("each message must be an object with string 'role' and 'content', "
                                  f"got {str(m)[:80]!r}")
        if m["role"] not in ("system", "user", "assistant", "tool"):
            raise GenerationError(f"unknown message role {m['role']!r}: use system, user, assistant or tool")
