"""Is there a usable NVIDIA GPU, and which TensorRT is installed? Asked without CUDA libraries or TensorRT.

Why a probe of its own: TensorRT and cuda-python do not fail cleanly without a GPU. Creating a TensorRT
runtime or builder on a machine with no usable driver prints "CUDA initialization failure" and returns an
object that segfaults when used, so nothing in edgekit touches TensorRT before :func:`probe_driver` says
"ok". The probe loads ``libcuda.so.1`` with ctypes (no CUDA toolkit, no Python package) and calls the
driver API directly: cuInit, cuDriverGetVersion, cuDeviceGetCount, cuDeviceGet, cuDeviceGetAttribute
(compute capability), cuDeviceGetName, cuDeviceTotalMem_v2. It tells apart:

- ``no-driver``    libcuda.so.1 cannot be loaded: no NVIDIA driver (or a container started without GPU access)
- ``stub-driver``  cuInit returns CUDA_ERROR_STUB_LIBRARY (34): the toolkit's stub libcuda, not a driver
- ``no-device``    cuInit or cuDeviceGetCount finds no GPU (CUDA_ERROR_NO_DEVICE, 100, or a count of 0)
- ``error``        any other failure (e.g. CUDA_ERROR_INSUFFICIENT_DRIVER, 35), named
- ``ok``           at least one GPU, with its compute capability

Versions of TensorRT are read from installed package metadata, never by importing it (importing tensorrt
loads its CUDA libraries). Standard library only: the TensorRT backend probes before it loads an engine;
``edgekit doctor``'s machine report (:mod:`edgekit.gpu.probe`) builds on this.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.metadata
import importlib.util
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

# CUresult values the probe distinguishes (cuda.h).
CUDA_SUCCESS = 0
CUDA_ERROR_NOT_INITIALIZED = 3
CUDA_ERROR_STUB_LIBRARY = 34
CUDA_ERROR_INSUFFICIENT_DRIVER = 35
CUDA_ERROR_NO_DEVICE = 100
_ERROR_NAMES = {1: "CUDA_ERROR_INVALID_VALUE", 2: "CUDA_ERROR_OUT_OF_MEMORY", 3: "CUDA_ERROR_NOT_INITIALIZED",
                34: "CUDA_ERROR_STUB_LIBRARY", 35: "CUDA_ERROR_INSUFFICIENT_DRIVER",
                46: "CUDA_ERROR_DEVICES_UNAVAILABLE", 100: "CUDA_ERROR_NO_DEVICE",
                101: "CUDA_ERROR_INVALID_DEVICE", 304: "CUDA_ERROR_OPERATING_SYSTEM",
                999: "CUDA_ERROR_UNKNOWN"}
# CUdevice_attribute values (cuda.h).
ATTR_CC_MAJOR = 75
ATTR_CC_MINOR = 76

LIBCUDA_NAMES = ("libcuda.so.1", "libcuda.so")
STATUSES = ("ok", "no-driver", "stub-driver", "no-device", "error")

# Python distributions that provide the `tensorrt` module, most common first. JetPack installs it from
# the python3-libnvinfer Debian package; desktops from PyPI (the tensorrt meta package pulls tensorrt-cu12).
TENSORRT_DISTS = ("tensorrt", "tensorrt-cu12", "tensorrt_cu12", "tensorrt-cu13", "tensorrt_cu13")

_FIX_ACCESS = ("install the NVIDIA driver (on Jetson it comes with JetPack), or start the container with "
               "--runtime nvidia (Jetson) / --gpus all (desktop)")


# ----- the driver ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GpuDevice:
    index: int
    name: str
    compute_capability: tuple[int, int]
    total_memory_bytes: int

    @property
    def sm(self) -> str:
        """``"8.7"``."""
        return f"{self.compute_capability[0]}.{self.compute_capability[1]}"

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "name": self.name, "compute_capability": self.sm,
                "total_memory_bytes": self.total_memory_bytes}


@dataclass(frozen=True)
class DriverProbe:
    """What the driver said. ``detail`` is one line for people; ``status`` is for code."""

    status: str
    detail: str
    library: str | None = None            # the libcuda that was loaded
    driver_version: str | None = None     # CUDA version the driver supports, "12.6"
    cuda_error: int | None = None         # the CUresult that decided the status, if any
    devices: tuple[GpuDevice, ...] = ()

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def device_with_sm(self, sm: str | None) -> GpuDevice | None:
        return next((d for d in self.devices if d.sm == sm), None)

    def to_dict(self) -> dict[str, Any]:
        return {"status": self.status, "detail": self.detail, "library": self.library,
                "driver_version": self.driver_version, "cuda_error": self.cuda_error,
                "devices": [d.to_dict() for d in self.devices]}


def error_name(code: int) -> str:
    return _ERROR_NAMES.get(code, f"CUresult {code}")


def _default_load(name: str):
    return ctypes.CDLL(name)


def _load_libcuda(load: Callable[[str], Any]) -> tuple[Any, str] | tuple[None, str]:
    """(library, name) or (None, why not)."""
    reasons = []
    names = list(LIBCUDA_NAMES)
    found = ctypes.util.find_library("cuda") if load is _default_load else None
    if found and found not in names:
        names.append(found)
    for name in names:
        try:
            return load(name), name
        except OSError as e:
            text = str(e).splitlines()[0] if str(e) else ""
            reasons.append(f"{name} not found" if not text or "No such file" in text else text)
    return None, reasons[0] if reasons else "libcuda.so.1 not found"


def probe_driver(load: Callable[[str], Any] | None = None) -> DriverProbe:
    """Ask the NVIDIA driver, through ctypes, whether there is a usable GPU. Never raises.

    ``load`` opens a shared library by name (``ctypes.CDLL`` by default); tests pass a stand-in.
    """
    load = load or _default_load
    lib, name = _load_libcuda(load)
    if lib is None:
        return DriverProbe("no-driver", f"no NVIDIA GPU driver ({name}): {_FIX_ACCESS}")
    try:
        return _ask_driver(lib, name)
    except (AttributeError, OSError, ValueError, TypeError) as e:
        # A libcuda without the expected symbols is not a driver edgekit can use; say so instead of crashing.
        return DriverProbe("error", f"{name} does not behave like the NVIDIA driver ({type(e).__name__}: "
                                    f"{str(e)[:120]}): reinstall the driver", library=name)


def _ask_driver(lib, name: str) -> DriverProbe:
    version = ctypes.c_int(0)
    driver_version = None
    if lib.cuDriverGetVersion(ctypes.byref(version)) == CUDA_SUCCESS and version.value > 0:
        driver_version = f"{version.value // 1000}.{(version.value % 1000) // 10}"   # 12060 -> "12.6"

    rc = lib.cuInit(0)
    if rc == CUDA_ERROR_STUB_LIBRARY:
        return DriverProbe("stub-driver", f"{name} is the CUDA toolkit's stub library, not a GPU driver "
                                          f"(cuInit: CUDA_ERROR_STUB_LIBRARY): {_FIX_ACCESS}",
                           library=name, driver_version=driver_version, cuda_error=rc)
    if rc == CUDA_ERROR_NO_DEVICE:
        return _no_device(name, driver_version, rc)
    if rc == CUDA_ERROR_INSUFFICIENT_DRIVER:
        return DriverProbe("error", f"the NVIDIA driver ({driver_version or 'unknown version'}) is too old for "
                                    "this CUDA (cuInit: CUDA_ERROR_INSUFFICIENT_DRIVER): upgrade the driver "
                                    "(on Jetson, JetPack)", library=name, driver_version=driver_version,
                           cuda_error=rc)
    if rc != CUDA_SUCCESS:
        return DriverProbe("error", f"cuInit failed with {error_name(rc)} ({rc}): the GPU driver is installed "
                                    "but not usable; check `nvidia-smi` (desktop) or `tegrastats` (Jetson) and "
                                    "dmesg", library=name, driver_version=driver_version, cuda_error=rc)

    count = ctypes.c_int(0)
    rc = lib.cuDeviceGetCount(ctypes.byref(count))
    if rc == CUDA_ERROR_NO_DEVICE or (rc == CUDA_SUCCESS and count.value == 0):
        return _no_device(name, driver_version, rc)
    if rc != CUDA_SUCCESS:
        return DriverProbe("error", f"cuDeviceGetCount failed with {error_name(rc)} ({rc})", library=name,
                           driver_version=driver_version, cuda_error=rc)

    devices = []
    for index in range(count.value):
        device = ctypes.c_int(0)
        rc = lib.cuDeviceGet(ctypes.byref(device), index)
        if rc != CUDA_SUCCESS:
            return DriverProbe("error", f"cuDeviceGet({index}) failed with {error_name(rc)} ({rc})", library=name,
                               driver_version=driver_version, cuda_error=rc)
        major, minor = ctypes.c_int(0), ctypes.c_int(0)
        rc = lib.cuDeviceGetAttribute(ctypes.byref(major), ATTR_CC_MAJOR, device)
        rc = rc or lib.cuDeviceGetAttribute(ctypes.byref(minor), ATTR_CC_MINOR, device)
        if rc != CUDA_SUCCESS:
            return DriverProbe("error", f"cannot read the compute capability of GPU {index} "
                                        f"({error_name(rc)})", library=name, driver_version=driver_version,
                               cuda_error=rc)
        raw = ctypes.create_string_buffer(256)
        gpu_name = raw.value.decode("utf-8", "replace") if lib.cuDeviceGetName(raw, 256, device) == 0 else "?"
        total = ctypes.c_size_t(0)
        memory = total.value if lib.cuDeviceTotalMem_v2(ctypes.byref(total), device) == 0 else 0
        devices.append(GpuDevice(index, gpu_name or "?", (major.value, minor.value), int(memory)))
    first = devices[0]
    more = f" (+{len(devices) - 1} more)" if len(devices) > 1 else ""
    return DriverProbe("ok", f"{first.name}, compute capability {first.sm}{more}, driver supports CUDA "
                             f"{driver_version or '?'}", library=name, driver_version=driver_version,
                       devices=tuple(devices))


def _no_device(name: str, driver_version: str | None, rc: int) -> DriverProbe:
    return DriverProbe("no-device", f"the NVIDIA driver is installed but sees no GPU ({error_name(rc)}): a "
                                    "container started without --runtime nvidia / --gpus all, or "
                                    "CUDA_VISIBLE_DEVICES hides the GPU", library=name,
                       driver_version=driver_version, cuda_error=rc)


# ----- packages -------------------------------------------------------------------------------------------
def package_version(names: Iterable[str]) -> tuple[str, str] | None:
    """(distribution, version) of the first installed distribution among ``names``; never imports it."""
    for name in names:
        try:
            return name, importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        except Exception:   # a broken metadata folder must not break the probe
            continue
    return None


def module_present(name: str) -> bool:
    """Whether ``import name`` would find something, without importing it."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def tensorrt_version() -> str | None:
    """The installed TensorRT Python package's version, from metadata; None when there is none."""
    found = package_version(TENSORRT_DISTS)
    return found[1] if found else None
