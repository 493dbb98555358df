"""Real-GPU tests: every test here is marked ``gpu`` and skipped, with the probe's reason, unless this machine
has a usable NVIDIA GPU, TensorRT and cuda-python (run them on a Jetson or an RTX machine: README)."""

from __future__ import annotations

import sys
from functools import lru_cache
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))   # standin (used by tests/test_engine.py too)


@lru_cache(maxsize=1)
def gpu_skip_reason() -> str | None:
    """Why the real-GPU tests cannot run here, or None. Decided without importing TensorRT."""
    from edgekit.gpu.probe import CUDA_PYTHON_DISTS
    from edgekit.runtime.gpu_driver import module_present, package_version, probe_driver, tensorrt_version

    probe = probe_driver()
    if not probe.ok:
        return f"no usable GPU: {probe.detail}"
    if not (tensorrt_version() or module_present("tensorrt")):
        return "TensorRT is not installed (Jetson: apt install python3-libnvinfer; desktop: pip install tensorrt)"
    if not (package_version(CUDA_PYTHON_DISTS) or module_present("cuda")):
        return "cuda-python is not installed: pip install cuda-python"
    return None


def pytest_collection_modifyitems(config, items):
    # Skipped at collection, so that no fixture (tiny models, bundles) is built for a test that cannot run.
    here = Path(__file__).parent
    mine = [item for item in items if Path(str(item.fspath)).parent == here]
    reason = gpu_skip_reason() if mine else None
    for item in mine:
        item.add_marker(pytest.mark.gpu)
        if reason:
            item.add_marker(pytest.mark.skip(reason=reason))
