"""Rules of the test suite itself: the declared markers select what they say."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]


def _collect(*args: str) -> set[str]:
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "--strict-markers", *args],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode in (0, 5), out.stdout + out.stderr          # 5: nothing selected
    return {line.split("[")[0] for line in out.stdout.splitlines() if "::" in line}


def test_slow_selects_the_tests_that_build_or_run_the_real_model():
    files = ("tests/test_smollm2.py", "tests/test_quant_models.py", "tests/test_runtime.py")
    slow = _collect("-m", "slow", *files)
    assert "tests/test_smollm2.py::test_greedy_to_eos_matches_transformers" in slow
    assert "tests/test_quant_models.py::test_smollm2_q4_1_imported_losslessly" in slow
    assert not any(t.startswith("tests/test_runtime.py") for t in slow)
    quick = _collect("-m", "not slow", *files)
    assert not slow & quick and any(t.startswith("tests/test_runtime.py") for t in quick)
