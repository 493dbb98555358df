"""Can this bundle's engine be built here? A decision with a one-line answer, before TensorRT is touched.

TensorRT builds an engine only for the GPU architecture (compute capability) it runs on, and cannot build
Jetson engines on a desktop. The load-time checks (GPU and TensorRT version of a built engine) are the
runtime's: :mod:`edgekit.runtime.trt_compat`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ..errors import BackendUnavailable, BundleError


def check_build(target_name: str, target_sm: str | None, probe, *,
                targets_for_sm: Iterable[str] = ()) -> Any:
    """The GPU to build on (an :class:`edgekit.gpu.GpuDevice`), or a one-line refusal.

    ``targets_for_sm`` names packaged targets with this GPU's compute capability, for the hint.
    """
    if target_sm is None:
        raise BundleError(f"the bundle is for {target_name}, which has no GPU: TensorRT engines are built for GPU "
                          "targets; rebuild the bundle with --target for your device")
    if not probe.ok:
        raise BackendUnavailable(f"cannot build a TensorRT engine on this machine: {probe.detail}; or build it "
                                 f"on the {target_name} itself (edgekit engine there, or edgekit flash "
                                 "--build-engine)")
    device = probe.device_with_sm(target_sm)
    if device is None:
        here = probe.devices[0]
        others = list(targets_for_sm)
        hint = f", or rebuild the bundle for this GPU (--target {others[0]})" if others else ""
        raise BackendUnavailable(
            f"the bundle is for {target_name} (SM {target_sm}) but this GPU is {here.name} (SM {here.sm}): "
            f"TensorRT engines only run on the GPU architecture they were built on; build the engine on a "
            f"SM {target_sm} device{hint}")
    return device
