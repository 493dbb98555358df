"""The one module that talks to llama.cpp's C API (libllama and its ggml kernels).

It goes through llama-cpp-python's low-level ``llama_cpp.llama_cpp`` module: ctypes declarations generated for
the exact libllama that package built, so struct layouts (``llama_context_params``, ``llama_batch``) always
match the library. Nothing of llama-cpp-python's high-level ``Llama`` class is used: edgekit keeps its own
tokenizer, template, sampler, constraint and loop, and asks the library only to append tokens to a KV cache and
return logits. Swapping the binding (a prebuilt CFFI one, a ctypes layer over a system libllama) means
rewriting this file only; docs/ARCHITECTURE.md says why this one was chosen.

Importing this module imports nothing; :func:`library` imports llama_cpp on first use.
"""

from __future__ import annotations

import ctypes
import os
import re
import threading

import numpy as np

from ..errors import BackendUnavailable, GenerationError

# The command a machine without the binding is told to run (pyproject's "ggml" extra pins the version).
INSTALL = "pip install 'edgekit[ggml]' (builds llama.cpp from source: about 8 minutes on 2 cores)"

_lock = threading.Lock()
_state: dict = {}


class _Log:
    """llama.cpp's log lines, kept instead of printed: a robot's stderr is not ours. The last error lines go
    into our messages; the buffer sizes llama.cpp reports are what it really allocated."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def take(self) -> list[str]:
        lines, self.lines = self.lines, []
        return lines


def library():
    """``llama_cpp.llama_cpp`` with its backend initialised and its logging captured, once per process."""
    with _lock:
        if "lib" in _state:
            return _state["lib"]
        try:
            import llama_cpp.llama_cpp as lib
        except ImportError:
            raise BackendUnavailable(f"the ggml-cpu backend needs llama.cpp's library, which is not installed: "
                                     f"{INSTALL}, or rebuild the bundle with --backend onnxruntime-cpu") from None
        except (OSError, RuntimeError) as e:   # the package is there but its shared library does not load
            raise BackendUnavailable(f"llama.cpp's library does not load here ({str(e).splitlines()[0][:200]}): "
                                     f"reinstall it ({INSTALL})") from None
        log = _Log()

        def keep(level, text, _user):   # a C callback: never raise
            try:
                if level in (2, 3, 4):      # GGML_LOG_LEVEL_INFO, _WARN, _ERROR; DEBUG floods (a line per node)
                    log.lines.append(text.decode("utf-8", "replace"))
                    del log.lines[:-400]
            except Exception:
                pass

        callback = lib.llama_log_callback(keep)
        lib.llama_log_set(callback, ctypes.c_void_p(0))
        lib.llama_backend_init()
        _state.update(lib=lib, log=log, callback=callback)   # the callback must outlive every call
        return lib


def _log() -> _Log:
    return _state["log"]


_BUFFER = re.compile(r"(CPU\S*) +(?:compute |KV |output )?buffer size = +([0-9.]+) MiB")


def _reported_mib(lines: list[str]) -> dict[str, float]:
    """The buffer sizes llama.cpp logged while creating a context: {"KV": MiB, "compute": MiB, ...}."""
    out: dict[str, float] = {}
    for line in lines:
        m = _BUFFER.search(line)
        if m:
            kind = "compute" if "compute" in line else "KV" if "KV" in line else "output"
            out[kind] = out.get(kind, 0.0) + float(m.group(2))
    return out


class LlamaSession:
    """One model (memory-mapped from the GGUF) and one context: a KV cache of ``n_ctx`` rows, one sequence."""

    def __init__(self, path: str, *, n_ctx: int, n_batch: int, threads: int | None = None,
                 kv_type: str = "f16", flash_attn: bool = True) -> None:
        lib = library()
        self._lib = lib
        _log().take()
        mp = lib.llama_model_default_params()
        mp.n_gpu_layers = 0
        self.model = lib.llama_model_load_from_file(path.encode(), mp)
        if not self.model:
            raise BackendUnavailable(f"llama.cpp cannot load {path}: {self._last_error()}; rebuild the bundle "
                                     "from a GGUF llama.cpp reads, or with --backend onnxruntime-cpu")
        cp = lib.llama_context_default_params()
        cp.n_ctx = n_ctx
        cp.n_batch = cp.n_ubatch = n_batch
        cp.n_seq_max = 1
        n = threads or len(os.sched_getaffinity(0))
        cp.n_threads = cp.n_threads_batch = n
        cp.no_perf = True
        cp.type_k = cp.type_v = {"f16": 1, "q8_0": 8}[kv_type]       # ggml_type numbers (ggml.h)
        cp.flash_attn_type = 1 if flash_attn else 0                  # LLAMA_FLASH_ATTN_TYPE_ENABLED / _DISABLED
        self.ctx = lib.llama_init_from_model(self.model, cp)
        if not self.ctx:
            error = self._last_error()
            lib.llama_model_free(self.model)
            raise BackendUnavailable(f"llama.cpp cannot create a context of {n_ctx} tokens: {error}")
        self.allocated_mib = _reported_mib(_log().take())
        self.n_ctx, self.n_batch = int(lib.llama_n_ctx(self.ctx)), n_batch
        self.vocab = int(lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(self.model)))
        self.memory = lib.llama_get_memory(self.ctx)
        self.batch = lib.llama_batch_init(n_batch, 0, 1)
        self._closed = False

    def _last_error(self) -> str:
        lines = [x.strip() for x in _log().take() if x.strip()]
        errors = [x for x in lines if "error" in x.lower() or "failed" in x.lower()]
        return (errors or lines or ["no reason given"])[-1][:300]

    def decode(self, tokens: np.ndarray, pos: int, rows: int) -> np.ndarray:
        """Append ``tokens`` at positions pos.. and return the logits of the last ``rows`` of them, (rows, V).
        Inputs longer than the batch go in several calls (same cache, same positions)."""
        out = []
        n_total = len(tokens)
        for start in range(0, n_total, self.n_batch):
            part = tokens[start:start + self.n_batch]
            want = max(0, min(len(part), rows - (n_total - start - len(part))))   # rows of this part wanted
            out.append(self._decode_part(part, pos + start, want))
        return np.concatenate([o for o in out if len(o)]) if rows > 1 else out[-1]

    def _decode_part(self, tokens: np.ndarray, pos: int, rows: int) -> np.ndarray:
        lib, b, n = self._lib, self.batch, len(tokens)
        b.n_tokens = n
        first_out = n - rows
        for i in range(n):
            b.token[i] = int(tokens[i])
            b.pos[i] = pos + i
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = 0
            b.logits[i] = 1 if i >= first_out else 0
        rc = lib.llama_decode(self.ctx, b)
        if rc != 0:
            raise GenerationError(f"llama.cpp could not run a step of {n} tokens at position {pos} (code {rc}: "
                                  f"{self._last_error()}): the cache is full or memory ran out")
        if rows == 0:
            return np.zeros((0, self.vocab), np.float32)
        ptr = lib.llama_get_logits_ith(self.ctx, first_out)     # rows are contiguous from the first output
        return np.ctypeslib.as_array(ptr, shape=(rows, self.vocab)).copy()

    def remove_from(self, pos: int) -> None:
        """Forget cache rows pos.. (the next decode writes from ``pos``)."""
        if pos == 0:
            self._lib.llama_memory_clear(self.memory, True)
        elif not self._lib.llama_memory_seq_rm(self.memory, 0, pos, -1):
            raise GenerationError(f"llama.cpp could not drop cache rows from {pos}")

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._lib.llama_batch_free(self.batch)
        self._lib.llama_free(self.ctx)
        self._lib.llama_model_free(self.model)

    def __del__(self):   # a Model dropped without close(): free the context and the mapping
        try:
            self.close()
        except Exception:
            pass


def system_info() -> str:
    """What llama.cpp's CPU kernels were built with (AVX2, AVX512, NEON, ...)."""
    return library().llama_print_system_info().decode()
