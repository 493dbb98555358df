"""The generation loop: prefill in chunks, then one token at a time, streaming typed events.

Events carry a ``kind``: "reasoning" and "answer" text deltas (R1's thought and its reply; a model without
reasoning only produces "answer"), and a final "done" whose ``result`` is the GenerationResult.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from ..errors import GenerationError
from .answer_format import AnswerFormat
from .prefix import prefill_bounds
from .prefix import reuse as prefix_reuse
from .reasoning import FORCED_CLOSE, ReasoningSplitter, StopMatcher
from .sampling import Sampler, SamplingParams
from .speculative import SpeculativeDecoder


@dataclass
class GenerationResult:
    text: str                      # everything generated (reasoning, closing tag and answer), minus a stop string
    reasoning: str                 # the thought ("" for a model or template without reasoning)
    answer: str                    # what to show the user
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str             # "stop" (EOS or a stop string), "length", "cancelled"
    ttft_ms: float                 # request start -> first token chosen (tokenize + prefill + one sample)
    decode_tok_s: float            # tokens after the first / time after the first
    total_ms: float
    reasoning_tokens: int = 0
    thinking_budget_hit: bool = False
    cached_tokens: int = 0         # prompt tokens whose KV rows were kept from the previous request (not prefilled)
    format_complete: bool | None = None   # with an answer_format: the answer is a whole sentence of it; else None
    drafted: int = 0               # speculative decoding: tokens drafted and checked by verify steps
    accepted: int = 0              # ... of which the model chose (each one a token without a model call)
    tokens: list[int] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k != "tokens"}
        d["ttft_ms"] = round(self.ttft_ms, 2)
        d["decode_tok_s"] = round(self.decode_tok_s, 2)
        d["total_ms"] = round(self.total_ms, 2)
        d["acceptance_rate"] = round(self.acceptance_rate, 4)
        return d

    @property
    def acceptance_rate(self) -> float:
        """accepted / drafted (0 without speculative decoding)."""
        return self.accepted / self.drafted if self.drafted else 0.0


@dataclass(frozen=True)
class Event:
    kind: str                       # "reasoning" | "answer" | "done"
    text: str = ""
    result: GenerationResult | None = None


@dataclass(frozen=True)
class GenerationRequest:
    prompt_ids: list[int]
    sampling: SamplingParams
    max_new_tokens: int | None = None
    stop: tuple[str, ...] = ()
    thinking_budget: int | None = None
    in_reasoning: bool = False      # the prompt left a <think> open
    ignore_eos: bool = False        # benchmarks: always generate max_new_tokens
    answer_format: AnswerFormat | None = None   # constrain the answer (runtime/constrain.py)


def run(decoder, codec, request: GenerationRequest, *, prefill_chunk: int, eos_ids: set[int],
        cancel: threading.Event | None = None, started: float | None = None, reuse: bool = False,
        speculative=None, drafter=None) -> Iterator[Event]:
    """Generate for one request on ``decoder``. Yields Events, the last one "done".

    The decoder is reset first, or with ``reuse`` keeps the cache rows whose token ids start the prompt and
    prefills only the rest (:mod:`edgekit.runtime.prefix`). ``speculative`` (a Speculation) with ``drafter``
    verifies drafted tokens several per model call (:mod:`edgekit.runtime.speculative`); a constrained answer
    format never drafts."""
    t0 = started if started is not None else time.perf_counter()
    spec_decoder = None
    if speculative is not None and drafter is not None and getattr(request, "answer_format", None) is None:
        decoder = spec_decoder = SpeculativeDecoder(decoder, drafter, speculative)
    max_new = _max_new_tokens(request, decoder.capacity)
    sampler = Sampler(request.sampling, decoder.vocab)
    sampler.observe(request.prompt_ids)
    kept, logits = _prefill(decoder, request.prompt_ids, prefill_chunk, reuse, cancel)
    loop = _DecodeLoop(decoder, codec, request, eos_ids)
    yield from loop.decode(logits, sampler, max_new, cancel)
    if spec_decoder is not None:
        spec_decoder.settle()    # the cache holds the prompt and the tokens stepped, as without speculation
    yield from loop.flush()
    yield Event("done", result=loop.result(t0, kept, spec_decoder))


def _max_new_tokens(request: GenerationRequest, capacity: int) -> int:
    """How many tokens may follow the prompt: the request's limit within the cache left after the prompt."""
    ids = request.prompt_ids
    if not ids:
        raise GenerationError("the prompt is empty: give at least one token of text")
    if len(ids) >= capacity:
        raise GenerationError(
            f"the prompt has {len(ids)} tokens but max_context is {capacity}: shorten it, load with a larger "
            "max_context, or ask for truncation (truncate=True / --truncate)")
    budget_left = capacity - len(ids)
    max_new = budget_left if request.max_new_tokens is None else min(request.max_new_tokens, budget_left)
    if request.max_new_tokens is not None and request.max_new_tokens < 1:
        raise GenerationError(f"max_new_tokens must be at least 1, got {request.max_new_tokens}")
    return max_new


def _prefill(decoder, ids: list[int], prefill_chunk: int, reuse: bool,
             cancel: threading.Event | None) -> tuple[int, np.ndarray | None]:
    """(prompt tokens kept in the cache, logits after the prompt or None when cancelled before the end)."""
    if reuse:
        kept = prefix_reuse(decoder, ids)
    else:
        decoder.reset()
        kept = 0
    prompt = np.asarray(ids, dtype=np.int64)
    logits = None
    bounds = prefill_bounds(kept, len(prompt), prefill_chunk)
    for start, end in zip(bounds, bounds[1:]):
        if cancel is not None and cancel.is_set():
            break
        logits = decoder.step(prompt[start:end])
    return kept, logits


class _DecodeLoop:
    """One token at a time after the prefill: sampling, the text path (detokenizer, stop strings, reasoning
    split), the thinking budget and a constrained answer's guide; what it generated becomes the result."""

    def __init__(self, decoder, codec, request: GenerationRequest, eos_ids: set[int]):
        self.decoder, self.codec, self.request, self.eos_ids = decoder, codec, request, eos_ids
        self.detok = codec.stream(skip_special_tokens=True)
        self.stopper = StopMatcher(list(request.stop))
        self.splitter = ReasoningSplitter(request.in_reasoning)
        self.tokens: list[int] = []
        self.text_parts: list[str] = []
        self.reasoning_tokens, self.budget_hit, self.finish = 0, False, "length"
        self.forced = (codec.encode(FORCED_CLOSE, add_special_tokens=False)
                       if request.thinking_budget is not None else [])
        self.t_first: float | None = None
        self.guide = None
        if request.answer_format is not None:   # imports the constraint library only now
            from .constrain import Guide

            self.guide = Guide(request.answer_format, codec, decoder.vocab, eos_ids,
                               in_reasoning=request.in_reasoning)

    def emit(self, delta: str) -> Iterator[Event]:
        self.text_parts.append(delta)
        for kind, piece in self.splitter.feed(delta):
            yield Event(kind, piece)

    def decode(self, logits, sampler: Sampler, max_new: int, cancel: threading.Event | None) -> Iterator[Event]:
        decoder, request, guide, capacity = self.decoder, self.request, self.guide, self.decoder.capacity
        while len(self.tokens) < max_new:
            if logits is None or (cancel is not None and cancel.is_set()):
                self.finish = "cancelled"
                return
            if guide is not None:
                logits = guide.mask(logits, self.splitter.in_reasoning)
            token = sampler(logits)
            if self.t_first is None:
                self.t_first = time.perf_counter()
            if token in self.eos_ids and (guide is not None or not request.ignore_eos):
                self.finish = "stop"
                return
            self.tokens.append(token)
            sampler.observe((token,))
            safe, stopped = self.stopper.feed(self.detok.push(token))
            yield from self.emit(safe)
            if stopped:
                self.finish = "stop"
                return
            if guide is not None and guide.advance(token, safe):   # the format is complete: only EOS could follow
                self.finish = "stop"
                return
            if self.splitter.in_reasoning:
                self.reasoning_tokens += 1
                if request.thinking_budget is not None and self.reasoning_tokens >= request.thinking_budget \
                        and decoder.position + 1 + len(self.forced) < capacity:
                    logits = yield from self.end_thought(token)
                    continue
            if len(self.tokens) >= max_new or decoder.position >= capacity:   # the cache is full: "length"
                return
            logits = decoder.step(np.asarray([token], dtype=np.int64))

    def end_thought(self, token: int):
        """The thinking budget is spent: end the thought the way R1 does and make the model answer. The forced
        tokens go through the model (so it sees them) and through the text path (so the splitter switches to
        the answer). They take cache rows but are not completion tokens: the cache check stops the answer.
        Returns the logits after them (a generator's return value: ``logits = yield from ...``)."""
        self.decoder.step(np.asarray([token], dtype=np.int64))
        logits = self.decoder.step(np.asarray(self.forced, dtype=np.int64))
        self.budget_hit = True
        forced_text = self.codec.decode(self.forced)
        # A character the budget cut in half is dropped with the thought, not flushed into the answer
        # as U+FFFD by the next token (it would break a constrained JSON answer).
        self.detok = self.codec.stream(skip_special_tokens=True)
        yield from self.emit(forced_text)
        return logits

    def flush(self) -> Iterator[Event]:
        """What the stop matcher held back (unless a stop string ended the text) and the splitter's rest."""
        if self.finish != "stop":
            yield from self.emit(self.stopper.finish())
        for kind, piece in self.splitter.finish():
            yield Event(kind, piece)

    def result(self, t0: float, kept: int, spec_decoder) -> GenerationResult:
        t_end, t_first, n = time.perf_counter(), self.t_first, len(self.tokens)
        decode_s = (t_end - t_first) if t_first is not None else 0.0
        splitter, guide = self.splitter, self.guide
        return GenerationResult(
            text="".join(self.text_parts), reasoning="".join(splitter.reasoning), answer="".join(splitter.answer),
            prompt_tokens=len(self.request.prompt_ids), completion_tokens=n, finish_reason=self.finish,
            ttft_ms=((t_first or t_end) - t0) * 1000,
            decode_tok_s=(n - 1) / decode_s if n > 1 and decode_s > 0 else 0.0,
            total_ms=(t_end - t0) * 1000, reasoning_tokens=self.reasoning_tokens, thinking_budget_hit=self.budget_hit,
            tokens=self.tokens, cached_tokens=kept, format_complete=None if guide is None else guide.complete,
            drafted=spec_decoder.drafted if spec_decoder else 0, accepted=spec_decoder.accepted if spec_decoder else 0)
