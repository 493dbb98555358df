"""Prefix reuse: the decoder remembers which token ids its KV cache rows hold, so the next request can keep the
rows it shares with them and prefill only from the first token that differs (multi-turn chat, a repeated system
prompt).

Both backends keep a static cache whose validity is a row count (``position``): the ``ort`` dialect's
GroupQueryAttention reads rows < seqlens_k + 1 and writes the new ones in place, the ``tensorrt`` dialect reads
the first P rows and has the new ones copied to rows P..; so keeping a prefix is setting ``position`` back, and
the rows after it are simply overwritten. Token ids are compared, never text: R1 templates drop earlier thoughts
from the history, and the prefix ends where the ids differ.

Only rows written by multi-token (prefill) steps are kept. A one-token decode step takes other kernels
(onnxruntime's MatMulNBits with int8 activations: SmolLM2 INT4 logits differ by up to 0.5 between a token run
alone and the same token inside a prefill chunk, while prefill chunks of 100 or 256 tokens agree bit for bit),
so rows of generated tokens would make the next answer differ from a fresh prefill of the same prompt. Keeping
only prefill rows, and never leaving a one-token prefill, makes reuse give exactly what a fresh prefill gives;
the previous answer (short next to a system prompt) is prefilled again.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading ids ``a`` and ``b`` share."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class TokenRows:
    """Mixin for a decoder: ``cached`` lists the token ids in cache rows 0 .. position-1; the first
    ``prefilled`` of those rows were written by multi-token steps only."""

    position: int
    cached: list[int]
    prefilled: int

    def reset(self) -> None:
        """Forget the cache contents (the buffers stay; stale rows are never read past ``position``)."""
        self.position = 0
        self.cached = []
        self.prefilled = 0

    def keep(self, n: int) -> None:
        """Keep the first ``n`` rows (a prefix of what is cached); the next step writes from row ``n``."""
        if not 0 <= n <= self.position:
            raise ValueError(f"cannot keep {n} of {self.position} cached rows")
        self.position = n
        self.prefilled = min(self.prefilled, n)
        del self.cached[n:]

    def _tracked(self, tokens: np.ndarray, run: Callable[[np.ndarray], np.ndarray], *,
                 prefill: bool = True) -> np.ndarray:
        """Run a step and record its token ids; ``prefill=False``: a multi-token step that is not a prefill
        (speculative decoding's verify step) and does not extend the prefill rows."""
        start = self.position
        try:
            logits = run(tokens)
        except BaseException:   # a step that failed midway leaves rows (and position) unknown: start afresh
            self.reset()
            raise
        self.cached.extend(int(t) for t in tokens)
        if prefill and len(tokens) > 1 and self.prefilled == start:
            self.prefilled = self.position
        return logits


def reuse(decoder, prompt_ids: list[int]) -> int:
    """Keep the prefill rows ``decoder`` shares with ``prompt_ids`` and return how many. The last two prompt
    tokens always run again: the last one's logits choose the first new token, and a one-token prefill would
    take the decode kernels (see the module docstring)."""
    cached = getattr(decoder, "cached", None)
    if cached is None or len(cached) != decoder.position:   # a decoder without token bookkeeping
        decoder.reset()
        return 0
    n = max(0, min(common_prefix(cached, prompt_ids), decoder.prefilled, len(prompt_ids) - 2))
    decoder.keep(n)
    return n


def prefill_bounds(start: int, end: int, chunk: int) -> list[int]:
    """Chunk boundaries for prefilling rows start .. end-1: chunks of ``chunk`` tokens, but never a last chunk
    of one token after others (it would take the decode kernels): then the last two are chunk-1 and 2."""
    bounds = [*range(start, end, chunk), end]
    if chunk > 2 and len(bounds) > 2 and bounds[-1] - bounds[-2] == 1:
        bounds[-2] -= 1
    return bounds
