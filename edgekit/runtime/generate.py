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
    ids = request.prompt_ids
    capacity = decoder.capacity
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

    sampler = Sampler(request.sampling, decoder.vocab)
    sampler.observe(ids)
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

    detok = codec.stream(skip_special_tokens=True)
    stopper = StopMatcher(list(request.stop))
    splitter = ReasoningSplitter(request.in_reasoning)
    tokens: list[int] = []
    text_parts: list[str] = []
    reasoning_tokens, budget_hit, finish = 0, False, "length"
    forced = codec.encode(FORCED_CLOSE, add_special_tokens=False) if request.thinking_budget is not None else []
    t_first = None
    guide = None
    if request.answer_format is not None:   # imports the constraint library only now
        from .constrain import Guide

        guide = Guide(request.answer_format, codec, decoder.vocab, eos_ids, in_reasoning=request.in_reasoning)

    def emit(delta: str) -> Iterator[Event]:
        for kind, piece in splitter.feed(delta):
            yield Event(kind, piece)

    while len(tokens) < max_new:
        if logits is None or (cancel is not None and cancel.is_set()):
            finish = "cancelled"
            break
        if guide is not None:
            logits = guide.mask(logits, splitter.in_reasoning)
        token = sampler(logits)
        if t_first is None:
            t_first = time.perf_counter()
        if token in eos_ids and (guide is not None or not request.ignore_eos):
            finish = "stop"
            break
        tokens.append(token)
        sampler.observe((token,))
        safe, stopped = stopper.feed(detok.push(token))
        text_parts.append(safe)
        yield from emit(safe)
        if stopped:
            finish = "stop"
            break
        if guide is not None and guide.advance(token, safe):   # the format is complete: only EOS could follow
            finish = "stop"
            break
        if splitter.in_reasoning:
            reasoning_tokens += 1
            if request.thinking_budget is not None and reasoning_tokens >= request.thinking_budget \
                    and decoder.position + 1 + len(forced) < capacity:
                # End the thought the way R1 does and make the model answer. The forced tokens go through the
                # model (so it sees them) and through the text path (so the splitter switches to the answer).
                # They take cache rows but are not completion tokens: the cache check below stops the answer.
                decoder.step(np.asarray([token], dtype=np.int64))
                logits = decoder.step(np.asarray(forced, dtype=np.int64))
                budget_hit = True
                forced_text = codec.decode(forced)
                # A character the budget cut in half is dropped with the thought, not flushed into the answer
                # as U+FFFD by the next token (it would break a constrained JSON answer).
                detok = codec.stream(skip_special_tokens=True)
                text_parts.append(forced_text)
                yield from emit(forced_text)
                continue
        if len(tokens) >= max_new or decoder.position >= capacity:   # the cache is full: "length"
            break
        logits = decoder.step(np.asarray([token], dtype=np.int64))

    if spec_decoder is not None:
        spec_decoder.settle()    # the cache holds the prompt and the tokens stepped, as without speculation
    if finish != "stop":
        tail = stopper.finish()
        text_parts.append(tail)
        yield from emit(tail)
    for kind, piece in splitter.finish():
        yield Event(kind, piece)
    t_end = time.perf_counter()
    n = len(tokens)
    decode_s = (t_end - t_first) if t_first is not None else 0.0
    result = GenerationResult(
        text="".join(text_parts), reasoning="".join(splitter.reasoning), answer="".join(splitter.answer),
        prompt_tokens=len(ids), completion_tokens=n, finish_reason=finish,
        ttft_ms=((t_first or t_end) - t0) * 1000, decode_tok_s=(n - 1) / decode_s if n > 1 and decode_s > 0 else 0.0,
        total_ms=(t_end - t0) * 1000, reasoning_tokens=reasoning_tokens, thinking_budget_hit=budget_hit,
        tokens=tokens, cached_tokens=kept, format_complete=None if guide is None else guide.complete,
        drafted=spec_decoder.drafted if spec_decoder else 0, accepted=spec_decoder.accepted if spec_decoder else 0)
    yield Event("done", result=result)
