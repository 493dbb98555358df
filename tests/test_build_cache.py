"""Building the same model for a second target reuses the export when the graph would be identical."""

from __future__ import annotations

import json

from edgekit.build import build
from edgekit.runtime.bundle import verify
from edgekit.target import load_target


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
    assert (tmp_path / "a" / "model.onnx.data").stat().st_ino == (tmp_path / "b" / "model.onnx.data").stat().st_ino
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
