"""Long contexts: bench --filled, and the int8 KV cache (--kv-cache int8) against the float cache."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest

EDGEKIT = [sys.executable, "-m", "edgekit.cli"]


@pytest.fixture(scope="module")
def int8_kv_bundle(tiny_qwen2_dir, tmp_path_factory):
    from edgekit.build import QuantOptions, build
    from edgekit.build.target import load_target

    return build(tiny_qwen2_dir, load_target("cpu"), output=tmp_path_factory.mktemp("bundles") / "tiny-int8kv",
                 context=256, precision="fp32", quant=QuantOptions(kv_cache="int8")).bundle


def test_int8_kv_graph_manifest_and_plan_agree(int8_kv_bundle):
    from edgekit.runtime.bundle import read_manifest

    m = read_manifest(int8_kv_bundle)
    spec = m.spec()
    graph = onnx.load(str(int8_kv_bundle / "model.onnx"), load_external_data=False).graph
    past = [v for v in graph.input if v.name.startswith("past_")]
    assert len(past) == 2 * spec.num_layers
    assert {v.type.tensor_type.elem_type for v in past} == {onnx.TensorProto.INT8}
    assert m.graph["kv_dtype"] == "int8"
    assert m.memory["kv_bytes_per_token"] == 2 * spec.num_layers * spec.num_kv_heads * spec.head_dim
    from edgekit.build.memory_plan import plan
    from edgekit.build.target import load_target
    from edgekit.quant.sizes import QuantSettings

    p = plan(spec, load_target("cpu"), precision="fp32", context=256, quant=QuantSettings(kv_cache="int8"))
    assert p.kv_dtype == "int8" and p.kv_bytes_per_token == m.memory["kv_bytes_per_token"]
    assert p.kv_bytes == p.kv_bytes_per_token * 256


def test_int8_cache_holds_the_float_cache_rounded_to_its_scales(int8_kv_bundle, tiny_bundle):
    """Same tokens through both bundles: every int8 code of layer 0 is the float value divided by its channel's
    scale, rounded and saturated to -128..127 (a numpy reference); the logits stay close."""
    from edgekit.runtime.model import load

    ref, q = load(tiny_bundle), load(int8_kv_bundle)
    ids = np.random.default_rng(0).integers(0, ref.spec.vocab_size, 60)
    rows_a, rows_b = [ref.decoder.step(ids[:20]).copy()], [q.decoder.step(ids[:20]).copy()]
    for t in ids[20:]:
        rows_a.append(ref.decoder.step(np.array([t])).copy())
        rows_b.append(q.decoder.step(np.array([t])).copy())
    graph = onnx.load(str(int8_kv_bundle / "model.onnx"), load_external_data=False).graph
    scales = {i.name: onnx.numpy_helper.to_array(i) for i in graph.initializer if i.name.endswith("_scale")}
    n = len(ids)
    # layer 0's K and V depend only on the tokens (later layers see attention outputs that read the int8
    # cache, so their rows legitimately differ from the float model's): the exact reference holds there
    for i in (0,):
        for kind, short in (("key", "k"), ("value", "v")):
            f = ref.decoder.cache[f"{kind}_{i}"].numpy()[0, :, :n]                      # (Hkv, n, D) float
            c = q.decoder.cache[f"{kind}_{i}"].numpy()[0, :, :n].astype(np.float32)     # (Hkv, n, D) int8 codes
            s = scales[f"layers.{i}.attn.{short}_scale"].reshape(f.shape[0], 1, f.shape[2])
            expected = np.clip(np.rint(f / s), -128, 127)      # onnxruntime saturates to int8's range
            assert np.abs(c - expected).max() <= 1             # +-1: a value on a rounding boundary
            assert (c == expected).mean() > 0.99
            assert (np.abs(f) <= 127 * s).mean() > 0.95        # calibrated on other text: few values beyond
    a, b = np.stack(rows_a), np.stack(rows_b)
    diff = np.abs(a - b).mean() / np.abs(a).mean()
    assert 0 < diff < 0.1, diff              # a random tiny model on random ids: a few % of values saturate
    assert (a.argmax(-1) == b.argmax(-1)).mean() >= 0.8


def test_int8_kv_cache_refused_for_tensorrt_and_unknown_names(tiny_qwen2_dir):
    from edgekit.build import QuantOptions, preflight
    from edgekit.build.target import load_target
    from edgekit.errors import UserInputError

    with pytest.raises(UserInputError, match="an int8 KV cache needs the onnxruntime graph.*--backend onnxruntime-cpu"):
        preflight(tiny_qwen2_dir, load_target("orin-nano"), precision="fp16", context=256,
                  quant=QuantOptions(kv_cache="int8"))
    with pytest.raises(UserInputError, match="unknown KV cache type 'int4': use one of float, int8"):
        QuantOptions(kv_cache="int4")


def test_plan_cli_counts_the_int8_kv_cache(tiny_qwen2_dir):
    def kv(*extra):
        out = subprocess.run([*EDGEKIT, "plan", str(tiny_qwen2_dir), "-t", "cpu", "-c", "256", "--json", *extra],
                             capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        d = json.loads(out.stdout)
        return d["kv_dtype"], d["kv_bytes_per_token"]

    dtype, per_token = kv()
    dtype8, per_token8 = kv("--kv-cache", "int8")
    assert dtype8 == "int8" and per_token8 * {"fp32": 4, "fp16": 2}[dtype] == per_token


def test_bench_filled_json(tiny_bundle):
    out = subprocess.run([*EDGEKIT, "bench", str(tiny_bundle), "--filled", "64,16", "--new-tokens", "4", "--runs",
                          "2", "--json"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    cases = json.loads(out.stdout)["filled"]
    assert [c["filled"] for c in cases] == [16, 64]
    assert cases[0]["relative"] == 1.0
    for c in cases:
        assert c["new_tokens"] == 4 and c["runs"] == 2 and c["decode_tok_s"] > 0
        assert c["relative"] == pytest.approx(c["decode_tok_s"] / cases[0]["decode_tok_s"], rel=1e-2)


def test_bench_filled_fills_by_prefill_and_leaves_no_rows(tiny_bundle):
    from edgekit.errors import UserInputError
    from edgekit.runtime.bench import filled_decode
    from edgekit.runtime.model import load

    model = load(tiny_bundle)
    steps = []
    step = model.decoder.step
    model.decoder.step = lambda t: (steps.append(len(t)), step(t))[1]
    filled_decode(model, [100], 3, runs=2, warmup=False)
    assert steps == [model.prefill_chunk if model.prefill_chunk < 100 else 100, *([] if model.prefill_chunk >= 100
                     else [100 - model.prefill_chunk])] + [1] * 6
    assert model.decoder.position == 0          # filler rows are never reused by a later request
    with pytest.raises(UserInputError, match="--filled 250 \\+ 10 new tokens exceed max_context 256"):
        filled_decode(model, [250], 10)
    bad = subprocess.run([*EDGEKIT, "bench", str(tiny_bundle), "--filled", "16,x"], capture_output=True, text=True)
    assert bad.returncode == 2 and "give comma-separated whole numbers, e.g. 64,512,1024,4096" in bad.stderr
