"""Building the same model for a second target reuses the export when the graph would be identical."""

from __future__ import annotations

import hashlib
import json
import os

import pytest

from edgekit.build import build
from edgekit.build.target import load_target
from edgekit.runtime.bundle import verify


def test_second_target_reuses_the_export(tiny_llama_dir, tmp_path):
    cache = tmp_path / "cache"
    stages = []
    first = build(tiny_llama_dir, load_target("orin-nano"), output=tmp_path / "a", precision="int4", context=64,
                  cache_dir=cache, progress=lambda stage, done, total: stages.append(stage))
    assert "export" in stages and "export (cached)" not in stages
    stages.clear()
    second = build(tiny_llama_dir, load_target("orin-nx-16gb"), output=tmp_path / "b", precision="int4", context=64,
                   cache_dir=cache, progress=lambda stage, done, total: stages.append(stage))
    assert "export (cached)" in stages and "export" not in stages
    assert verify(tmp_path / "b").ok
    a, b = (json.loads((tmp_path / x / "manifest.json").read_text()) for x in ("a", "b"))
    assert a["files"]["model.onnx.data"] == b["files"]["model.onnx.data"]
    assert a["quantization"] == b["quantization"] and b["target"]["name"] == "orin-nx-16gb"
    # copies, not hard links: a bundle is its own file (editing one must not change the other or the cache)
    assert (tmp_path / "a" / "model.onnx.data").stat().st_ino != (tmp_path / "b" / "model.onnx.data").stat().st_ino
    assert (tmp_path / "b" / "model.onnx.data").stat().st_nlink == 1
    # a different context changes the graph (rotary tables): no reuse
    stages.clear()
    build(tiny_llama_dir, load_target("orin-nx-16gb"), output=tmp_path / "c", precision="int4", context=128,
          cache_dir=cache, progress=lambda stage, done, total: stages.append(stage))
    assert "export" in stages
    assert first.manifest["max_context"] == 64 and second.manifest["max_context"] == 64


def test_build_records_fidelity_against_its_source(tiny_qwen2_dir, tmp_path):
    result = build(tiny_qwen2_dir, load_target("cpu"), output=tmp_path / "b", precision="fp32", context=128,
                   eval_tokens=64)
    f = result.manifest["fidelity"]
    assert f["tokens"] == 64 and f["top1_agreement"] == 1.0 and f["mean_kl"] < 1e-5
    assert verify(tmp_path / "b").ok                      # the manifest was re-hashed after adding it
    assert json.loads((tmp_path / "b" / "manifest.json").read_text())["fidelity"] == f


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _flip(path, offset: int = 100) -> None:
    """Change one byte in place, same size (as an editor, a bad disk or a careless root would)."""
    os.chmod(path, 0o644)
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


@pytest.fixture(scope="module")
def cached_build(tiny_llama_dir, tmp_path_factory):
    """(cache folder, the first bundle built into it, its model.onnx.data sha256)."""
    root = tmp_path_factory.mktemp("cache-poison")
    first = build(tiny_llama_dir, load_target("cpu"), output=root / "first", precision="fp32", context=64,
                  cache_dir=root / "cache")
    return root / "cache", first.bundle, first.manifest["files"]["model.onnx.data"]["sha256"]


def _rebuild(model_dir, cache, out):
    stages = []
    result = build(model_dir, load_target("cpu"), output=out, precision="fp32", context=64, cache_dir=cache,
                   progress=lambda stage, done, total: stages.append(stage))
    return result, stages


def test_editing_a_bundle_in_place_does_not_poison_the_cache(tiny_llama_dir, cached_build, tmp_path):
    cache, first, good = cached_build
    _flip(first / "model.onnx.data")
    assert not verify(first).ok                                # the edited bundle itself is caught by verify
    result, stages = _rebuild(tiny_llama_dir, cache, tmp_path / "again")
    assert "export (cached)" in stages
    assert _sha(tmp_path / "again" / "model.onnx.data") == good == result.manifest["files"]["model.onnx.data"]["sha256"]
    assert verify(tmp_path / "again").ok


def test_a_damaged_cache_entry_is_discarded_and_exported_again(tiny_llama_dir, cached_build, tmp_path):
    cache, _, good = cached_build
    [entry] = [p for p in cache.iterdir() if not p.name.startswith(".")]
    _flip(entry / "model.onnx.data")
    result, stages = _rebuild(tiny_llama_dir, cache, tmp_path / "again")
    [notice] = [s for s in stages if "discarded" in s]
    assert "model.onnx.data changed since it was stored" in notice and str(entry) in notice
    assert "export" in stages and "export (cached)" not in stages
    assert _sha(tmp_path / "again" / "model.onnx.data") == good and verify(tmp_path / "again").ok
    # the fresh export was stored again, checked, and is reused by the next build
    result, stages = _rebuild(tiny_llama_dir, cache, tmp_path / "third")
    assert "export (cached)" in stages and _sha(tmp_path / "third" / "model.onnx.data") == good


def test_a_bundle_from_the_cache_loads_with_the_onnx_package(tiny_llama_dir, cached_build, tmp_path):
    onnx = pytest.importorskip("onnx")
    from onnx.external_data_helper import load_external_data_for_model

    cache, _, _ = cached_build
    _rebuild(tiny_llama_dir, cache, tmp_path / "b")
    model = onnx.load(str(tmp_path / "b" / "model.onnx"))                 # external data loaded with the graph
    assert sum(len(t.raw_data) for t in model.graph.initializer) > 0
    bare = onnx.load(str(tmp_path / "b" / "model.onnx"), load_external_data=False)
    load_external_data_for_model(bare, str(tmp_path / "b"))
    assert [t.raw_data for t in bare.graph.initializer] == [t.raw_data for t in model.graph.initializer]
