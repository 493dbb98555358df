"""Shared fixtures: tiny random models and bundles built once per test session.

Bundles are built through the public API (``edgekit.build.build``) into a session temp folder; tests that
modify a bundle copy it first (``copy_bundle``).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tiny_models, refs

from ggml_support import require_ggml
from tiny_models import make_tiny


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory) -> Path:
    """A tiny random Qwen2 HF folder (qkv bias, GQA, untied head) with an R1-style chat template."""
    folder = tmp_path_factory.mktemp("tiny-qwen2")
    make_tiny("qwen2", folder)
    return folder


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A tiny random Llama HF folder (llama3 rope scaling, tied head)."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    make_tiny("llama", folder)
    return folder


def _build(source, out: Path, **kw) -> Path:
    from edgekit.build import build
    from edgekit.build.target import load_target

    target = load_target(kw.pop("target", "cpu"))
    return build(source, target, output=out, **kw).bundle


@pytest.fixture(scope="session")
def tiny_bundle(tiny_qwen2_dir, tmp_path_factory) -> Path:
    """fp32 cpu bundle of the tiny Qwen2 (ort dialect), context 256."""
    return _build(tiny_qwen2_dir, tmp_path_factory.mktemp("bundles") / "tiny-qwen2", context=256, precision="fp32")


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    from edgekit.sources import packaged_model_path

    return packaged_model_path("smollm2")


@pytest.fixture(scope="session")
def r1_gguf(tmp_path_factory) -> Path:
    """The real R1-Distill-Qwen-7B Q4_K_M layout (header + first tensors; the rest a hole), alone in a folder."""
    from r1_gguf import FILE_NAME, prepare_r1_layout

    return prepare_r1_layout(tmp_path_factory.mktemp("r1-7b") / FILE_NAME)


@pytest.fixture(scope="session")
def smollm2_bundle(smollm2_gguf, tmp_path_factory) -> Path:
    """fp32 cpu bundle of the real SmolLM2-135M (from the packaged GGUF), context 1024."""
    return _build(smollm2_gguf, tmp_path_factory.mktemp("bundles") / "smollm2", context=1024, precision="fp32")


@pytest.fixture
def copy_bundle(tmp_path):
    def copy(bundle: Path) -> Path:
        dest = tmp_path / bundle.name
        shutil.copytree(bundle, dest)
        return dest
    return copy


def pytest_collection_modifyitems(items):
    # "slow" (pyproject.toml): whatever builds or loads the real SmolLM2 bundle; -m "not slow" leaves it out
    for item in items:
        if {"smollm2_bundle", "smollm2_ggml_bundle", "smollm2_any"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def smollm2_ggml_bundle(smollm2_gguf, tmp_path_factory) -> Path:
    """ggml-cpu bundle of the real SmolLM2-135M: the packaged Q4_1 GGUF as stored, context 1024."""
    return _build(smollm2_gguf, tmp_path_factory.mktemp("bundles") / "smollm2-ggml", context=1024, backend="ggml-cpu")


@pytest.fixture(scope="session", params=["onnxruntime-cpu", "ggml-cpu"])
def smollm2_any(request, smollm2_gguf, tmp_path_factory):
    """A loaded SmolLM2 Model on each CPU backend (the shared behavioural tests run once per backend)."""
    from edgekit.runtime.model import load

    if request.param == "ggml-cpu":
        require_ggml()
        bundle = request.getfixturevalue("smollm2_ggml_bundle")
    else:
        bundle = request.getfixturevalue("smollm2_bundle")
    model = load(bundle, threads=2)
    yield model
    model.close()
