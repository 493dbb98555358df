"""Tool-call text formats, and reading calls out of an answer — whole, or delta by delta while it streams.

Two formats:

- Hermes-style (the fallback; Qwen2.5, SmolLM2 and most HF tool templates)::

      <tool_call>
      {"name": "get_weather", "arguments": {"city": "Paris"}}
      </tool_call>

  one block per call, separated by a newline;
- DeepSeek's, the one R1-Distill's chat template renders (its markers are plain text in the R1-Distill-Qwen
  tokenizer, about 14 tokens each, not special tokens)::

      <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather
      ```json
      {"city": "Paris"}
      ```<｜tool▁call▁end｜><｜tool▁calls▁end｜>

The reader is lenient about whitespace (an unconstrained model may not follow the format to the byte) but an
answer only has calls when every call is complete, names a known tool and has a JSON object as arguments;
otherwise the whole answer is content. Arguments are kept as the exact text the model wrote, so streamed
argument deltas join to the same string the non-streamed answer holds.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str                 # the JSON text of the arguments object, as generated

    @property
    def args(self) -> dict:
        return json.loads(self.arguments)

    def openai(self, index: int | None = None) -> dict:
        call = {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}
        return call if index is None else {"index": index, **call}

    def ollama(self, index: int = 0) -> dict:
        return {"id": self.id, "function": {"index": index, "name": self.name, "arguments": self.args}}


def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


@dataclass(frozen=True)
class CallFormat:
    name: str
    trigger: str                   # the text the first call starts with (free text before it stops there)
    block_open: str                # before the first call ("" for Hermes)
    block_close: str               # after the last call
    separator: str                 # between calls
    head: str                      # before a call's arguments; {name} is the tool's name
    tail: str                      # after a call's arguments

    def call_head(self, name: str) -> str:
        return self.head.format(name=json.dumps(name) if self is HERMES else name)

    def render(self, calls: list[ToolCall]) -> str:
        """Calls as the model would have written them (history for templates that do not render calls)."""
        return self.block_open + self.separator.join(
            self.call_head(c.name) + c.arguments + self.tail for c in calls) + self.block_close

    def example(self) -> str:
        return self.render([ToolCall("", "<function name>", "<arguments as a JSON object>")]).replace(
            '"<function name>"', "<function name>")

    def scan(self, text: str) -> tuple[list[Partial], int | None]:
        """Calls in ``text`` (which starts at the trigger) so far, and where the calls ended (None: not yet)."""
        return (_scan_hermes if self is HERMES else _scan_deepseek)(text)


HERMES = CallFormat("hermes", "<tool_call>", "", "", "\n", '<tool_call>\n{{"name": {name}, "arguments": ',
                    "}\n</tool_call>")
DEEPSEEK = CallFormat("deepseek", "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>", "\n",
                      "<｜tool▁call▁begin｜>function<｜tool▁sep｜>{name}\n```json\n", "\n```<｜tool▁call▁end｜>")


@dataclass
class Partial:
    name: str | None               # known once written in full
    arguments: str                 # the arguments' text so far
    complete: bool                 # the call (and its arguments) ended


# ----- scanning -----------------------------------------------------------------------------------------
_WS = " \t\r\n"


def _value_end(text: str, i: int) -> int | None:
    """End index of the JSON object or array starting at ``text[i]``; None while it is unfinished."""
    depth, in_str, esc = 0, False, False
    for j in range(i, len(text)):
        ch = text[j]
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
        elif ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
            if depth == 0:
                return j + 1
    return None


def _skip(text: str, i: int) -> int:
    while i < len(text) and text[i] in _WS:
        i += 1
    return i


def _expect(text: str, i: int, word: str) -> int | None | bool:
    """Index after ``word`` at ``text[i]``; None if the text ends inside it (wait); False if something else."""
    rest = text[i:i + len(word)]
    if rest == word:
        return i + len(word)
    return None if word.startswith(rest) else False


_HERMES_HEAD = re.compile(r'\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*"arguments"\s*:\s*')


def _scan_hermes(text: str) -> tuple[list[Partial], int | None]:
    calls: list[Partial] = []
    i = 0
    while True:
        at = _expect(text, _skip(text, i) if calls else i, "<tool_call>")
        if at is None:   # at the text's end: the calls end here unless another one starts
            return calls, i if calls else None
        if at is False:
            return calls, i if calls else 0
        body = _skip(text, at)
        if body >= len(text):
            calls.append(Partial(None, "", False))
            return calls, None
        if text[body] != "{":
            return calls + [Partial(None, "", False)], i   # not a call: the reader gives up on it
        m = _HERMES_HEAD.match(text, body)
        end = _value_end(text, body)
        name = json.loads(m.group(1)) if m else None
        if m and m.end() < len(text) and text[m.end()] in "{[":
            a_end = _value_end(text, m.end())
            args = text[m.end():a_end if a_end is not None else len(text)]
        else:
            args = ""
        if end is None:
            calls.append(Partial(name, args, False))
            return calls, None
        if not m:   # another key order or spacing: read the whole object
            try:
                obj = json.loads(text[body:end])
            except ValueError:
                return calls + [Partial(None, "", False)], i
            if not isinstance(obj, dict):
                return calls + [Partial(None, "", False)], i
            name, args = obj.get("name"), json.dumps(obj.get("arguments", {}), ensure_ascii=False)
        close = _expect(text, _skip(text, end), "</tool_call>")
        if close is None:
            calls.append(Partial(name, args, False))
            return calls, None
        if close is False:
            return calls + [Partial(name, args, False)], i
        calls.append(Partial(name, args, True))
        i = close


def _scan_deepseek(text: str) -> tuple[list[Partial], int | None]:
    f = DEEPSEEK
    i = _expect(text, 0, f.block_open)
    if not i:
        return [], None if i is None else 0
    calls: list[Partial] = []
    while True:
        j = _skip(text, i) if calls else i
        end = _expect(text, j, f.block_close) if calls else False
        if end is None:   # R1's own template leaves the block unclosed after a single call: accepted
            return calls, j
        if end:
            return calls, end
        at = _expect(text, j, "<｜tool▁call▁begin｜>")
        if at is None:
            return calls, j if calls else None
        if at is False:
            return calls + [Partial(None, "", False)], j
        sep = text.find("<｜tool▁sep｜>", at)
        if sep < 0:
            return calls + [Partial(None, "", False)], None
        nl = text.find("\n", sep)
        if nl < 0:
            return calls + [Partial(None, "", False)], None
        name = text[sep + len("<｜tool▁sep｜>"):nl].strip()
        fence = _expect(text, nl + 1, "```json")
        if not fence:
            return calls + [Partial(name, "", False)], None if fence is None else j
        body = _skip(text, fence)
        if body >= len(text):
            return calls + [Partial(name, "", False)], None
        if text[body] not in "{[":
            return calls + [Partial(name, "", False)], j
        a_end = _value_end(text, body)
        if a_end is None:
            return calls + [Partial(name, text[body:], False)], None
        args = text[body:a_end]
        close = _expect(text, _skip(text, a_end), "```")
        close = _expect(text, _skip(text, close), "<｜tool▁call▁end｜>") if close else close
        if not close:
            return calls + [Partial(name, args, False)], None if close is None else j
        calls.append(Partial(name, args, True))
        i = close


def _valid(p: Partial, names: tuple[str, ...]) -> bool:
    if not p.complete or p.name is None or (names and p.name not in names):
        return False
    try:
        return isinstance(json.loads(p.arguments), dict)
    except ValueError:
        return False


def parse_calls(answer: str, fmt: CallFormat, names: tuple[str, ...] = (),
                ids: list[str] | None = None, *, cut: bool = False) -> tuple[str | None, list[ToolCall]]:
    """(content, calls) of a finished answer. With calls, content is the text before them (None if empty);
    without, the answer unchanged. ``cut``: the answer was cut by max_tokens; the complete calls before the
    cut one count (finish_reason stays "length")."""
    at = answer.find(fmt.trigger)
    if at < 0:
        return answer, []
    partials, end = fmt.scan(answer[at:])
    if cut:   # whatever follows the last complete call was cut (a call, or the block's closing marker)
        partials = [p for p in partials if p.complete]
    elif end is None or answer[at + end:].strip():
        return answer, []
    if not partials or not all(_valid(p, names) for p in partials):
        return answer, []
    ids = list(ids or [])
    calls = [ToolCall(ids[k] if k < len(ids) else new_call_id(), p.name, p.arguments)
             for k, p in enumerate(partials)]
    return answer[:at].rstrip() or None, calls


def _held(text: str, trigger: str) -> int:
    """How many characters at the end of ``text`` to hold back: a possible start of ``trigger``, and
    whitespace (dropped if a call follows, as in the non-streamed content)."""
    n = 0
    for k in range(min(len(trigger) - 1, len(text)), 0, -1):
        if trigger.startswith(text[-k:]):
            n = k
            break
    stripped = text[:len(text) - n]
    return n + (len(stripped) - len(stripped.rstrip()))


class ToolCallParser:
    """Answer deltas in, events out: ("content", text), ("call", index, ToolCall-with-empty-arguments),
    ("arguments", index, text), ("done", index, ToolCall). ``finish()`` flushes and returns (content, calls)."""

    def __init__(self, fmt: CallFormat, names: tuple[str, ...] = (), *, enabled: bool = True):
        self.fmt, self.names, self.enabled = fmt, names, enabled
        self.text = ""
        self.sent_content = 0
        self.ids: list[str] = []
        self.sent_args: list[int] = []
        self.done: list[bool] = []

    def feed(self, delta: str) -> list[tuple]:
        self.text += delta
        if not self.enabled:
            return [("content", delta)] if delta else []
        return self._events(final=False)

    def finish(self, cut: bool = False) -> tuple[list[tuple], str | None, list[ToolCall]]:
        """Flush; ``cut``: the answer was cut by max_tokens (see :func:`parse_calls`)."""
        events = self._events(final=True) if self.enabled else []
        if not self.enabled:
            return events, self.text, []
        content, calls = parse_calls(self.text, self.fmt, self.names, self.ids, cut=cut)
        if not calls and self.sent_content < len(self.text) and not self.ids:
            events.append(("content", self.text[self.sent_content:]))
            self.sent_content = len(self.text)
        return events, content, calls

    def _events(self, final: bool) -> list[tuple]:
        events: list[tuple] = []
        at = self.text.find(self.fmt.trigger)
        if at < 0:
            upto = len(self.text) if final else len(self.text) - _held(self.text, self.fmt.trigger)
        else:
            upto = len(self.text[:at].rstrip())
        if upto > self.sent_content:
            events.append(("content", self.text[self.sent_content:upto]))
            self.sent_content = upto
        if at < 0:
            return events
        partials, _ = self.fmt.scan(self.text[at:])
        for k, p in enumerate(partials):
            if p.name is None or (self.names and p.name not in self.names):
                break
            if k == len(self.ids):
                self.ids.append(new_call_id())
                self.sent_args.append(0)
                self.done.append(False)
                events.append(("call", k, ToolCall(self.ids[k], p.name, "")))
            if len(p.arguments) > self.sent_args[k]:
                events.append(("arguments", k, p.arguments[self.sent_args[k]:]))
                self.sent_args[k] = len(p.arguments)
            if p.complete and not self.done[k]:
                self.done[k] = True
                events.append(("done", k, ToolCall(self.ids[k], p.name, p.arguments)))
        return events
