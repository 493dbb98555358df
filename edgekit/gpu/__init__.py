"""What GPU this machine has, asked without CUDA libraries or TensorRT (see :mod:`edgekit.gpu.probe`)."""

from ..runtime.gpu_driver import DriverProbe, GpuDevice, probe_driver
from .probe import BackendSupport, JetsonInfo, MachineReport, backend_support, engine_targets, machine_report

__all__ = ["BackendSupport", "DriverProbe", "GpuDevice", "JetsonInfo", "MachineReport", "backend_support",
           "engine_targets", "machine_report", "probe_driver"]
