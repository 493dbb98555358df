"""Can this engine be loaded here? Decisions with one-line answers, before TensorRT is touched; and the import.

A TensorRT engine runs only on the GPU architecture (compute capability) it was built for and only in the
TensorRT version that built it. These checks compare the engine's metadata with what
:func:`edgekit.runtime.gpu_driver.probe_driver` found, and say what differs and the fix. Standard library
only: the on-device runtime calls them at load; the engine builder (:mod:`edgekit.engine`) uses the same
version rules and :func:`import_tensorrt`.
"""

from __future__ import annotations

import re
from typing import Any

from ..errors import BackendUnavailable

MIN_TENSORRT = (10, 0)     # the name-based tensor API (set_tensor_address, execute_async_v3) used here

TRT_INSTALL = ("install TensorRT (Jetson: it comes with JetPack, `sudo apt install python3-libnvinfer`; desktop: "
               "`pip install tensorrt`)")


def version_tuple(text: str | None) -> tuple[int, ...]:
    """``"10.3.0.30"`` -> ``(10, 3, 0, 30)``; stops at the first non-numeric part (``"10.3.0.post1"`` -> 10.3.0)."""
    out = []
    for part in str(text or "").split("."):
        m = re.match(r"\d+", part)
        if not m:
            break
        out.append(int(m.group()))
        if m.group() != part:
            break
    return tuple(out)


def same_tensorrt(a: str | None, b: str | None) -> bool:
    """Whether an engine built by TensorRT ``a`` loads in TensorRT ``b``: the same version in all four parts
    (major.minor.patch.build, e.g. 10.3.0.30): a plan file is only guaranteed to load in the TensorRT build
    that wrote it (engines built without version compatibility). When one side reports fewer parts (a
    version string without the build), the parts both have must agree, at least major.minor.patch."""
    ta, tb = version_tuple(a), version_tuple(b)
    common = min(len(ta), len(tb))
    return common >= 3 and ta[:common] == tb[:common]


def check_tensorrt_version(version: str | None) -> str:
    """The version, or BackendUnavailable when TensorRT is missing or older than edgekit's API needs."""
    if not version:
        raise BackendUnavailable(f"TensorRT is not installed: {TRT_INSTALL}")
    if version_tuple(version)[:2] < MIN_TENSORRT:
        raise BackendUnavailable(f"TensorRT {version} is too old: edgekit uses the TensorRT 10 API; upgrade to "
                                 "TensorRT 10 or newer (on Jetson: JetPack 6.1 or newer; JetPack 6.0 ships "
                                 "TensorRT 8.6)")
    return version


def _gpu_problem(probe, doing: str) -> BackendUnavailable:
    return BackendUnavailable(f"cannot {doing} on this machine: {probe.detail}")


def check_engine(engine: dict[str, Any] | None, probe, installed_tensorrt: str | None, *,
                 bundle: str = "the bundle") -> Any:
    """Before loading an engine: the GPU to run it on, or a one-line error naming both sides and the fix."""
    fix = f"rebuild it here with `edgekit engine {bundle}`"
    if not engine:
        raise BackendUnavailable(f"{bundle} is built for TensorRT but has no engine yet: build it on this device "
                                 f"with `edgekit engine {bundle}`, or run its graph with the onnxruntime-cpu "
                                 "backend (--backend onnxruntime-cpu)")
    if not probe.ok:
        raise _gpu_problem(probe, "run a TensorRT engine")
    built_sm = str(engine.get("compute_capability") or "")
    device = probe.device_with_sm(built_sm)
    if device is None:
        here = probe.devices[0]
        raise BackendUnavailable(
            f"the engine in {bundle} was built for SM {built_sm or '?'} ({engine.get('device') or 'unknown GPU'}) "
            f"but this GPU is {here.name} (SM {here.sm}): engines only run on the GPU architecture they were "
            f"built on; {fix}, or use a bundle built for this device")
    check_tensorrt_version(installed_tensorrt)
    built_trt = engine.get("tensorrt_version")
    if not same_tensorrt(built_trt, installed_tensorrt):
        raise BackendUnavailable(
            f"the engine in {bundle} was built with TensorRT {built_trt or '?'} but this machine has TensorRT "
            f"{installed_tensorrt}: an engine only loads in the TensorRT version that built it; {fix}")
    return device


def import_tensorrt(probe=None) -> Any:
    """``import tensorrt`` as a one-line BackendUnavailable when it fails. With ``probe``: only after a
    successful GPU probe (``probe.ok``), since TensorRT crashes the process without a GPU."""
    if probe is not None and not probe.ok:
        raise BackendUnavailable(f"TensorRT needs a GPU and none is usable here: {probe.detail}")
    try:
        import tensorrt
    except ImportError as e:
        raise BackendUnavailable(f"the tensorrt Python module cannot be imported ({e}): {TRT_INSTALL}") from None
    return tensorrt
