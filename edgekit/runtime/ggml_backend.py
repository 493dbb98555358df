"""The ggml backend: a GGUF bundle run on llama.cpp's CPU kernels, with the GGUF's blocks as stored.

The decoder contract is the onnxruntime decoder's (``step``, ``step_all``, ``reset``, ``keep``, ``position``,
``cached``/``prefilled`` for prefix reuse, ``can_verify`` for speculative decoding), so generation, sampling,
constraints, tools, prefix reuse and speculation are the same code on both backends. The cache is llama.cpp's
(one sequence, ``n_ctx`` = the load's max_context rows, f16 K/V); keeping a prefix drops the rows after it
(``llama_memory_seq_rm``), like setting ``position`` back in the static onnxruntime cache.

What llama.cpp allocates, all of it counted by :func:`ggml_memory` before loading (and by ``edgekit plan``):
the GGUF's tensors (memory-mapped; tensors its CPU kernels repack are copied once), the KV cache
2 x layers x kv_heads x head_dim x 2 B per row, and one compute buffer of n_ubatch x (vocab + 2 x hidden) x 4 B
(measured: SmolLM2 24.56 MiB and R1-Distill-Qwen-7B 77.75 MiB at n_ubatch 128, both to the hundredth).
"""

from __future__ import annotations

import numpy as np

from ..errors import GenerationError
from .prefix import TokenRows

KV_TYPES = {"f16": 2, "q8_0": 34 / 32}     # bytes per K/V element (q8_0: 32 int8 + an fp16 scale per block)


def ggml_kv_bytes_per_token(spec, kv_type: str = "f16") -> int:
    """K and V of every layer for one token, in llama.cpp's cache of ``kv_type`` elements."""
    return int(2 * spec.num_layers * spec.num_kv_heads * spec.head_dim * KV_TYPES[kv_type])


def ggml_compute_bytes(spec, n_ubatch: int) -> int:
    """llama.cpp's CPU compute buffer for ubatches of ``n_ubatch`` tokens (flash attention on): the logits of
    every token of the ubatch plus two hidden-size rows (measured to the hundredth of a MiB, module docstring)."""
    return n_ubatch * (spec.vocab_size + 2 * spec.hidden_size) * 4


def ggml_memory(manifest) -> dict:
    """The manifest's ``memory`` section with what llama.cpp really allocates in place of its claims (a manifest
    is untrusted): the KV cache from the model section, the weights at least the GGUF's verified size, the
    compute buffer from the vocabulary and the prefill chunk."""
    spec = manifest.spec()
    memory = dict(manifest.memory)
    gguf = manifest.files.get(manifest.graph["file"], {})
    chunk = int(memory.get("prefill_chunk", 128))
    memory["kv_bytes_per_token"] = ggml_kv_bytes_per_token(spec)
    memory["weights_bytes"] = max(int(memory.get("weights_bytes", 0)), int(gguf.get("size", 0)))
    memory["workspace_bytes"] = max(int(memory.get("workspace_bytes", 0)),
                                    ggml_compute_bytes(spec, chunk) + spec.vocab_size * 4)
    return memory


class GgmlDecoder(TokenRows):
    """Runs a GGUF step by step on llama.cpp's kernels over a KV cache of ``capacity`` rows (batch 1)."""

    device = "cpu"
    can_verify = True            # every step can return the logits of each token it appends

    def __init__(self, gguf_path: str, *, spec, capacity: int, n_ubatch: int, threads: int | None = None,
                 kv_type: str = "f16"):
        from .ggml_binding import LlamaSession  # imports llama.cpp's binding only when a GGUF bundle loads

        self.spec, self.capacity, self.kv_type = spec, capacity, kv_type
        self.kv_dtype_name = {"f16": "float16", "q8_0": "q8_0"}[kv_type]
        self.reset()
        self.session = LlamaSession(gguf_path, n_ctx=capacity, n_batch=n_ubatch, threads=threads, kv_type=kv_type)
        if self.session.vocab != spec.vocab_size:   # the manifest and the file disagree: refuse before generating
            self.session.close()
            raise GenerationError(f"{gguf_path} has {self.session.vocab} tokens but the manifest says "
                                  f"{spec.vocab_size}: the bundle is inconsistent; rebuild it")
        self.vocab = spec.vocab_size

    @property
    def kv_cache_bytes(self) -> int:
        return ggml_kv_bytes_per_token(self.spec, self.kv_type) * self.capacity

    def reset(self) -> None:
        super().reset()
        session = getattr(self, "session", None)
        if session is not None:
            session.remove_from(0)

    def keep(self, n: int) -> None:
        super().keep(n)
        self.session.remove_from(n)

    def step(self, tokens: np.ndarray) -> np.ndarray:
        """Append ``tokens`` (int, (S,)) and return the logits of the last one, (V,) float32."""
        return self._tracked(tokens, lambda t: self._run(t, 1))[-1]

    def step_all(self, tokens: np.ndarray, *, prefill: bool = True) -> np.ndarray:
        """The logits of every token appended, (S, V) float32 (speculative verify steps, evaluation)."""
        return self._tracked(tokens, lambda t: self._run(t, len(t)), prefill=prefill)

    def _run(self, tokens: np.ndarray, rows: int) -> np.ndarray:
        s = int(tokens.shape[0])
        if self.position + s > self.capacity:
            raise GenerationError(f"the KV cache is full ({self.capacity} tokens): start a new conversation or "
                                  "load with a larger max_context")
        logits = self.session.decode(np.asarray(tokens).reshape(-1), self.position, rows)
        self.position += s
        return logits

    def close(self) -> None:
        self.session.close()
