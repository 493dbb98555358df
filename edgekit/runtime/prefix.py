"""Prefix reuse: the decoder remembers which token ids its KV cache rows hold, so the next request can keep the
rows it shares with them and prefill only from the first token that differs (multi-turn chat, a repeated system
prompt).

Both backends keep a static cache whose validity is a row count (``position``): the ``ort`` dialect's
GroupQueryAttention reads rows < seqlens_k + 1 and writes the new ones in place, the ``tensorrt`` dialect reads
the first P rows and has the new ones copied to rows P..; so keeping a prefix is setting ``position`` back, and
the rows after it are simply overwritten. Token ids are compared, never text: R1 templates drop earlier thoughts
from the history, and the prefix ends where the ids differ.
"""

from __future__ import annotations

from typing import Callable

import numpy as np


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading ids ``a`` and ``b`` share."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class TokenRows:
    """Mixin for a decoder: ``cached`` lists the token ids in cache rows 0 .. position-1."""

    position: int
    cached: list[int]

    def reset(self) -> None:
        """Forget the cache contents (the buffers stay; stale rows are never read past ``position``)."""
        self.position = 0
        self.cached = []

    def keep(self, n: int) -> None:
        """Keep the first ``n`` rows (a prefix of what is cached); the next step writes from row ``n``."""
        if not 0 <= n <= self.position:
            raise ValueError(f"cannot keep {n} of {self.position} cached rows")
        self.position = n
        del self.cached[n:]

    def _tracked(self, tokens: np.ndarray, run: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
        try:
            logits = run(tokens)
        except BaseException:   # a step that failed midway leaves rows (and position) unknown: start afresh
            self.reset()
            raise
        self.cached.extend(int(t) for t in tokens)
        return logits


def reuse(decoder, prompt_ids: list[int]) -> int:
    """Keep the rows ``decoder`` shares with ``prompt_ids`` and return how many. At least the last prompt token
    is always prefilled again: its logits choose the first new token."""
    cached = getattr(decoder, "cached", None)
    if cached is None or len(cached) != decoder.position:   # a decoder without token bookkeeping
        decoder.reset()
        return 0
    n = min(common_prefix(cached, prompt_ids), len(prompt_ids) - 1)
    decoder.keep(n)
    return n
