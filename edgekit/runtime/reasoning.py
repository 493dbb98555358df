"""R1 reasoning: split generated text into ``reasoning`` and ``answer`` as it streams.

The current R1-Distill chat templates end the prompt with ``<think>\\n``, so the model's output holds only
the closing ``</think>``; the template inside the published R1-Distill-Qwen-7B Q4_K_M GGUF ends with the
assistant tag instead, and the model opens the thought itself. Parsers that wait for an opening tag in the
output see no reasoning at all in the first case, and ones that do not know the tag show the whole thought
as the answer. The splitter starts in reasoning mode when the prompt left a ``<think>`` open, also accepts
an opening tag at the very start of the output, and holds back a possible partial tag at the end of a
delta so that a tag split over two tokens is still recognised.
"""

from __future__ import annotations

OPEN, CLOSE = "<think>", "</think>"
# What a thinking budget injects to end the thought: the shape R1 itself uses.
FORCED_CLOSE = "\n</think>\n\n"


def prompt_opens_thinking(prompt: str) -> bool:
    """True when the rendered prompt ends inside an unclosed <think> (the R1 templates' generation prompt)."""
    return prompt.rfind(OPEN) > prompt.rfind(CLOSE)


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``tag``."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


class ReasoningSplitter:
    """Feed text deltas; get ``[(kind, text)]`` back with kind "reasoning" or "answer"."""

    def __init__(self, in_reasoning: bool):
        self.mode = "reasoning" if in_reasoning else "detect"
        self.buf = ""
        self.reasoning: list[str] = []
        self.answer: list[str] = []
        self.saw_reasoning = in_reasoning

    def feed(self, delta: str) -> list[tuple[str, str]]:
        self.buf += delta
        events: list[tuple[str, str]] = []
        while True:
            if self.mode == "detect":
                stripped = self.buf.lstrip()
                if stripped.startswith(OPEN):
                    self.buf, self.mode, self.saw_reasoning = stripped[len(OPEN):], "reasoning", True
                    continue
                if stripped and not OPEN.startswith(stripped):
                    self.mode = "answer"
                    continue
                return events
            if self.mode == "reasoning":
                at = self.buf.find(CLOSE)
                if at < 0:
                    keep = _partial_suffix(self.buf, CLOSE)
                    self._emit(events, "reasoning", self.buf[:len(self.buf) - keep])
                    self.buf = self.buf[len(self.buf) - keep:]
                    return events
                self._emit(events, "reasoning", self.buf[:at])
                self.buf, self.mode = self.buf[at + len(CLOSE):], "answer_start"
                continue
            if self.mode == "answer_start":  # drop the blank line(s) R1 puts after </think>
                self.buf = self.buf.lstrip()
                if not self.buf:
                    return events
                self.mode = "answer"
                continue
            self._emit(events, "answer", self.buf)
            self.buf = ""
            return events

    def finish(self) -> list[tuple[str, str]]:
        """Flush what was held back (the output ended)."""
        events: list[tuple[str, str]] = []
        if self.mode == "reasoning":
            self._emit(events, "reasoning", self.buf)
        elif self.mode == "detect":  # whitespace or a partial "<think" and then the end: it was the answer
            self._emit(events, "answer", self.buf.lstrip())
        self.buf = ""
        return events

    def _emit(self, events, kind: str, text: str) -> None:
        if text:
            (self.reasoning if kind == "reasoning" else self.answer).append(text)
            events.append((kind, text))

    @property
    def in_reasoning(self) -> bool:
        return self.mode == "reasoning"


class StopMatcher:
    """Finds stop strings in streamed text, holding back what could be the start of one."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.buf = ""

    def feed(self, delta: str) -> tuple[str, bool]:
        """Returns (text safe to emit, stopped)."""
        self.buf += delta
        if not self.stops:
            out, self.buf = self.buf, ""
            return out, False
        hits = [i for i in (self.buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.buf = self.buf[:min(hits)], ""
            return out, True
        keep = max(_partial_suffix(self.buf, s) for s in self.stops)
        out, self.buf = self.buf[:len(self.buf) - keep], self.buf[len(self.buf) - keep:]
        return out, False

    def finish(self) -> str:
        out, self.buf = self.buf, ""
        return out
