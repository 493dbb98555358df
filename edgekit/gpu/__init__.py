"""What GPU this machine has, asked without CUDA libraries or TensorRT (see :mod:`edgekit.gpu.probe`)."""

from .probe import (
                    BackendSupport,
                    DriverProbe,
                    GpuDevice,
                    JetsonInfo,
                    MachineReport,
                    backend_support,
                    engine_targets,
                    machine_report,
                    probe_driver,
)

__all__ = ["BackendSupport", "DriverProbe", "GpuDevice", "JetsonInfo", "MachineReport", "backend_support",
           "engine_targets", "machine_report", "probe_driver"]
