"""Constrained decoding: an :class:`AnswerFormat` lowered to llguidance, and a per-request :class:`Guide` that
masks the logits before sampling.

Why llguidance (``benchmarks/constrain_overhead.py`` measures it against xgrammar and outlines-core): it has
no dependency (xgrammar requires torch and transformers — PyPI has no CUDA torch for Jetson, and the device
runs onnxruntime/TensorRT, not torch), a manylinux aarch64 wheel, reads a tokenizer.json directly, compiles a
schema in milliseconds (outlines-core builds a regex index over the whole vocabulary per schema: seconds with
a 152k vocabulary), and its grammars have what :mod:`edgekit.runtime.answer_format` needs: inline JSON
schemas, special-token references and and/not terminals.

The library is imported only when a request carries a format (``FormatUnavailable`` names the extra to
install when it is missing); ``edgekit.runtime`` without a format never imports it.

What the guide does during one generation (the loop in ``generate.py`` calls :meth:`Guide.mask` before
each sample and :meth:`Guide.advance` after it):
- phase "think": a reasoning model's thought is free (only end-of-sequence is masked, so the thought must
  close); when the splitter leaves the thought (the model's ``</think>`` or the thinking budget's forced
  close) the grammar starts, allowing the blank line R1 writes after the tag.
- phase "detect": a reasoning model whose prompt did not open the thought (the real 7B GGUF's template):
  the first token may open it (``<think>``) or start the answer under the grammar.
- phase "answer": every token is masked to what the grammar allows; once the grammar cannot go on, only
  end-of-sequence may follow, and the loop ends with finish "stop".
"""

from __future__ import annotations

import json
import re
import threading
import weakref
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import numpy as np

from ..errors import FormatError, FormatUnavailable, GenerationError
from .answer_format import AnswerFormat, Choice, Json, Literal, Part, Repeat, Seq, Text, json_type
from .reasoning import CLOSE, OPEN

INSTALL = "pip install 'edgekit[structured]'"
# JSON with fixed separators and no free whitespace: a small model allowed free whitespace can write spaces
# and newlines until max_tokens; ", " and ": " are what models (and Python's json.dumps) write anyway.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
# After a thought R1 writes a blank line before the answer; the splitter drops it from ``answer``.
AFTER_THOUGHT = '/[ \\n]{0,2}/'
ANY_TEXT = "/(?s:.*)/"
CACHE_GRAMMARS = 16


def _library():
    try:
        import llguidance
    except ImportError:
        raise FormatUnavailable(
            "structured output (answer_format, response_format, format) needs the llguidance package, which is "
            f"not installed: {INSTALL}") from None
    return llguidance


# ----- lowering: AnswerFormat -> llguidance's Lark dialect ---------------------------------------------------
class _Lowering:
    def __init__(self, field: str, specials: Mapping[str, int]):
        self.field = field
        self.rules: list[str] = []
        self.count = 0
        self.specials = specials          # text of a token the library keeps apart from text -> its id
        self.split = re.compile("(" + "|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True))
                                + ")") if specials else None

    def bad(self, what: str) -> FormatError:
        return FormatError(f"invalid {self.field}: {what}", field=self.field)

    def name(self, prefix: str) -> str:
        self.count += 1
        return f"{prefix}{self.count}"

    def rule(self, body: str) -> str:
        name = self.name("r")
        self.rules.append(f"{name}: {body}")
        return name

    def terminal(self, body: str) -> str:
        name = self.name("T")
        self.rules.append(f"{name}: {body}")
        return name

    def lower(self, part: Part) -> str:
        if isinstance(part, Json):
            return self.json(part.schema)
        if isinstance(part, Literal):
            return self.literal(part.text)
        if isinstance(part, Text):
            return self.terminal(self.text_expr(part))
        if isinstance(part, Seq):
            return self.seq(part.parts)
        if isinstance(part, Choice):
            if not part.parts:
                raise self.bad("a Choice needs at least one part")
            return self.rule(" | ".join(self.lower(p) for p in part.parts))
        if isinstance(part, Repeat):
            lo, hi = part.min, part.max
            if not isinstance(lo, int) or isinstance(lo, bool) or lo < 0 or (
                    hi is not None and (not isinstance(hi, int) or isinstance(hi, bool) or hi < max(lo, 1))):
                raise self.bad(f"Repeat bounds min={lo!r} max={hi!r}: use whole numbers 0 <= min <= max, max >= 1")
            inner = self.lower(part.part)
            return self.rule(f"{inner}{{{lo},{'' if hi is None else hi}}}")
        raise self.bad(f"{type(part).__name__} is not a part of an answer format: use Json, Literal, Text, Seq, "
                       "Choice or Repeat")

    def json(self, schema: Any) -> str:
        if schema is None:
            schema = {"type": "object"}   # OpenAI's json_object: any JSON object
        if not isinstance(schema, Mapping):
            raise self.bad(f"a JSON schema must be an object, got {json_type(schema)}")
        schema = dict(schema)
        own = schema.get("x-guidance")
        schema["x-guidance"] = {**JSON_OPTIONS, **(own if isinstance(own, Mapping) else {})}
        try:
            text = json.dumps(schema, ensure_ascii=False, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise self.bad(f"the JSON schema is not plain JSON ({e})") from None
        return self.rule(f"%json {text}")

    def segments(self, text: str) -> list[str]:
        """Lark items for literal text: quoted strings, and ``<[id]>`` for special tokens within it."""
        if not isinstance(text, str) or not text:
            raise self.bad(f"a Literal needs non-empty text, got {text!r}")
        pieces = self.split.split(text) if self.split else [text]
        return [f"<[{self.specials[p]}]>" if p in self.specials else _quote(p) for p in pieces if p]

    def literal(self, text: str) -> str:
        return self.rule(" ".join(self.segments(text)))

    def text_expr(self, part: Text) -> str:
        stops = part.stop
        if isinstance(stops, str) or not all(isinstance(s, str) and s for s in stops):
            raise self.bad(f"Text stop must be a tuple of non-empty strings, got {stops!r}")
        if not stops:
            return ANY_TEXT
        return f"({ANY_TEXT} & ~({ANY_TEXT} ({' | '.join(_quote(s) for s in stops)}) {ANY_TEXT}))"

    def seq(self, parts: tuple[Part, ...]) -> str:
        if not parts:
            raise self.bad("a Seq needs at least one part")
        items, i = [], 0
        while i < len(parts):
            part = parts[i]
            nxt = parts[i + 1] if i + 1 < len(parts) else None
            if isinstance(part, Text) and isinstance(nxt, Literal):
                # The library's lexer is greedy: a text terminal that may hold "<tool_call" would take it and
                # then fail on ">". Text and the literal's leading text as ONE terminal end exactly there.
                segs = self.segments(nxt.text)
                if segs[0].startswith('"'):
                    items.append(self.terminal(f"{self.text_expr(part)} {segs[0]}"))
                    items.extend(segs[1:])
                    i += 2
                    continue
            items.append(self.lower(part))
            i += 1
        return self.rule(" ".join(items))


def _quote(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def lark(fmt: AnswerFormat, specials: Mapping[str, int] | None = None, *, after_thought: bool = False) -> str:
    """The llguidance grammar for ``fmt`` (``specials``: text -> id of special tokens a Literal may hold)."""
    if not isinstance(fmt, AnswerFormat):
        raise FormatError(f"answer_format must be an AnswerFormat (edgekit.runtime.answer_format), got "
                          f"{type(fmt).__name__}: use json_answer(schema) or AnswerFormat(grammar)",
                          field="answer_format")
    low = _Lowering(fmt.name, specials or {})
    top = low.lower(fmt.grammar)
    start = f"start: {AFTER_THOUGHT} {top}" if after_thought else f"start: {top}"
    return "\n".join([start, *low.rules]) + "\n"


# ----- the library's tokenizer and compiled grammars, cached per codec ---------------------------------------
class _Vocabulary:
    """llguidance's view of one codec's tokenizer (built once: ~0.3 s for 49k tokens, ~1 s for 152k)."""

    def __init__(self, codec, vocab: int, eos_ids: frozenset[int]):
        llg = _library()
        size = codec.tokenizer.get_vocab_size(with_added_tokens=True)
        if size > vocab:
            raise FormatUnavailable(f"the tokenizer has {size} tokens but the model only {vocab} logits: "
                                    "structured output cannot map it; rebuild the bundle")
        try:
            self.tok = llg.LLTokenizer(codec.tokenizer.to_str(), n_vocab=vocab, eos_token=sorted(eos_ids) or None)
        except Exception as e:   # the library's own message: which token or part it cannot map
            raise FormatUnavailable(f"the constraint library cannot map this bundle's tokenizer "
                                    f"({str(e).splitlines()[0][:200]}): structured output is not available "
                                    "for this model; send the request without a format, or use a bundle with a "
                                    "byte-level BPE or sentencepiece tokenizer") from None
        self.size = self.tok.vocab_size
        self.vocab = vocab
        self.specials = {t.content: i for i, t in codec.tokenizer.get_added_tokens_decoder().items()
                         if i < self.size and self.tok.is_special_token(i)}
        think = codec.tokenizer.token_to_id(OPEN)
        self.think_id = think if think is not None and codec.tokenizer.token_to_id(CLOSE) is not None else None
        self.grammars: OrderedDict[str, Any] = OrderedDict()   # lark text -> a fresh matcher to copy

    def matcher(self, fmt: AnswerFormat, *, after_thought: bool):
        llg = _library()
        text = lark(fmt, self.specials, after_thought=after_thought)
        with _lock:
            template = self.grammars.get(text)
            if template is not None:
                self.grammars.move_to_end(text)
                return template.deep_copy()
        template = llg.LLMatcher(self.tok, llg.LLMatcher.grammar_from_lark(text), log_level=0)
        if template.is_error():
            raise FormatError(f"invalid {fmt.name}: {_first_line(template.get_error())}: fix it (supported: JSON "
                              "Schema types, properties, required, enum, const, items, min/max bounds, anyOf, "
                              "$ref to $defs, pattern, format)", field=fmt.name)
        with _lock:
            self.grammars[text] = template
            while len(self.grammars) > CACHE_GRAMMARS:
                self.grammars.popitem(last=False)
        return template.deep_copy()


def _first_line(message: str) -> str:
    """The library's message on one line, without the position in edgekit's generated grammar."""
    text = " ".join(message.split()) or "rejected by the constraint library"
    text = re.sub(r"^at \d+\(\d+\): ", "", text)
    return text if len(text) <= 300 else text[:297] + "..."


_lock = threading.Lock()
_vocabularies: weakref.WeakKeyDictionary[Any, dict] = weakref.WeakKeyDictionary()


def vocabulary(codec, vocab: int, eos_ids) -> _Vocabulary:
    key = (vocab, frozenset(eos_ids))
    with _lock:
        cached = _vocabularies.setdefault(codec, {}).get(key)
    if cached is None:
        cached = _Vocabulary(codec, vocab, key[1])
        with _lock:
            _vocabularies[codec][key] = cached
    return cached


def check(fmt: AnswerFormat, codec, vocab: int, eos_ids) -> None:
    """Compile ``fmt`` for this tokenizer now (cached), so that a bad format fails before generation starts."""
    v = vocabulary(codec, vocab, eos_ids)
    v.matcher(fmt, after_thought=False)
    if v.think_id is not None:   # the variant a thought's end switches to, compiled now rather than mid-answer
        v.matcher(fmt, after_thought=True)


# ----- one generation ------------------------------------------------------------------------------------
class Guide:
    """Masks logits to what ``fmt`` allows and follows the sampled tokens (see the module docstring)."""

    def __init__(self, fmt: AnswerFormat, codec, vocab: int, eos_ids, *, in_reasoning: bool):
        self.fmt = fmt
        self.v = vocabulary(codec, vocab, eos_ids)
        self.eos = np.asarray(sorted(eos_ids), dtype=np.int64)
        self.bits = np.zeros((self.v.size + 31) // 32, dtype=np.int32)
        self.tail = ""
        self.matcher = None
        if in_reasoning:
            self.phase = "think"
        elif self.v.think_id is not None:
            self.phase = "detect"
            self.matcher = self.v.matcher(fmt, after_thought=False)
        else:
            self.phase = "answer"
            self.matcher = self.v.matcher(fmt, after_thought=False)

    def mask(self, logits: np.ndarray, in_reasoning: bool) -> np.ndarray:
        """The logits with every token the format does not allow next at -inf (a new array; or ``logits``)."""
        if self.phase == "think":
            if in_reasoning:
                out = logits.astype(np.float32, copy=True)
                out[self.eos] = -np.inf           # the thought must close before the answer can end
                return out
            self._start_answer()
        m = self.matcher
        m.unsafe_compute_mask_ptr(self.bits.ctypes.data, self.bits.nbytes)
        allowed = np.unpackbits(self.bits.view(np.uint8), count=self.v.size, bitorder="little").view(bool)  # (vocab,)
        if self.phase == "detect":
            allowed[self.v.think_id] = True
        if not allowed.any():   # the library's error state: sampling from nothing would pick an arbitrary token
            raise GenerationError(f"the answer format allows no next token ({_first_line(m.get_error())}): "
                                  "report this with the format and the model")
        return np.where(allowed, logits, np.float32(-np.inf))   # ~6x faster than indexing the allowed ids

    def advance(self, token: int, text: str) -> bool:
        """Follow the sampled ``token`` (``text``: what it added to the output). True when the format is done:
        nothing but end-of-sequence may follow."""
        if self.phase == "think":
            self.tail = (self.tail + text)[-256:]
            return False
        if self.phase == "detect":
            if token == self.v.think_id:
                self.phase, self.matcher = "think", None
                return False
            self.phase = "answer"
        self.matcher.consume_token(int(token))
        return self.matcher.is_stopped()

    def _start_answer(self) -> None:
        self.phase = "answer"
        self.matcher = self.v.matcher(self.fmt, after_thought=True)
        # Normally the thought ends on its own </think> token; if a token carried text past the tag, that text
        # is the answer's start and must be held to the grammar too.
        at = self.tail.rfind(CLOSE)
        rest = self.tail[at + len(CLOSE):].lstrip() if at >= 0 else ""
        if rest:
            self.matcher.consume_tokens(self.v.tok.tokenize_str(rest))
        self.tail = ""

    @property
    def complete(self) -> bool:
        """The answer so far is a whole sentence of the format (a cut JSON value never is)."""
        m = self.matcher
        return self.phase == "answer" and m is not None and not m.is_error() and m.is_accepting()
