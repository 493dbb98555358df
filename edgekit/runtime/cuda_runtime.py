"""The few CUDA runtime calls the TensorRT backend makes, through cuda-python, with errors turned into edgekit's.

cuda-python is imported by :meth:`CudaRuntime.load` only (the backend calls it after the GPU probe succeeded).
"""

from __future__ import annotations

import numpy as np

from ..errors import BackendUnavailable, BudgetExceeded


class CudaRuntime:
    """The few CUDA runtime calls the backend makes, through cuda-python, with errors turned into ours."""

    def __init__(self, cudart):
        self.rt = cudart

    @classmethod
    def load(cls) -> CudaRuntime:
        try:
            from cuda.bindings import runtime as cudart  # cuda-python >= 12.6 (cuda-bindings)
        except ImportError:
            try:
                from cuda import cudart  # older cuda-python
            except ImportError:
                raise BackendUnavailable("the TensorRT backend needs cuda-python: pip install cuda-python "
                                         "(or use the onnxruntime-cpu backend: --backend onnxruntime-cpu)") from None
        return cls(cudart)

    def _ok(self, result, what: str):
        err, *rest = result if isinstance(result, tuple) else (result,)
        if err != self.rt.cudaError_t.cudaSuccess:
            name = getattr(err, "name", str(err))
            if "MemoryAllocation" in name:
                raise BudgetExceeded(f"{what} failed: the GPU is out of memory ({name}); load with a smaller "
                                     "max_context or free GPU memory")
            raise BackendUnavailable(f"{what} failed with {name}: check the GPU with `edgekit doctor`")
        return rest[0] if len(rest) == 1 else tuple(rest)

    def malloc(self, nbytes: int) -> int:
        return int(self._ok(self.rt.cudaMalloc(int(nbytes)), f"cudaMalloc({nbytes})"))

    def free(self, ptr: int) -> None:
        self._ok(self.rt.cudaFree(ptr), "cudaFree")

    def stream(self):
        return self._ok(self.rt.cudaStreamCreate(), "cudaStreamCreate")

    def destroy_stream(self, stream) -> None:
        self._ok(self.rt.cudaStreamDestroy(stream), "cudaStreamDestroy")

    def htod(self, dst: int, host: np.ndarray, nbytes: int, stream) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        self._ok(self.rt.cudaMemcpyAsync(dst, host.ctypes.data, nbytes, kind, stream), "cudaMemcpyAsync(HtoD)")

    def dtoh(self, host: np.ndarray, src: int, nbytes: int, stream) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self._ok(self.rt.cudaMemcpyAsync(host.ctypes.data, src, nbytes, kind, stream), "cudaMemcpyAsync(DtoH)")

    def dtod(self, dst: int, src: int, nbytes: int, stream) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice
        self._ok(self.rt.cudaMemcpyAsync(dst, src, nbytes, kind, stream), "cudaMemcpyAsync(DtoD)")

    def sync(self, stream) -> None:
        self._ok(self.rt.cudaStreamSynchronize(stream), "cudaStreamSynchronize")

    def mem_get_info(self) -> tuple[int, int]:
        free, total = self._ok(self.rt.cudaMemGetInfo(), "cudaMemGetInfo")
        return int(free), int(total)
