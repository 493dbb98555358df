"""Resolving MODEL: hub ids through the real huggingface_hub code (offline, from a local cache), and a
build that runs out of disk."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

CONFIGS = Path(__file__).parent / "fixtures" / "configs"
EDGEKIT = [sys.executable, "-m", "edgekit"]


def _run(args, env_extra, cwd=None):
    env = {**os.environ, **env_extra}
    return subprocess.run([*EDGEKIT, *args], capture_output=True, text=True, env=env, timeout=120, cwd=cwd)


def _seed_hub_cache(home: Path, repo: str, config: Path) -> None:
    """Lay out huggingface_hub's cache as a download would (refs/main -> snapshots/<commit>/config.json)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    folder = home / "hub" / ("models--" + repo.replace("/", "--"))
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    snapshot = folder / "snapshots" / commit
    snapshot.mkdir(parents=True)
    shutil.copy(config, snapshot / "config.json")


def test_hub_id_resolves_from_the_huggingface_cache(tmp_path):
    repo = "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B"
    _seed_hub_cache(tmp_path, repo, CONFIGS / "DeepSeek-R1-Distill-Qwen-1.5B" / "config.json")
    r = _run(["plan", repo, "--target", "orin-nano", "--json"], {"HF_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["parameters"] == 1_777_088_000


def test_hub_id_offline_and_not_cached_is_one_line(tmp_path):
    r = _run(["plan", "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B", "--target", "orin-nano"],
             {"HF_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and "not in the local Hugging Face cache" in r.stderr


def test_hub_unreachable_fails_fast_in_one_line(tmp_path):
    r = _run(["plan", "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B", "--target", "orin-nano"],
             {"HF_HOME": str(tmp_path), "HF_ENDPOINT": "https://hub.edgekit-test.invalid"})
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "no network connection to the Hugging Face hub" in r.stderr


def test_build_on_a_full_disk_leaves_nothing(tiny_qwen2_dir, tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        r = _run(["build", str(tiny_qwen2_dir), "-t", "cpu", "-p", "fp32", "-c", "64", "-o", str(mount / "b")], {})
        assert r.returncode == 2, r.stderr
        assert r.stderr.strip().splitlines()[-1].startswith("error: no space left on device writing")
        assert list(mount.iterdir()) == []
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True)
