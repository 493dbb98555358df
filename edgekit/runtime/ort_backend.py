"""The onnxruntime backend: one decoder session, its static KV cache, and a ``step`` that appends tokens.

Both graph dialects run here (``ort`` is the fast path; ``tensorrt`` runs on onnxruntime for checks and as
a CPU fallback). Everything a step needs is allocated once in ``__init__``:

- ``ort``: one (1, Hkv, C, D) OrtValue per layer and K/V, bound as both ``past_*`` and ``present_*``
  (GroupQueryAttention updates it in place), plus the logits buffer. A decode step allocates nothing.
- ``tensorrt``: one (1, C, Hkv, D) numpy array per layer and K/V; the graph reads the first P rows and
  returns the S new rows, which are copied in.
"""

from __future__ import annotations

import numpy as np

from ..errors import BackendUnavailable, GenerationError
from .dtypes import KV_DTYPES
from .memory import release_free_heap
from .prefix import TokenRows


def _providers(backend: str, ort) -> list:
    if backend == "onnxruntime-cpu":
        return ["CPUExecutionProvider"]
    if backend == "onnxruntime-cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise BackendUnavailable(
                "onnxruntime-cuda was requested but this onnxruntime has no CUDA provider: "
                "install onnxruntime-gpu (on Jetson, from NVIDIA's Jetson wheels) or use the onnxruntime-cpu "
                "backend (--backend onnxruntime-cpu)")
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    raise BackendUnavailable(f"backend {backend!r} is not an onnxruntime backend")



def _open_session(ort, model_path: str, backend: str, threads: int | None, profile_prefix: str | None):
    """The onnxruntime session of the graph, on the backend's providers; one-line errors."""
    options = ort.SessionOptions()
    options.log_severity_level = 3  # warnings would go to the host program's stderr
    if threads:
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "1")
    if profile_prefix:      # benchmarks/profile_decode.py: per-node kernel times in a JSON trace
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    providers = _providers(backend, ort)
    try:
        session = ort.InferenceSession(model_path, options, providers=providers)
    except Exception as e:  # onnxruntime raises its own exception types; keep one line
        raise BackendUnavailable(f"onnxruntime cannot load {model_path}: {str(e).splitlines()[0][:300]}") from None
    finally:
        release_free_heap()     # what constant folding and repacking freed (GiBs for a 7B), back to the system
    if backend == "onnxruntime-cuda" and "CUDAExecutionProvider" not in session.get_providers():
        # onnxruntime silently falls back to CPU when CUDA cannot start; a robot must not run 20x slower unnoticed
        raise BackendUnavailable("onnxruntime could not start CUDA (no GPU or driver) and fell back to the CPU: "
                                 "use the onnxruntime-cpu backend explicitly (--backend onnxruntime-cpu), "
                                 "or fix the GPU setup (edgekit doctor)")
    return session

class OrtDecoder(TokenRows):
    """Runs the exported graph step by step over a fixed-capacity KV cache (batch 1)."""

    def __init__(self, model_path: str, *, dialect: str, spec, capacity: int, kv_dtype: str,
                 backend: str = "onnxruntime-cpu", threads: int | None = None, profile_prefix: str | None = None):
        import onnxruntime as ort

        self.dialect, self.spec, self.capacity = dialect, spec, capacity
        self.reset()  # position 0: no tokens in the cache (TokenRows also tracks their ids, for prefix reuse)
        self.session = _open_session(ort, model_path, backend, threads, profile_prefix)
        self.device = "cuda" if backend == "onnxruntime-cuda" else "cpu"
        self.dtype = np.dtype(KV_DTYPES[kv_dtype]).type
        self.kv_dtype_name = kv_dtype
        self.vocab = spec.vocab_size
        self._ort = ort
        if dialect == "ort":
            self._bind_ort_cache()
        else:
            shape = (1, capacity, spec.num_kv_heads, spec.head_dim)      # (batch, capacity, kv_heads, head_dim)
            self.cache = {f"{kind}_{i}": np.zeros(shape, self.dtype)
                          for i in range(spec.num_layers) for kind in ("key", "value")}
            self._out_names = [o.name for o in self.session.get_outputs()]
            self.rows_input = False
            self.all_logits = next(o.shape for o in self.session.get_outputs() if o.name == "logits")[1] != 1

    def _bind_ort_cache(self) -> None:
        """The ``ort`` dialect: the KV cache and logits as OrtValues, bound once (a decode step allocates nothing)."""
        ort, spec = self._ort, self.spec
        shape = (1, spec.num_kv_heads, self.capacity, spec.head_dim)      # (batch, kv_heads, capacity, head_dim)
        self.cache = {f"{kind}_{i}": ort.OrtValue.ortvalue_from_shape_and_type(shape, self.dtype, self.device)
                      for i in range(spec.num_layers) for kind in ("key", "value")}
        logits_shape = next(o.shape for o in self.session.get_outputs() if o.name == "logits")
        # "last" graphs by this edgekit take logits_rows (default 1): the logits of the last N tokens
        # (an input with a default is listed by get_overridable_initializers, not get_inputs)
        self.rows_input = any(i.name == "logits_rows" for i in
                              (*self.session.get_inputs(), *self.session.get_overridable_initializers()))
        # A "last" graph has a (1, 1, V) output per step that can be preallocated; an "all" one (tests, eval)
        # cannot, nor a verify step's (1, N, V).
        self.logits = (ort.OrtValue.ortvalue_from_shape_and_type((1, 1, self.vocab), np.float32, self.device)
                       if logits_shape[1] == 1 or self.rows_input else None)
        self.all_logits = self.logits is None
        # IO binding finds an input with a default only as an OrtValue (bind_cpu_input refuses the name)
        self._one_row = ort.OrtValue.ortvalue_from_numpy(np.ones(1, np.int64))
        self._seqlens = np.zeros(1, np.int32)
        self._total = np.zeros(1, np.int32)
        self.binding = self.session.io_binding()
        for name, value in self.cache.items():
            self.binding.bind_ortvalue_input(f"past_{name}", value)
            self.binding.bind_ortvalue_output(f"present_{name}", value)
        if self.logits is not None:
            self.binding.bind_ortvalue_output("logits", self.logits)
        if self.rows_input:
            self.binding.bind_ortvalue_input("logits_rows", self._one_row)

    @property
    def can_verify(self) -> bool:
        """Whether one step can return the logits of every token it appends (speculative decoding's verify)."""
        return self.rows_input or self.all_logits

    @property
    def kv_cache_bytes(self) -> int:
        # every K and V buffer is (1, Hkv, capacity, D) or (1, capacity, Hkv, D): the same element count
        per_buffer = self.capacity * self.spec.num_kv_heads * self.spec.head_dim
        return per_buffer * np.dtype(self.dtype).itemsize * len(self.cache)

    def step(self, tokens: np.ndarray) -> np.ndarray:
        """Append ``tokens`` (int64, (S,)) to the cache and return the logits of the last one, (V,) float32."""
        return self._tracked(tokens, self._run)[-1]

    def step_all(self, tokens: np.ndarray, *, prefill: bool = True) -> np.ndarray:
        """Like ``step``, but the logits of every new token, (S, V) float32: a graph exported with logits="all",
        or a "last" graph with the logits_rows input. ``prefill=False`` (a speculative verify step) does not
        count the rows as prefill rows for prefix reuse."""
        if not self.can_verify:
            raise GenerationError("this graph returns the logits of the last token only (built by an older "
                                  "edgekit, or the tensorrt dialect): rebuild the bundle, or export it with "
                                  "logits='all'")
        logits = self._tracked(tokens, self._run_all if self.rows_input else self._run, prefill=prefill)
        if logits.shape[0] != tokens.shape[0]:
            raise GenerationError("this graph returns the logits of the last token only: export it with "
                                  "logits='all' for step_all")
        return logits

    def _run_all(self, tokens: np.ndarray) -> np.ndarray:
        """A run of a logits_rows graph that returns the logits of every token: (S, V), freshly allocated."""
        rows = np.array([tokens.shape[0]], np.int64)   # alive until the run ends: the OrtValue reads it
        self.binding.bind_ortvalue_input("logits_rows", self._ort.OrtValue.ortvalue_from_numpy(rows))
        self.binding.bind_output("logits", self.device)
        try:
            # a copy: the array onnxruntime allocated goes with the binding's next output
            return np.array(self._run(tokens, preallocated=False), copy=True)
        finally:   # back to the decode path's binding: one row into the preallocated buffer
            self.binding.bind_ortvalue_input("logits_rows", self._one_row)
            self.binding.bind_ortvalue_output("logits", self.logits)

    def _run(self, tokens: np.ndarray, preallocated: bool = True) -> np.ndarray:
        """One graph run; the logits it returns, (S, V) or (1, V) for a "last" graph."""
        s = int(tokens.shape[0])
        if self.position + s > self.capacity:
            raise GenerationError(f"the KV cache is full ({self.capacity} tokens): start a new conversation or "
                                  "load with a larger max_context")
        ids = np.ascontiguousarray(tokens.reshape(1, s), dtype=np.int64)
        if self.dialect == "ort":
            self._seqlens[0] = self.position + s - 1
            self._total[0] = self.position + s
            self.binding.bind_cpu_input("input_ids", ids)
            self.binding.bind_cpu_input("seqlens_k", self._seqlens)
            self.binding.bind_cpu_input("total_sequence_length", self._total)
            if self.logits is None:  # its shape changes with S: let onnxruntime allocate it afresh
                self.binding.bind_output("logits", self.device)
            self.session.run_with_iobinding(self.binding)
            if self.logits is not None and preallocated:
                logits = self.logits.numpy()[0]  # a view on CPU: valid until the next step
            else:
                logits = self.binding.get_outputs()[-1].numpy()[0]
        else:
            p = self.position
            feeds = {"input_ids": ids, **{f"past_{n}": c[:, :p] for n, c in self.cache.items()}}
            outs = dict(zip(self._out_names, self.session.run(None, feeds)))
            for n, c in self.cache.items():
                c[:, p:p + s] = outs[f"new_{n}"]
            logits = outs["logits"][0]
        self.position += s
        return logits
