"""What this machine has: NVIDIA driver and GPUs, Jetson release, TensorRT, onnxruntime, memory.

The driver probe and the TensorRT version are the runtime's (:mod:`edgekit.runtime.gpu_driver`, which says
why edgekit asks the driver through ctypes), /proc/meminfo is read by :mod:`edgekit.runtime.memory`; this
module adds what ``edgekit doctor`` shows beyond them. Versions of cuda-python are read from installed
package metadata, never by importing it. Only the standard library is used here; onnxruntime is imported by
:func:`onnxruntime_info` alone, and only when asked.
"""

from __future__ import annotations

import importlib.metadata
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..runtime.gpu_driver import (
    DriverProbe,
    module_present,
    package_version,
    probe_driver,
    tensorrt_version,
)
from ..runtime.memory import read_meminfo

CUDA_PYTHON_DISTS = ("cuda-python", "cuda-bindings", "cuda_bindings")
ORT_DISTS = ("onnxruntime-gpu", "onnxruntime_gpu", "onnxruntime")

# L4T release -> JetPack release (NVIDIA's JetPack archive). Older L4T releases name the major only.
_JETPACK = {(36, 2): "6.0 DP", (36, 3): "6.0", (36, 4, 0): "6.1", (36, 4, 3): "6.2", (36, 4, 4): "6.2.1"}
_JETPACK_MAJOR = {35: "5.1", 36: "6", 34: "5.0"}


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
