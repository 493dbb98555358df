"""``edgekit bench``: time to first token, decode speed and peak memory over prompt x generation lengths."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import UserInputError
from .generate import GenerationRequest, run
from .sampling import SamplingParams

_FILLER = ("The robot checked the kitchen lights, the door sensors and the thermostat, then wrote a short report "
           "about what it had seen and what it planned to do next. ")


def _status_mib(key: str) -> float:
    """A memory line of /proc/self/status (``VmHWM``, ``VmRSS``) in MiB; 0 where /proc is absent."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def peak_rss_mib() -> float:
    """Peak resident memory of this process."""
    return _status_mib("VmHWM")


def rss_mib() -> float:
    return _status_mib("VmRSS")


def prompt_of(model, n: int) -> list[int]:
    """Exactly ``n`` prompt tokens of ordinary text."""
    ids = model.codec.encode(_FILLER, add_special_tokens=False)
    return (ids * (n // max(len(ids), 1) + 1))[:n]


@dataclass(frozen=True)
class BenchCase:
    prompt_tokens: int
    new_tokens: int
    runs: int
    ttft_ms: float
    ttft_ms_spread: float      # (max - min) over the runs
    decode_tok_s: float
    decode_tok_s_spread: float
    generated: int             # tokens actually generated in the median run (EOS may stop early without ignore_eos)
    peak_rss_mib: float
    drafted: int = 0           # speculative decoding, summed over the runs
    accepted: int = 0
    acceptance_rate: float = 0.0

    def to_dict(self) -> dict:
        return {k: (round(v, 2) if isinstance(v, float) else v) for k, v in self.__dict__.items()}


def bench(model, prompt_lengths: list[int], new_tokens: int, runs: int = 3, *, ignore_eos: bool = True,
          warmup: bool = True) -> list[BenchCase]:
    """Greedy generation for each prompt length; medians over ``runs``."""
    cases = []
    if warmup:
        _once(model, prompt_of(model, min(8, model.max_context - 2)), 2, True)
    for n in prompt_lengths:
        if n + new_tokens > model.max_context:
            raise UserInputError(f"{n} prompt + {new_tokens} new tokens exceed max_context {model.max_context}: "
                                 "use shorter --prompt-tokens/--new-tokens or a bundle with a longer context")
        results = [_once(model, prompt_of(model, n), new_tokens, ignore_eos) for _ in range(runs)]
        ttft = [r.ttft_ms for r in results]
        tps = [r.decode_tok_s for r in results]
        drafted, accepted = sum(r.drafted for r in results), sum(r.accepted for r in results)
        cases.append(BenchCase(n, new_tokens, runs, statistics.median(ttft), max(ttft) - min(ttft),
                               statistics.median(tps), max(tps) - min(tps),
                               int(statistics.median(r.completion_tokens for r in results)), peak_rss_mib(),
                               drafted, accepted, accepted / drafted if drafted else 0.0))
    return cases


@dataclass(frozen=True)
class SharedPrefixCase:
    prefix_tokens: int
    first_prompt_tokens: int
    second_prompt_tokens: int
    runs: int
    first_ttft_ms: float       # medians over the runs; the first request starts from an empty cache
    second_ttft_ms: float      # the same prefix, another question: only the differing tokens are prefilled
    cached_tokens: int         # prompt tokens the second request kept from the first
    ratio: float               # second_ttft_ms / first_ttft_ms

    def to_dict(self) -> dict:
        return {k: (round(v, 4 if k == "ratio" else 2) if isinstance(v, float) else v)
                for k, v in self.__dict__.items()}


_QUESTIONS = ("Question: which lights are on in the kitchen right now?",
              "Question: is the front door locked, and what is the thermostat set to?")


def shared_prefix(model, prefix_tokens: int, new_tokens: int, runs: int = 3, *,
                  warmup: bool = True) -> SharedPrefixCase:
    """Two requests sharing a ``prefix_tokens`` prefix (a long system prompt) with different questions after it:
    the first from an empty cache, the second reusing the first's KV rows (prefix reuse). Medians over ``runs``."""
    prefix = prompt_of(model, prefix_tokens)
    first_ids, second_ids = (prefix + model.codec.encode(q, add_special_tokens=False) for q in _QUESTIONS)
    if max(len(first_ids), len(second_ids)) + new_tokens > model.max_context:
        raise UserInputError(f"--shared-prefix {prefix_tokens} + a question + {new_tokens} new tokens exceed "
                             f"max_context {model.max_context}: use a shorter --shared-prefix/--new-tokens or a "
                             "bundle with a longer context")
    if warmup:
        _once(model, prompt_of(model, min(8, model.max_context - 2)), 2, True)
    firsts, seconds = [], []
    for _ in range(runs):
        model.decoder.reset()   # the first request pays the whole prompt
        firsts.append(_once(model, first_ids, new_tokens, True, reuse=True))
        seconds.append(_once(model, second_ids, new_tokens, True, reuse=True))
    first = statistics.median(r.ttft_ms for r in firsts)
    second = statistics.median(r.ttft_ms for r in seconds)
    return SharedPrefixCase(prefix_tokens, len(first_ids), len(second_ids), runs, first, second,
                            min(r.cached_tokens for r in seconds), second / first if first > 0 else 0.0)


@dataclass(frozen=True)
class FilledCase:
    filled: int                # tokens in the KV cache (written by prefill) before the timed decode steps
    new_tokens: int
    runs: int
    decode_tok_s: float        # median over the runs
    decode_tok_s_spread: float
    relative: float            # decode_tok_s / that of the shortest filled length

    def to_dict(self) -> dict:
        return {k: (round(v, 4 if k == "relative" else 2) if isinstance(v, float) else v)
                for k, v in self.__dict__.items()}


def filled_decode(model, lengths: list[int], new_tokens: int, runs: int = 3, *,
                  warmup: bool = True) -> list[FilledCase]:
    """Decode speed with ``F`` tokens already in the KV cache, for each ``F`` in ``lengths``: R1 thinks for
    thousands of tokens, and attention reads every filled row at each step. The cache is filled by prefill
    (chunks of the bundle's prefill size, ordinary text), once per length; each run then keeps those ``F`` rows
    and times ``new_tokens`` greedy one-token steps. Medians over ``runs``."""
    longest = max(lengths)
    if longest + new_tokens > model.max_context:
        raise UserInputError(f"--filled {longest} + {new_tokens} new tokens exceed max_context {model.max_context}: "
                             "use shorter --filled/--new-tokens or a bundle with a longer context")
    dec, chunk = model.decoder, model.prefill_chunk
    cases: list[FilledCase] = []
    with model._lock:
        if warmup:
            dec.reset()
            dec.step(np.asarray(prompt_of(model, 8), np.int64))
        for f in sorted(lengths):
            ids = np.asarray(prompt_of(model, f), np.int64)
            dec.reset()
            for a in range(0, f, chunk):
                logits = dec.step(ids[a:a + chunk])
            first = int(np.argmax(logits))
            rates = []
            for _ in range(runs):
                dec.keep(f)
                token, t0 = first, time.perf_counter()
                for _ in range(new_tokens):
                    token = int(np.argmax(dec.step(np.array([token], np.int64))))
                rates.append(new_tokens / (time.perf_counter() - t0))
            rate = statistics.median(rates)
            base = cases[0].decode_tok_s if cases else rate
            cases.append(FilledCase(f, new_tokens, runs, rate, max(rates) - min(rates), rate / base))
        dec.reset()      # the rows hold filler text: no later request may reuse them
    return cases


def _once(model, ids: list[int], new_tokens: int, ignore_eos: bool, *, reuse: bool = False):
    request = GenerationRequest(prompt_ids=ids, sampling=SamplingParams(), max_new_tokens=new_tokens,
                                ignore_eos=ignore_eos)
    with model._lock:
        for event in run(model.decoder, model.codec, request, prefill_chunk=model.prefill_chunk, eos_ids=model.eos_ids,
                         reuse=reuse, **model.speculation()):
            if event.kind == "done":
                return event.result
