"""Whether the ggml-cpu backend's binding is here, for tests that run on it."""

from __future__ import annotations

import pytest


def ggml_available() -> bool:
    """Whether llama.cpp's binding (the ggml-cpu backend, pyproject extra "ggml") is installed."""
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


def require_ggml() -> None:
    """Skip without the binding on a developer's machine; in CI (which installs it) its absence fails."""
    import os

    if ggml_available():
        return
    if os.environ.get("CI"):
        pytest.fail("llama-cpp-python is not installed in CI: .ci/run installs the 'ggml' extra")
    pytest.skip("the ggml-cpu backend needs llama-cpp-python: pip install -e '.[ggml]'")
