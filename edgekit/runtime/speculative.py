"""Speculative decoding: draft a few tokens cheaply, check them all in one step of the model, keep what matches.

How it plugs into the generation loop (:func:`edgekit.runtime.generate.run`): :class:`SpeculativeDecoder` wraps the
decoder and looks like one. The loop still chooses every token itself (sampler, EOS, stop strings, thinking budget,
max_new_tokens, cancel are untouched) and still calls ``step([token])`` for the logits after it. The wrapper answers
that call either

- from a verify step it already ran: when ``token`` is the next drafted token, its logits row is ready and its KV
  row is already in the cache (an *accepted* draft, no model call), or
- by running one: it drafts up to ``k`` tokens after ``token`` and runs ``[token, d1 .. dk]`` in ONE step of the
  graph, which writes their KV rows and returns the logits of every one of them (the graph's ``logits_rows``
  input, :mod:`edgekit.export.decoder`). When the loop then picks a token other than the next draft, the wrapper
  rewinds the cache to the rows it did use (``keep``: ``position`` goes back, no copy — the static cache's rows
  after it are simply overwritten) and verifies again from that token.

Because the loop picks each token from the logits of exactly the tokens before it, the tokens are the ones the
model chooses, greedy or sampled (a seeded sampler draws once per token either way). What can differ is the
arithmetic: a verify step is a multi-token step, and the kernels of a multi-token step are not those of a
one-token step. On fp32 bundles and INT4/INT8 bundles with MatMulNBits accuracy_level 0 the logits agree to ~1e-4
(summation order): greedy output is the same token for token except where the two best logits tie within that.
With accuracy_level 4 (int8 activations, the CPU default for INT4/INT8), onnxruntime's one-token and multi-token
kernels differ by up to ~2 in SmolLM2's logits: speculative output is then the model's greedy output *as computed
by the multi-token kernels*, and may differ from plain decoding after a few dozen tokens (docs/ARCHITECTURE.md).

Drafters: :class:`PromptLookup` (n-gram match over the prompt and what was generated: free, good when the answer
restates its input, as R1's reasoning does) and :class:`DraftModel` (a second, smaller bundle with the same
tokenizer, e.g. R1-Distill-Qwen-1.5B for the 7B).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BundleError, GenerationError, UserInputError
from .prefix import common_prefix

MAX_DRAFT = 16      # longest draft per verify step: the logits of k + 1 rows come back (k+1) x vocab floats


@dataclass(frozen=True)
class Speculation:
    """How to speculate. ``draft``: "ngram" (prompt lookup) or a draft bundle's path (or a loaded Model).

    - ``k``: most tokens drafted per verify step (1 .. 16).
    - ``ngram``: prompt lookup matches the last ``ngram`` tokens, then shorter suffixes down to ``min_ngram``.
    - ``adaptive``: shrink the draft length after rejections and grow it back after full acceptance (a rejected
      draft costs a wider step for nothing).
    """

    draft: Any = "ngram"
    k: int = 5
    ngram: int = 3
    min_ngram: int = 2
    adaptive: bool = True

    def __post_init__(self):
        for name, low, high in (("k", 1, MAX_DRAFT), ("ngram", 1, 16), ("min_ngram", 1, 16)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
                raise UserInputError(f"invalid speculative {name} {value!r}: use a whole number {low} .. {high}")
        if self.min_ngram > self.ngram:
            raise UserInputError(f"speculative min_ngram {self.min_ngram} is larger than ngram {self.ngram}: "
                                 "use min_ngram <= ngram")
        if not (self.draft == "ngram" or isinstance(self.draft, (str, Path)) or hasattr(self.draft, "decoder")):
            raise UserInputError(f"invalid speculative draft {self.draft!r}: use 'ngram' or a draft bundle's path")

    @classmethod
    def of(cls, value) -> Speculation | None:
        """``load(speculative=...)``: None/False (off), True or "ngram", a bundle path, or a Speculation."""
        if value is None or value is False:
            return None
        if isinstance(value, cls):
            return value
        if value is True:
            return cls()
        if isinstance(value, (str, Path)):
            return cls(draft="ngram" if str(value) == "ngram" else value)
        raise UserInputError(f"invalid speculative {value!r}: use 'ngram', a draft bundle's path, or a Speculation")


class PromptLookup:
    """Drafts the tokens that followed the latest earlier occurrence of the context's last n tokens."""

    def __init__(self, ngram: int = 3, min_ngram: int = 2):
        self.ngram, self.min_ngram = ngram, min_ngram
        self._seen: list[int] = []
        self._index: dict[tuple[int, ...], int] = {}    # n-gram -> where its latest earlier occurrence ends

    def propose(self, context: list[int], k: int) -> list[int]:
        if context[:len(self._seen)] != self._seen:     # a new request (or a rewound one): index afresh
            self._seen, self._index = [], {}
        seen = self._seen
        # index every n-gram that ends before the context's last token (the last one has no continuation yet)
        for j in range(len(seen), len(context)):
            seen.append(context[j])
            end = j - 1                                  # n-grams ending at index end are followed by index j
            for n in range(self.min_ngram, self.ngram + 1):
                if end - n + 1 >= 0:
                    self._index[tuple(seen[end - n + 1:end + 1])] = j
        for n in range(self.ngram, self.min_ngram - 1, -1):
            if len(context) < n:
                continue
            start = self._index.get(tuple(context[-n:]))
            if start is not None:
                return context[start:start + k]
        return []


class DraftModel:
    """Greedy drafts from a second decoder (its own KV cache, kept in step with the target's by token ids)."""

    def __init__(self, model):
        self.model = model
        self.decoder = model.decoder
        self.chunk = model.prefill_chunk

    def propose(self, context: list[int], k: int) -> list[int]:
        d = self.decoder
        k = min(k, d.capacity - len(context))
        if k < 1:
            return []
        keep = min(common_prefix(d.cached, context), len(context) - 1, d.position)   # the last token always runs
        d.keep(keep)
        ids = np.asarray(context, dtype=np.int64)
        for start in range(keep, len(ids), self.chunk):
            logits = d.step(ids[start:start + self.chunk])
        out: list[int] = []
        while True:
            out.append(int(np.argmax(logits)))
            if len(out) == k:
                return out
            logits = d.step(np.asarray(out[-1:], dtype=np.int64))


def check_draft(target, draft) -> None:
    """The draft must speak the target's token ids: the same vocabulary (token -> id) and EOS. Raises BundleError."""
    t, d = target.codec.tokenizer, draft.codec.tokenizer
    if t.get_vocab(with_added_tokens=True) != d.get_vocab(with_added_tokens=True):
        raise BundleError("the draft bundle's tokenizer differs from the model's (another vocabulary or token ids): "
                          "use a draft of the same family that shares the tokenizer (e.g. R1-Distill-Qwen-1.5B for "
                          "R1-Distill-Qwen-7B/14B), or speculative='ngram'")
    if draft.spec.vocab_size > target.spec.vocab_size:
        raise BundleError(f"the draft bundle's vocabulary ({draft.spec.vocab_size}) is larger than the model's "
                          f"({target.spec.vocab_size}): it could draft ids the model does not have; use a draft "
                          "of the same family, or speculative='ngram'")
    if draft.max_context < target.max_context:
        raise BundleError(f"the draft bundle holds {draft.max_context} tokens but the model {target.max_context}: "
                          f"rebuild the draft with --context {target.max_context}, or load the model with "
                          f"max_context={draft.max_context}")


def make_drafter(spec: Speculation, draft_model=None):
    return PromptLookup(spec.ngram, spec.min_ngram) if draft_model is None else DraftModel(draft_model)


class SpeculativeDecoder:
    """A decoder for :func:`edgekit.runtime.generate.run` that verifies drafts (module docstring). ``position`` is
    the rows the loop has used; rows of drafts it has not reached yet sit after it until accepted or rewound."""

    def __init__(self, decoder, drafter, spec: Speculation):
        if not getattr(decoder, "can_verify", False):
            raise GenerationError("speculative decoding needs a graph that returns the logits of several tokens "
                                  "per step: rebuild the bundle with this edgekit (onnxruntime backends), or load "
                                  "it without speculative")
        self.inner, self.drafter, self.spec = decoder, drafter, spec
        self.k = spec.k
        self.drafted = self.accepted = 0
        self._fed: list[int] = []            # the tokens of the last verify step
        self._rows: np.ndarray | None = None  # their logits, (len(_fed), V)
        self._start = 0                        # cache row of _fed[0]
        self._used = 0                         # how many of _fed the loop has reached

    def __getattr__(self, name):              # capacity, vocab, spec, cached, prefilled, ...
        return getattr(self.inner, name)

    @property
    def position(self) -> int:
        return self._start + self._used if self._rows is not None else self.inner.position

    def settle(self) -> None:
        """Drop the rows of drafts the loop did not reach (after the last one: nothing to drop)."""
        if self._rows is not None:
            self._close_round()
            self.inner.keep(self._start + self._used)
            self._rows = None

    def reset(self) -> None:
        self._rows = None
        self.inner.reset()

    def keep(self, n: int) -> None:
        self.settle()
        self.inner.keep(n)

    def step(self, tokens: np.ndarray) -> np.ndarray:
        if len(tokens) != 1:                  # prefill, forced tokens: the plain path
            self.settle()
            return self.inner.step(tokens)
        token = int(tokens[0])
        if self._rows is not None:
            if self._used < len(self._fed) and self._fed[self._used] == token:   # the draft the model chose
                self._used += 1
                self.accepted += 1
                return self._rows[self._used - 1]
            self.settle()
        return self._verify(token)

    def _close_round(self) -> None:
        """Adapt k to the last round: all drafts taken -> one more next time; the first one refused -> one less."""
        if not self.spec.adaptive:
            return
        drafts, taken = len(self._fed) - 1, self._used - 1
        if taken >= drafts and drafts >= self.k:
            self.k = min(self.spec.k, self.k + 1)
        elif taken == 0:
            self.k = max(1, self.k - 1)

    def _verify(self, token: int) -> np.ndarray:
        inner = self.inner
        room = inner.capacity - inner.position - 1
        context = inner.cached[:inner.position] + [token]
        draft = self.drafter.propose(context, min(self.k, room)) if room > 0 else []
        if not draft:                         # nothing to check: the one-token step, exactly the plain path
            return inner.step(np.asarray([token], dtype=np.int64))
        self.drafted += len(draft)
        self._start = inner.position
        self._fed = [token, *draft]
        self._rows = inner.step_all(np.asarray(self._fed, dtype=np.int64), prefill=False)
        self._used = 1
        return self._rows[0]
