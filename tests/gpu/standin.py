"""Recording stand-ins for the ``tensorrt`` module, cuda-python's runtime, and a GPU probe, for tests without a GPU.

- :func:`make_trt` returns a module-like object with the TensorRT 10 Python API surface edgekit uses. Every
  call is appended to ``trt.calls`` as ``(name, args)`` so tests can check names, arguments and order. Its
  ONNX parser applies TensorRT's parser rules to the graph, through edgekit.export.trt_check (the rules, read from
  onnx-tensorrt's importers, are written down once: there), and fails like the real one (parse_from_file returns
  False, the errors are in get_error); then it reads the real graph's inputs (dynamic dims become -1, as TensorRT
  reports them); its
  "serialized engine" is JSON naming the ONNX file and the profiles; its execution context checks input
  shapes against the active profile, refuses tensor addresses that are not 256-byte aligned (returns False, as
  setTensorAddress does: NvInferRuntime.h), raises RuntimeError for a refused optimization profile (pyCore.cpp
  context_set_optimization_profile_async), refuses overlapping output/input memory, and computes with
  onnxruntime on the CPU, reading and writing :class:`FakeCuda` memory at the addresses it was given. So a
  decoder that passes the wrong rows or addresses gets wrong logits, as it would on a GPU.
- :class:`FakeCuda` has the methods of :class:`edgekit.runtime.trt_backend.CudaRuntime` over a numpy arena
  with bounds-checked, 256-byte-aligned allocations.
- :func:`gpu_probe` returns a DriverProbe that says "ok" for a named GPU.
"""

from __future__ import annotations

import enum
import json
from types import SimpleNamespace

import numpy as np

from edgekit.runtime.gpu_driver import DriverProbe, GpuDevice

ORIN = ("Orin", (8, 7), 7_620_000_000)
RTX_4090 = ("NVIDIA GeForce RTX 4090", (8, 9), 25_300_000_000)


def gpu_probe(name_cc_mem=ORIN) -> DriverProbe:
    name, cc, mem = name_cc_mem
    return DriverProbe("ok", f"{name}, compute capability {cc[0]}.{cc[1]}", library="libcuda.so.1",
                       driver_version="12.6", devices=(GpuDevice(0, name, cc, mem),))


# ----- CUDA ---------------------------------------------------------------------------------------------
class FakeCuda:
    BASE = 0x7F00_0000_0000

    def __init__(self, size: int = 16 << 20, free: int | None = None):
        self.arena = np.zeros(size, np.uint8)
        self.next = 0
        self.allocs: dict[int, int] = {}      # address -> size
        self.freed: list[int] = []
        self.calls: list[tuple] = []
        self.free_bytes = size if free is None else free

    def _offset(self, ptr: int, nbytes: int) -> int:
        for base, size in self.allocs.items():
            if base <= ptr and ptr + nbytes <= base + size:
                return ptr - self.BASE
        raise AssertionError(f"device access {ptr:#x}+{nbytes} is outside every live allocation")

    def view(self, ptr: int, nbytes: int) -> np.ndarray:
        off = self._offset(ptr, nbytes)
        return self.arena[off:off + nbytes]

    # the CudaRuntime interface
    def malloc(self, nbytes: int) -> int:
        ptr = self.BASE + self.next
        self.next += -(-nbytes // 256) * 256
        assert self.next <= self.arena.size, "fake arena exhausted"
        self.allocs[ptr] = nbytes
        self.calls.append(("malloc", nbytes))
        return ptr

    def free(self, ptr: int) -> None:
        assert ptr in self.allocs, f"free of unknown pointer {ptr:#x}"
        del self.allocs[ptr]
        self.freed.append(ptr)

    def stream(self):
        self.calls.append(("stream",))
        return 0x5EED

    def destroy_stream(self, stream) -> None:
        self.calls.append(("destroy_stream", stream))

    def htod(self, dst: int, host: np.ndarray, nbytes: int, stream) -> None:
        self.view(dst, nbytes)[:] = np.ascontiguousarray(host).view(np.uint8).reshape(-1)[:nbytes]
        self.calls.append(("htod", nbytes))

    def dtoh(self, host: np.ndarray, src: int, nbytes: int, stream) -> None:
        host.view(np.uint8).reshape(-1)[:nbytes] = self.view(src, nbytes)
        self.calls.append(("dtoh", nbytes))

    def dtod(self, dst: int, src: int, nbytes: int, stream) -> None:
        self.view(dst, nbytes)[:] = self.view(src, nbytes).copy()
        self.calls.append(("dtod", dst, src, nbytes))

    def sync(self, stream) -> None:
        self.calls.append(("sync",))

    def mem_get_info(self) -> tuple[int, int]:
        return self.free_bytes, self.arena.size


# ----- TensorRT -----------------------------------------------------------------------------------------
class DataType(enum.Enum):
    FLOAT = 0
    HALF = 1
    INT64 = 10


_NP = {DataType.FLOAT: np.float32, DataType.HALF: np.float16, DataType.INT64: np.int64}
_FROM_ONNX = {1: DataType.FLOAT, 10: DataType.HALF, 7: DataType.INT64}


class TensorIOMode(enum.Enum):
    NONE = 0
    INPUT = 1
    OUTPUT = 2


def make_trt(version: str = "10.3.0", *, parse_ok: bool = True, build_ok: bool = True, cuda: FakeCuda | None = None):
    """A fresh stand-in module; ``trt.calls`` records the calls; ``cuda`` backs execution contexts."""
    calls: list[tuple] = []
    trt = SimpleNamespace(__version__=version, calls=calls, cuda=cuda, DataType=DataType,
                          TensorIOMode=TensorIOMode)

    def rec(name, *args):
        calls.append((name, args))

    class Logger:
        WARNING = "WARNING"

        def __init__(self, severity):
            rec("Logger", severity)

    class NetworkDefinitionCreationFlag(enum.IntEnum):
        EXPLICIT_BATCH = 0
        STRONGLY_TYPED = 1

    class MemoryPoolType(enum.Enum):
        WORKSPACE = 0

    class BuilderFlag(enum.Enum):
        FP16 = 0
        INT8 = 1
        TF32 = 7

    class IProgressMonitor:
        def __init__(self):
            rec("IProgressMonitor.__init__")

    class Tensor:
        def __init__(self, name, shape):
            self.name, self.shape = name, shape

    class Network:
        def __init__(self, flags):
            self.flags, self.inputs = flags, []

        @property
        def num_inputs(self):
            return len(self.inputs)

        def get_input(self, i):
            return self.inputs[i]

    class OnnxParser:
        def __init__(self, network, logger):
            rec("OnnxParser", network, logger)
            self.network = network
            self.errors = [] if parse_ok else [f"In node 3 (importModel): UNSUPPORTED_NODE: fake error {i}\nmore"
                                               for i in range(2)]

        @property
        def num_errors(self):
            return len(self.errors)

        def parse_from_file(self, path):
            rec("parse_from_file", path)
            if not parse_ok:
                return False
            import onnx

            from edgekit.export.trt_check import check_tensorrt_graph

            problems = check_tensorrt_graph(path, tensorrt=version).problems
            if problems:
                self.errors = [f"ERROR: {p}" for p in problems]
                return False

            model = onnx.load(path, load_external_data=False)
            for v in model.graph.input:
                dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in v.type.tensor_type.shape.dim)
                self.network.inputs.append(Tensor(v.name, dims))
            self.network.onnx_path = path
            return True

        def get_error(self, i):
            return self.errors[i]

    class Profile:
        def __init__(self):
            self.shapes = {}

        def set_shape(self, name, mn, opt, mx):
            rec("set_shape", name, tuple(mn), tuple(opt), tuple(mx))
            assert all(a <= b <= c for a, b, c in zip(mn, opt, mx)), (name, mn, opt, mx)
            self.shapes[name] = (tuple(mn), tuple(opt), tuple(mx))

    class TimingCache:
        def __init__(self, data):
            self.data = bytes(data)

        def serialize(self):
            rec("serialize")
            return self.data + b"+timings"

    class Config:
        def __init__(self):
            self.profiles, self.cache, self.flags = [], None, []
            self._monitor = None

        def set_memory_pool_limit(self, pool, size):
            rec("set_memory_pool_limit", pool, size)

        def set_flag(self, flag):
            rec("set_flag", flag)
            self.flags.append(flag)

        def add_optimization_profile(self, profile):
            rec("add_optimization_profile", profile)
            self.profiles.append(profile)
            return len(self.profiles) - 1

        def create_timing_cache(self, data):
            rec("create_timing_cache", bytes(data))
            return TimingCache(data)

        def set_timing_cache(self, cache, ignore_mismatch):
            rec("set_timing_cache", cache, ignore_mismatch)
            self.cache = cache
            return not cache.data.startswith(b"garbage")

        def get_timing_cache(self):
            rec("get_timing_cache")
            return self.cache

        @property
        def progress_monitor(self):
            return self._monitor

        @progress_monitor.setter
        def progress_monitor(self, monitor):
            rec("progress_monitor", monitor)
            assert isinstance(monitor, IProgressMonitor)
            self._monitor = monitor

    class Builder:
        def __init__(self, logger):
            rec("Builder", logger)

        def create_network(self, flags):
            rec("create_network", flags)
            return Network(flags)

        def create_builder_config(self):
            rec("create_builder_config")
            return Config()

        def create_optimization_profile(self):
            rec("create_optimization_profile")
            return Profile()

        def build_serialized_network(self, network, config):
            rec("build_serialized_network", network, config)
            if config.progress_monitor is not None:
                m = config.progress_monitor
                m.phase_start("Building engine", None, 3)
                m.phase_start("Computing costs", "Building engine", 1)
                m.phase_start("Timing layer 7", "Computing costs", 4)       # too deep to be shown
                m.step_complete("Timing layer 7", 0)
                m.phase_finish("Timing layer 7")
                m.step_complete("Computing costs", 0)
                m.phase_finish("Computing costs")
                for step in range(3):
                    m.step_complete("Building engine", step)
                m.phase_finish("Building engine")
            if not build_ok:
                return None
            assert network.flags & (1 << 1), "the network must be strongly typed"
            return memoryview(json.dumps({"onnx": network.onnx_path,
                                          "profiles": [p.shapes for p in config.profiles]}).encode())

    def nptype(dtype):
        return _NP[dtype]

    class Runtime:
        def __init__(self, logger):
            rec("Runtime", logger)

        def deserialize_cuda_engine(self, data):
            if isinstance(data, IStreamReader):
                rec("deserialize_cuda_engine", "stream")
                chunks = []
                while True:                       # TensorRT reads in pieces; a short read ends the stream
                    piece = bytes(data.read(64))
                    chunks.append(piece)
                    if len(piece) < 64:
                        break
                data = b"".join(chunks)
            else:
                rec("deserialize_cuda_engine", "bytes")
            try:
                doc = json.loads(bytes(data))
            except ValueError:
                return None
            return Engine(doc)

    class Engine:
        def __init__(self, doc):
            import onnx
            import onnxruntime as ort

            self.profiles = [{k: tuple(map(tuple, v)) for k, v in p.items()} for p in doc["profiles"]]
            model = onnx.load(doc["onnx"], load_external_data=False)
            self.io = {}
            for v in model.graph.input:
                self.io[v.name] = (TensorIOMode.INPUT, _FROM_ONNX[v.type.tensor_type.elem_type])
            for v in model.graph.output:
                self.io[v.name] = (TensorIOMode.OUTPUT, _FROM_ONNX[v.type.tensor_type.elem_type])
            self.session = ort.InferenceSession(doc["onnx"], providers=["CPUExecutionProvider"])
            self.device_memory_size_v2 = 1 << 16

        num_io_tensors = property(lambda self: len(self.io))
        num_optimization_profiles = property(lambda self: len(self.profiles))

        def get_tensor_name(self, i):
            return list(self.io)[i]

        def get_tensor_mode(self, name):
            return self.io[name][0]

        def get_tensor_dtype(self, name):
            return self.io[name][1]

        def create_execution_context(self):
            rec("create_execution_context")
            return Context(self)

    class Context:
        def __init__(self, engine):
            self.engine, self.profile, self.shapes, self.addresses = engine, 0, {}, {}
            self.runs = 0

        def set_optimization_profile_async(self, index, stream):
            rec("set_optimization_profile_async", index, stream)
            if not 0 <= index < len(self.engine.profiles):
                raise RuntimeError("Error in set optimization profile async.")      # pyCore.cpp, TensorRT 10.3
            self.profile, self.shapes = index, {}
            return True

        def set_input_shape(self, name, shape):
            shape = tuple(shape)
            mn, _, mx = self.engine.profiles[self.profile][name]
            if not all(a <= s <= b for a, s, b in zip(mn, shape, mx)) or len(shape) != len(mn):
                return False
            self.shapes[name] = shape
            return True

        def set_tensor_address(self, name, ptr):
            assert name in self.engine.io, name
            if int(ptr) % 256:                    # "The pointer must have at least 256-byte alignment."
                return False
            self.addresses[name] = int(ptr)
            return True

        def execute_async_v3(self, stream_handle):
            rec("execute_async_v3", stream_handle)
            assert isinstance(stream_handle, int)
            cuda = trt.cuda
            engine = self.engine
            feeds, regions = {}, []
            for name, (mode, dtype) in engine.io.items():
                assert name in self.addresses, f"no address for {name}"
                if mode is TensorIOMode.INPUT:
                    assert name in self.shapes, f"no shape for {name}"
                    shape, dt = self.shapes[name], np.dtype(_NP[dtype])
                    nbytes = int(np.prod(shape)) * dt.itemsize
                    feeds[name] = cuda.view(self.addresses[name], nbytes).copy().view(dt).reshape(shape)
                    regions.append((self.addresses[name], nbytes, name))
            outputs = dict(zip([o.name for o in engine.session.get_outputs()], engine.session.run(None, feeds)))
            written = []
            for name, value in outputs.items():
                value = np.ascontiguousarray(value)
                start, n = self.addresses[name], value.nbytes
                for base, size, other in regions + written:
                    if n and size and start < base + size and base < start + n:
                        raise AssertionError(f"output {name} overlaps {other}")
                written.append((start, n, name))
                if n:
                    cuda.view(start, n)[:] = value.view(np.uint8).reshape(-1)
            self.runs += 1
            return True

    class IStreamReader:
        def __init__(self):
            rec("IStreamReader.__init__")

        def read(self, size):                     # overridden by the reader; the base reads nothing
            return b""

    trt.Logger, trt.Builder, trt.OnnxParser, trt.Runtime = Logger, Builder, OnnxParser, Runtime
    trt.IStreamReader = IStreamReader
    trt.NetworkDefinitionCreationFlag, trt.MemoryPoolType, trt.BuilderFlag = (NetworkDefinitionCreationFlag,
                                                                              MemoryPoolType, BuilderFlag)
    trt.IProgressMonitor, trt.nptype = IProgressMonitor, nptype
    return trt


def call_names(trt) -> list[str]:
    return [c[0] for c in trt.calls]
