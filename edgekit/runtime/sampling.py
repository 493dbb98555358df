"""Token selection: greedy, temperature, top-k, top-p, min-p, repetition penalty, seeded.

Order of operations (the one transformers and llama.cpp use): repetition penalty on the raw logits,
then temperature, then top-k, top-p and min-p as filters on the scaled distribution, then a draw.
``temperature == 0`` means greedy and ignores the filters.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import GenerationError


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    top_k: int = 0            # 0 = off
    top_p: float = 1.0        # 1 = off
    min_p: float = 0.0        # 0 = off
    repetition_penalty: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        def bad(what: str, valid: str):
            raise GenerationError(f"invalid {what}: {valid}")

        if not isinstance(self.temperature, (int, float)) or not np.isfinite(self.temperature) or self.temperature < 0:
            bad(f"temperature {self.temperature!r}", "use a number >= 0 (0 = greedy)")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 0:
            bad(f"top_k {self.top_k!r}", "use a whole number >= 0 (0 = off)")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            bad(f"top_p {self.top_p!r}", "use a number in (0, 1] (1 = off)")
        if not isinstance(self.min_p, (int, float)) or not 0 <= self.min_p < 1:
            bad(f"min_p {self.min_p!r}", "use a number in [0, 1) (0 = off)")
        if not isinstance(self.repetition_penalty, (int, float)) or not np.isfinite(self.repetition_penalty) \
                or self.repetition_penalty <= 0:
            bad(f"repetition_penalty {self.repetition_penalty!r}", "use a number > 0 (1 = off)")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0):
            bad(f"seed {self.seed!r}", "use a whole number >= 0")


class Sampler:
    def __init__(self, params: SamplingParams, vocab: int):
        self.params = params
        self.rng = np.random.default_rng(params.seed)
        self._seen = np.zeros(vocab, dtype=bool)  # tokens already in the context, for the repetition penalty

    def observe(self, tokens) -> None:
        self._seen[np.asarray(tokens, dtype=np.int64)] = True

    def __call__(self, logits: np.ndarray) -> int:
        p = self.params
        if p.repetition_penalty != 1.0 and self._seen.any():
            logits = logits.astype(np.float32, copy=True)
            seen = logits[self._seen]
            logits[self._seen] = np.where(seen > 0, seen / p.repetition_penalty, seen * p.repetition_penalty)
        if p.temperature == 0:
            return int(np.argmax(logits))
        scaled = logits.astype(np.float64) / p.temperature
        if p.top_k and p.top_k < scaled.size:
            kth = np.partition(scaled, -p.top_k)[-p.top_k]
            scaled = np.where(scaled < kth, -np.inf, scaled)
        probs = np.exp(scaled - scaled.max())
        probs /= probs.sum()
        if p.min_p > 0:
            probs = np.where(probs < p.min_p * probs.max(), 0.0, probs)
        if p.top_p < 1.0:
            order = np.argsort(-probs, kind="stable")
            cumulative = np.cumsum(probs[order])
            # keep the smallest prefix whose mass reaches top_p (always at least the top token)
            cut = int(np.searchsorted(cumulative, p.top_p * cumulative[-1])) + 1
            keep = np.zeros_like(probs, dtype=bool)
            keep[order[:cut]] = True
            probs = np.where(keep, probs, 0.0)
        probs /= probs.sum()
        return int(self.rng.choice(probs.size, p=probs))
