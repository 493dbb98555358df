"""The TensorRT backend: a bundle's engine, its static KV cache on the GPU, and the same ``step`` as onnxruntime.

Interface (what :mod:`edgekit.runtime.generate` uses): ``capacity``, ``vocab``, ``position``, ``reset()``,
``step(tokens int64 (S,)) -> logits (V,) float32``, and ``cached``/``keep(n)`` for prefix reuse
(:mod:`edgekit.runtime.prefix`: keeping n rows is setting ``position`` back to n).

Graph contract (``tensorrt`` dialect, :mod:`edgekit.export.decoder`): inputs ``input_ids`` (1, S) and
``past_key_i``/``past_value_i`` (1, P, Hkv, D); outputs ``logits`` (1, 1, V) and ``new_key_i``/``new_value_i``
(1, S, Hkv, D). Everything is allocated once, at load, through cuda-python:

- per layer and K/V one (1, C, Hkv, D) cache buffer. With batch 1 "the first P rows" is a contiguous
  prefix, so ``past_*`` is the buffer's own address with shape (1, P, Hkv, D): no copy;
- ``new_*`` is written straight into rows P .. P+S-1 of the same buffer when that address keeps
  ALIGNMENT (input and output regions never overlap: rows < P are read, rows >= P written); otherwise
  into a small scratch buffer that is copied into place after the step (device to device);
- ``input_ids`` (1, prefill_chunk) int64 and ``logits`` (1, 1, V) float32 device buffers and their host twins.

Two optimization profiles (built by :mod:`edgekit.engine.builder`): ``prefill`` (1..prefill_chunk tokens)
and ``decode`` (1 token); a step picks decode for one token. The bookkeeping (which rows, which addresses,
which copies) is the pure function :func:`plan_step`, tested without a GPU; the class only applies it.

Imports: numpy at module level; tensorrt and cuda-python only inside functions, after the GPU probe
succeeded (TensorRT crashes the process without a GPU).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import BackendUnavailable, BudgetExceeded, BundleError, GenerationError, GpuStepFailed
from .cuda_runtime import CudaRuntime
from .dtypes import KV_DTYPES
from .gpu_driver import module_present, probe_driver, tensorrt_version
from .prefix import TokenRows
from .trt_compat import check_engine, import_tensorrt

ALIGNMENT = 256           # bytes; the alignment cudaMalloc gives and TensorRT expects of tensor addresses


# ----- the bookkeeping, pure ------------------------------------------------------------------------------
@dataclass(frozen=True)
class KvLayout:
    layers: int
    kv_heads: int
    head_dim: int
    capacity: int
    itemsize: int

    @property
    def row_bytes(self) -> int:
        """One token of one layer's K (or V): Hkv * D elements."""
        return self.kv_heads * self.head_dim * self.itemsize

    @property
    def buffer_bytes(self) -> int:
        """One (1, C, Hkv, D) cache buffer."""
        return self.capacity * self.row_bytes

    def names(self) -> list[str]:
        return [f"{kind}_{i}" for i in range(self.layers) for kind in ("key", "value")]


@dataclass(frozen=True)
class StepIO:
    profile: int                                  # optimization profile to run with
    shapes: dict[str, tuple[int, ...]]            # set_input_shape for every input
    addresses: dict[str, int]                     # set_tensor_address for every input and output
    copies: tuple[tuple[int, int, int], ...]      # (dst, src, bytes) device-to-device after the run


def plan_step(position: int, s: int, layout: KvLayout, *, cache: dict[str, int], ids: int, logits: int,
              scratch: dict[str, int] | None, profiles: dict[str, int], alignment: int = ALIGNMENT,
              direct_writes: bool = True) -> StepIO:
    """Shapes, addresses and copies of one step appending ``s`` tokens after ``position`` cached ones.

    ``cache``/``scratch`` map "key_0", "value_0", ... to device addresses of the (1, C, Hkv, D) buffers and
    of (1, prefill_chunk, Hkv, D) scratch buffers (None when every row address is aligned).
    ``direct_writes=False`` sends every new row through scratch (the contract's plain copy).
    """
    if s < 1 or position < 0 or position + s > layout.capacity:
        raise GenerationError(f"cannot append {s} tokens after {position} in a cache of {layout.capacity}")
    shapes: dict[str, tuple[int, ...]] = {"input_ids": (1, s)}
    addresses: dict[str, int] = {"input_ids": ids, "logits": logits}
    copies = []
    offset = position * layout.row_bytes
    for name, base in cache.items():
        shapes[f"past_{name}"] = (1, position, layout.kv_heads, layout.head_dim)   # (batch, P, kv_heads, head_dim)
        addresses[f"past_{name}"] = base            # rows 0 .. P-1 are the buffer's prefix
        target = base + offset                      # rows P .. P+S-1
        if direct_writes and target % alignment == 0:
            addresses[f"new_{name}"] = target
        elif scratch is None:
            raise BackendUnavailable(f"KV row address {target:#x} is not {alignment}-byte aligned and no scratch "
                                     "buffer was allocated")
        else:
            addresses[f"new_{name}"] = scratch[name]
            copies.append((target, scratch[name], s * layout.row_bytes))
    profile = profiles["decode"] if s == 1 and "decode" in profiles else profiles["prefill"]
    return StepIO(profile, shapes, addresses, tuple(copies))


def needs_scratch(layout: KvLayout, alignment: int = ALIGNMENT) -> bool:
    """Whether some row address P * row_bytes can be misaligned (then new rows go through scratch)."""
    return layout.row_bytes % alignment != 0


# ----- the decoder ----------------------------------------------------------------------------------------
class TrtDecoder(TokenRows):
    """Runs a TensorRT engine step by step over a fixed-capacity KV cache on the GPU (batch 1)."""

    def __init__(self, engine, *, spec, capacity: int, kv_dtype: str, max_seq: int,
                 profiles: dict[str, int], trt, cuda: CudaRuntime, direct_kv_writes: bool = True,
                 unified_memory: bool = False):
        """``engine``: the engine file's path (streamed to TensorRT) or its bytes. ``unified_memory``: a Jetson,
        where the GPU's free memory is not checked here (see _check_memory)."""
        self.spec, self.capacity, self.vocab, self.position = spec, int(capacity), spec.vocab_size, 0
        self.reset()   # TokenRows: the token ids in rows 0 .. position-1 (prefix reuse)
        self.max_seq, self.profiles, self.device = int(max_seq), dict(profiles), "cuda"
        self._cuda, self._trt = cuda, trt
        self._allocations: list[int] = []
        self._stream = None
        dtype = np.dtype(KV_DTYPES.get(kv_dtype, "float16"))
        self.dtype = dtype
        self.layout = KvLayout(spec.num_layers, spec.num_kv_heads, spec.head_dim, self.capacity, dtype.itemsize)

        self._logger = trt.Logger(trt.Logger.WARNING)   # must outlive the runtime, which keeps a reference
        self._runtime = trt.Runtime(self._logger)
        self.engine = _deserialize(trt, self._runtime, engine)
        self._unified = unified_memory
        if self.engine is None:
            raise BackendUnavailable("TensorRT could not deserialize the engine (its messages above say why): "
                                     "rebuild it on this device with `edgekit engine BUNDLE`")
        self._check_io()
        self._check_memory()
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise BudgetExceeded("TensorRT could not create an execution context (out of GPU memory?): load with a "
                                 "smaller max_context or free GPU memory")
        try:
            self._stream = cuda.stream()
            self._stream_handle = int(self._stream)
            self.cache = {name: self._malloc(self.layout.buffer_bytes) for name in self.layout.names()}
            scratch_needed = not direct_kv_writes or needs_scratch(self.layout)
            self.scratch = ({name: self._malloc(self.max_seq * self.layout.row_bytes) for name in self.layout.names()}
                            if scratch_needed else None)
            self._direct = direct_kv_writes
            self._ids_dev = self._malloc(self.max_seq * 8)
            self._logits_dev = self._malloc(self.vocab * 4)
        except BaseException:
            self.close()
            raise
        self._ids = np.zeros((1, self.max_seq), np.int64)
        self._logits = np.zeros((self.vocab,), np.float32)
        self._profile: int | None = None

    # ----- load-time checks -----------------------------------------------------------------------
    def _check_io(self) -> None:
        trt, engine = self._trt, self.engine
        found = {}
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            is_input = engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
            found[name] = (is_input, np.dtype(trt.nptype(engine.get_tensor_dtype(name))))
        want = {"input_ids": (True, np.dtype(np.int64)), "logits": (False, np.dtype(np.float32))}
        for name in self.layout.names():
            want[f"past_{name}"] = (True, self.dtype)
            want[f"new_{name}"] = (False, self.dtype)
        for name, (is_input, dtype) in want.items():
            if name not in found:
                raise BundleError(f"the engine has no {'input' if is_input else 'output'} {name!r}: it was not "
                                  "built from this bundle's graph; rebuild it with `edgekit engine BUNDLE`")
            if found[name] != (is_input, dtype):
                raise BundleError(f"the engine's {name} is {found[name][1]} but the bundle says {dtype}: rebuild the "
                                  "engine with `edgekit engine BUNDLE`")
        if engine.num_optimization_profiles <= max(self.profiles.values()):
            raise BundleError(f"the engine has {engine.num_optimization_profiles} optimization profile(s), the "
                              f"manifest names {len(self.profiles)}: rebuild it with `edgekit engine BUNDLE`")

    def _check_memory(self) -> None:
        """On a discrete GPU: refuse before allocating when the cache and TensorRT's context memory exceed the
        GPU's free memory. Not on a Jetson: there cudaMemGetInfo counts neither the page cache nor other
        reclaimable memory, so it reports far less than can be allocated (a false "out of memory"), and the
        load-time budget check on MemAvailable (runtime.memory) already covers the same unified memory."""
        if self._unified:
            return
        per_context = int(getattr(self.engine, "device_memory_size_v2", 0) or
                          getattr(self.engine, "device_memory_size", 0) or 0)
        need = (2 * self.layout.layers * self.layout.buffer_bytes + per_context
                + self.max_seq * 8 + self.vocab * 4)
        free, _ = self._cuda.mem_get_info()
        if need > free:
            raise BudgetExceeded(
                f"the KV cache for {self.capacity} tokens and TensorRT's working memory need {need / 2**20:.0f} MiB "
                f"but the GPU has {free / 2**20:.0f} MiB free: load with a smaller max_context",
                needed_bytes=need, available_bytes=free)

    def _malloc(self, nbytes: int) -> int:
        ptr = self._cuda.malloc(max(int(nbytes), 1))
        self._allocations.append(ptr)
        return ptr

    # ----- the interface ----------------------------------------------------------------------------
    @property
    def kv_cache_bytes(self) -> int:
        return 2 * self.layout.layers * self.layout.buffer_bytes

    def step(self, tokens: np.ndarray) -> np.ndarray:
        """Append ``tokens`` (int64, (S,)) to the cache and return the logits of the last one, (V,) float32."""
        return self._tracked(np.asarray(tokens, dtype=np.int64).reshape(-1), self._step)

    def _step(self, tokens: np.ndarray) -> np.ndarray:
        s = int(tokens.shape[0])
        if s < 1:
            raise GenerationError("step() needs at least one token")
        if self.position + s > self.capacity:
            raise GenerationError(f"the KV cache is full ({self.capacity} tokens): start a new conversation or "
                                  "load with a larger max_context")
        logits = None
        for start in range(0, s, self.max_seq):   # longer than the prefill profile: several engine steps
            logits = self._run(tokens[start:start + self.max_seq])
        return logits

    def _run(self, tokens: np.ndarray) -> np.ndarray:
        s, cuda, ctx = int(tokens.shape[0]), self._cuda, self.context
        io = plan_step(self.position, s, self.layout, cache=self.cache, ids=self._ids_dev, logits=self._logits_dev,
                       scratch=self.scratch, profiles=self.profiles, direct_writes=self._direct)
        if io.profile != self._profile:
            # TensorRT's Python binding raises RuntimeError when the profile is refused (pyCore.cpp
            # context_set_optimization_profile_async: PY_ASSERT_RUNTIME_ERROR, otherwise returns True).
            try:
                ok = ctx.set_optimization_profile_async(io.profile, self._stream_handle)
            except RuntimeError as e:
                raise GpuStepFailed(f"TensorRT refused optimization profile {io.profile} ({e}): rebuild the "
                                    "engine with `edgekit engine BUNDLE`") from None
            if not ok:
                raise GpuStepFailed(f"TensorRT refused optimization profile {io.profile}: rebuild the engine with "
                                    "`edgekit engine BUNDLE`")
            self._profile = io.profile
        self._ids[0, :s] = tokens
        cuda.htod(self._ids_dev, self._ids, s * 8, self._stream)
        for name, shape in io.shapes.items():
            if not ctx.set_input_shape(name, shape):
                raise GenerationError(f"TensorRT refused shape {shape} for {name}: outside the engine's profiles "
                                      f"(rebuild the engine for this max_context)")
        for name, ptr in io.addresses.items():
            if not ctx.set_tensor_address(name, ptr):        # e.g. not 256-byte aligned (NvInferRuntime.h)
                raise GpuStepFailed(f"TensorRT refused the address {ptr:#x} of {name}")
        if not ctx.execute_async_v3(self._stream_handle):
            raise GpuStepFailed("the TensorRT engine failed to run a step (its messages above say why)")
        for dst, src, nbytes in io.copies:
            cuda.dtod(dst, src, nbytes, self._stream)
        cuda.dtoh(self._logits, self._logits_dev, self.vocab * 4, self._stream)
        cuda.sync(self._stream)
        self.position += s
        return self._logits.copy()

    def close(self) -> None:
        """Free the device buffers (also done when the decoder is garbage collected)."""
        cuda, allocations = self._cuda, self._allocations
        self._allocations = []
        for ptr in allocations:
            try:
                cuda.free(ptr)
            except Exception:   # freeing at exit after the driver went away: nothing left to do
                pass
        if self._stream is not None:
            try:
                cuda.destroy_stream(self._stream)
            except Exception:
                pass
            self._stream = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


# ----- from a bundle --------------------------------------------------------------------------------------
def open_engine_decoder(manifest, *, capacity: int, probe=None, trt=None,
                        cuda: CudaRuntime | None = None) -> TrtDecoder:
    """The TrtDecoder of a bundle, after checking that its engine was built for this GPU and TensorRT.

    ``probe``/``trt``/``cuda`` are for tests; by default the GPU is probed first and TensorRT imported only
    when the probe found one.
    """
    folder = str(manifest.folder)
    engine = manifest.engine
    if not engine:
        check_engine(engine, probe, None, bundle=folder)          # "no engine yet: edgekit engine ..."
    if manifest.dialect != "tensorrt":
        raise BundleError(f"bundle {folder} holds the {manifest.dialect!r} graph, which TensorRT does not run: "
                          "use the onnxruntime backend it was built for (--backend auto, onnxruntime-cpu or "
                          "onnxruntime-cuda)")
    probe = probe if probe is not None else probe_driver()
    installed = str(trt.__version__) if trt is not None else tensorrt_version()
    if installed is None and probe.ok and module_present("tensorrt"):
        trt = import_tensorrt()                   # JetPack's apt package may lack pip metadata
        installed = str(trt.__version__)
    check_engine(engine, probe, installed, bundle=folder)
    options = engine.get("options") or {}
    names = [p.get("name") for p in options.get("profiles", [])] or ["prefill", "decode"]
    profiles = {name: i for i, name in enumerate(names)}
    built_context = int(options.get("max_context") or manifest.max_context)
    if capacity > built_context:
        raise GenerationError(f"max_context {capacity} is more than the engine was built for ({built_context}): "
                              f"use max_context <= {built_context}, or rebuild the engine")
    trt = trt if trt is not None else import_tensorrt()
    cuda = cuda if cuda is not None else CudaRuntime.load()
    return TrtDecoder(manifest.path(engine["file"]), spec=manifest.spec(), capacity=capacity,
                      kv_dtype=manifest.graph.get("kv_dtype", "float16"),
                      max_seq=int(options.get("prefill_chunk") or manifest.memory.get("prefill_chunk", 256)),
                      profiles=profiles, trt=trt, cuda=cuda,
                      unified_memory=(manifest.target or {}).get("kind") == "jetson")


def _deserialize(trt, runtime, engine):
    """The ICudaEngine of ``engine`` (a path or bytes).

    A path is streamed through ``trt.IStreamReader`` (TensorRT >= 10.0: IRuntime::deserializeCudaEngine(
    IStreamReader&), NvInferRuntime.h; Python: pyCore.cpp's PyStreamReader calls ``read(size)`` and copies what
    it returns), so the engine file is never held whole in a Python bytes object next to TensorRT's own copy
    (2x the engine on an 8 GB board). TensorRT without IStreamReader gets the file's bytes.
    """
    if isinstance(engine, (bytes, bytearray, memoryview)):
        return runtime.deserialize_cuda_engine(engine)
    base = getattr(trt, "IStreamReader", None)
    if base is None:
        with open(engine, "rb") as f:
            return runtime.deserialize_cuda_engine(f.read())

    class FileReader(base):
        def __init__(self, f):
            base.__init__(self)            # pybind11 trampolines need the base initialised explicitly
            self._f = f

        def read(self, size):
            return self._f.read(int(size))

    with open(engine, "rb") as f:
        return runtime.deserialize_cuda_engine(FileReader(f))

