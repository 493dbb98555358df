"""What this machine has: NVIDIA driver and GPUs, Jetson release, TensorRT, onnxruntime, memory.

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

Versions of TensorRT and cuda-python are read from installed package metadata, never by importing them
(importing tensorrt loads its CUDA libraries). Only the standard library is used here; onnxruntime is
imported by :func:`onnxruntime_info` alone, and only when asked.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.metadata
import importlib.util
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
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
CUDA_PYTHON_DISTS = ("cuda-python", "cuda-bindings", "cuda_bindings")
ORT_DISTS = ("onnxruntime-gpu", "onnxruntime_gpu", "onnxruntime")

# L4T release -> JetPack release (NVIDIA's JetPack archive). Older L4T releases name the major only.
_JETPACK = {(36, 2): "6.0 DP", (36, 3): "6.0", (36, 4, 0): "6.1", (36, 4, 3): "6.2", (36, 4, 4): "6.2.1"}
_JETPACK_MAJOR = {35: "5.1", 36: "6", 34: "5.0"}

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


# ----- Jetson ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class JetsonInfo:
    l4t: str                    # "36.4.3"
    jetpack: str | None         # "6.2"
    model: str | None           # /proc/device-tree/model, e.g. "NVIDIA Jetson Orin Nano Developer Kit"

    def to_dict(self) -> dict[str, Any]:
        return {"l4t": self.l4t, "jetpack": self.jetpack, "model": self.model}


_TEGRA = re.compile(r"#\s*R(\d+)\s*\(release\),\s*REVISION:\s*([0-9.]+)")


def parse_tegra_release(text: str) -> str | None:
    """``"# R36 (release), REVISION: 4.3, GCID: ..."`` -> ``"36.4.3"``; None when it is not that format."""
    m = _TEGRA.search(text)
    return f"{m.group(1)}.{m.group(2)}" if m else None


def jetpack_for_l4t(l4t: str) -> str | None:
    parts = tuple(int(p) for p in l4t.split(".") if p.isdigit())
    for n in (3, 2):
        if parts[:n] in _JETPACK:
            return _JETPACK[parts[:n]]
    return _JETPACK_MAJOR.get(parts[0]) if parts else None


def read_jetson(root: Path = Path("/")) -> JetsonInfo | None:
    """The Jetson's L4T/JetPack release, or None on anything that is not a Jetson."""
    try:
        text = (root / "etc/nv_tegra_release").read_text(errors="replace")
    except OSError:
        return None
    l4t = parse_tegra_release(text)
    if l4t is None:
        return None
    try:
        model = (root / "proc/device-tree/model").read_bytes().rstrip(b"\x00\n").decode("utf-8", "replace") or None
    except OSError:
        model = None
    return JetsonInfo(l4t, jetpack_for_l4t(l4t), model)


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


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def onnxruntime_distributions(path: list[str] | None = None) -> tuple[tuple[str, str], ...]:
    """(name, version) of every installed distribution that provides the ``onnxruntime`` module.

    onnxruntime, onnxruntime-gpu (and -directml, -openvino, ...) all install the same ``onnxruntime``
    package folder: with two of them installed, the files are whichever was installed last, mixed with
    the other's, and the metadata of neither describes what imports. ``path`` is for tests.
    """
    found = {}
    for dist in importlib.metadata.distributions(**({"path": path} if path is not None else {})):
        try:
            name = _normalized(dist.metadata["Name"] or "")
            if name != "onnxruntime" and not name.startswith("onnxruntime-"):
                continue
            files = dist.files
            # a RECORD names the files; without one, trust the name unless it is a known add-on package
            provides = (any(str(f).replace("\\", "/") == "onnxruntime/__init__.py" for f in files) if files
                        else name not in ("onnxruntime-genai", "onnxruntime-extensions"))
            if provides:
                found.setdefault(name, dist.version)
        except Exception:   # a broken metadata folder must not break the probe
            continue
    return tuple(sorted(found.items()))


def onnxruntime_clash(dists: Iterable[tuple[str, str]]) -> str | None:
    """The one-line fix when several onnxruntime distributions share the module, else None."""
    dists = list(dists)
    if len(dists) < 2:
        return None
    names = [n for n, _ in dists]
    shown = " and ".join(f"{n} {v}" for n, v in dists)
    keep = "onnxruntime-gpu" if "onnxruntime-gpu" in names else names[-1]
    return (f"{shown} are both installed and overwrite each other's files in the one onnxruntime module: "
            f"uninstall both (pip uninstall -y {' '.join(names)}), then install one (pip install {keep} for "
            "the GPU, or onnxruntime for the CPU only)")


def onnxruntime_info() -> tuple[str | None, tuple[str, ...]]:
    """(version, execution providers of this build). The providers are the build's list: onnxruntime-gpu
    lists CUDA and TensorRT even on a machine without a GPU, so they say what could run, not what will."""
    found = package_version(ORT_DISTS)
    try:
        import onnxruntime

        # the module's own version first: with two distributions installed, metadata names the wrong one
        return (getattr(onnxruntime, "__version__", None) or (found[1] if found else None),
                tuple(onnxruntime.get_available_providers()))
    except Exception:   # not installed or broken: the report says so
        return (found[1] if found else None), ()


# ----- memory ---------------------------------------------------------------------------------------------
def read_meminfo(root: Path = Path("/")) -> dict[str, int]:
    """MemTotal, MemAvailable, CmaTotal, CmaFree (those present) in bytes from /proc/meminfo."""
    out: dict[str, int] = {}
    try:
        lines = (root / "proc/meminfo").read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        key, _, rest = line.partition(":")
        if key in ("MemTotal", "MemAvailable", "CmaTotal", "CmaFree"):
            parts = rest.split()
            if parts and parts[0].isdigit():
                out[key] = int(parts[0]) * (1024 if len(parts) > 1 and parts[1].lower() == "kb" else 1)
    return out


# ----- the whole machine ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class MachineReport:
    driver: DriverProbe
    jetson: JetsonInfo | None
    tensorrt: str | None                 # version from metadata
    tensorrt_module: bool                # `import tensorrt` would find a module (even without metadata)
    cuda_python: str | None
    onnxruntime: str | None
    ort_providers: tuple[str, ...]
    memory: dict[str, int] = field(default_factory=dict)
    ort_distributions: tuple[tuple[str, str], ...] = ()   # more than one is a clash (onnxruntime_clash)

    def to_dict(self) -> dict[str, Any]:
        return {"driver": self.driver.to_dict(), "jetson": self.jetson.to_dict() if self.jetson else None,
                "tensorrt": self.tensorrt, "tensorrt_module": self.tensorrt_module,
                "cuda_python": self.cuda_python, "onnxruntime": self.onnxruntime,
                "onnxruntime_providers": list(self.ort_providers),
                "onnxruntime_distributions": [{"name": n, "version": v} for n, v in self.ort_distributions],
                "onnxruntime_clash": onnxruntime_clash(self.ort_distributions),
                "memory": {"total_bytes": self.memory.get("MemTotal"),
                           "available_bytes": self.memory.get("MemAvailable"),
                           "cma_total_bytes": self.memory.get("CmaTotal"),
                           "cma_free_bytes": self.memory.get("CmaFree")}}


def machine_report(*, root: Path = Path("/"), load: Callable[[str], Any] | None = None,
                   ort: tuple[str | None, tuple[str, ...]] | None = None) -> MachineReport:
    """Everything ``edgekit doctor`` shows. Arguments are for tests (a fake filesystem root, libcuda, ort)."""
    cuda_py = package_version(CUDA_PYTHON_DISTS)
    ort_version, providers = ort if ort is not None else onnxruntime_info()
    return MachineReport(driver=probe_driver(load), jetson=read_jetson(root), tensorrt=tensorrt_version(),
                         tensorrt_module=module_present("tensorrt"), cuda_python=cuda_py[1] if cuda_py else None,
                         onnxruntime=ort_version, ort_providers=providers, memory=read_meminfo(root),
                         ort_distributions=onnxruntime_distributions())


@dataclass(frozen=True)
class BackendSupport:
    backend: str
    usable: bool
    reason: str


def backend_support(report: MachineReport) -> tuple[BackendSupport, ...]:
    """Which of edgekit's backends can run here, each with the reason (the decision ``doctor`` prints)."""
    d = report.driver
    clash = onnxruntime_clash(report.ort_distributions)
    cpu = (BackendSupport("onnxruntime-cpu", True, f"onnxruntime {report.onnxruntime}")
           if report.onnxruntime else
           BackendSupport("onnxruntime-cpu", False, "onnxruntime is not installed: pip install onnxruntime"))
    if clash and "CUDAExecutionProvider" not in report.ort_providers:
        cuda = BackendSupport("onnxruntime-cuda", False, f"the onnxruntime module has no CUDA provider because {clash}")
    elif "CUDAExecutionProvider" not in report.ort_providers:
        cuda = BackendSupport("onnxruntime-cuda", False, "this onnxruntime has no CUDA provider: install "
                              "onnxruntime-gpu (on Jetson from NVIDIA's Jetson wheels)")
    elif not d.ok:
        cuda = BackendSupport("onnxruntime-cuda", False, f"the CUDA provider is built in but there is no usable "
                              f"GPU (driver status: {d.status})")
    else:
        cuda = BackendSupport("onnxruntime-cuda", True, f"CUDA provider on {d.devices[0].name}")
    if not d.ok:
        trt = BackendSupport("tensorrt", False, f"no usable GPU (driver status: {d.status})")
    elif not (report.tensorrt or report.tensorrt_module):
        trt = BackendSupport("tensorrt", False, "TensorRT is not installed (Jetson: apt install "
                             "python3-libnvinfer; desktop: pip install tensorrt)")
    elif not report.cuda_python:
        trt = BackendSupport("tensorrt", False, "cuda-python is not installed: pip install cuda-python")
    else:
        trt = BackendSupport("tensorrt", True, f"TensorRT {report.tensorrt or '(version unknown)'} on "
                             f"{d.devices[0].name} (SM {d.devices[0].sm})")
    return (cpu, cuda, trt)


def engine_targets(report: MachineReport, targets: Iterable[Any]) -> list[str]:
    """Names of the targets whose TensorRT engines can be built and run here: same compute capability as a
    GPU of this machine, and TensorRT usable. Engines are tied to the GPU architecture they were built on."""
    if not any(b.usable for b in backend_support(report) if b.backend == "tensorrt"):
        return []
    sms = {dev.sm for dev in report.driver.devices}
    return [t.name for t in targets if t.sm is not None and t.sm in sms]
