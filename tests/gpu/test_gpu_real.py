"""Real TensorRT on a real GPU (Jetson or RTX). Skipped with the probe's reason elsewhere (conftest.py).

Run on the device: ``pytest -q tests/gpu`` (README: "Running the GPU tests").
"""

from __future__ import annotations

import numpy as np
import pytest

from edgekit.build.target import list_targets
from edgekit.runtime.gpu_driver import probe_driver


def _target_for_this_gpu():
    probe = probe_driver()
    sms = {d.sm for d in probe.devices}
    gpu_targets = [t for t in list_targets() if t.sm in sms and "tensorrt" in t.backend_names
                   and "fp32" in t.backend("tensorrt").precisions]
    if not gpu_targets:
        pytest.skip(f"no packaged target has this GPU's compute capability ({', '.join(sorted(sms))})")
    return gpu_targets[0]


def test_probe_sees_a_gpu_and_tensorrt_matches():
    import tensorrt

    from edgekit.runtime.trt_compat import MIN_TENSORRT, version_tuple

    probe = probe_driver()
    assert probe.ok and probe.devices[0].compute_capability >= (5, 0)
    assert version_tuple(tensorrt.__version__)[:2] >= MIN_TENSORRT


def test_selftest_passes():
    from edgekit.engine.selftest import run_selftest

    result = run_selftest()
    print(result.to_dict())
    assert result.passed, result.detail


def test_bundle_engine_generates_like_onnxruntime(tiny_qwen2_dir, tmp_path):
    """Build a tiny fp32 bundle for a target with this GPU's SM, build its engine, generate greedily with
    TensorRT and with onnxruntime CPU on the same graph, and compare; a rebuild reuses the timing cache."""
    import tensorrt

    from edgekit.build import build
    from edgekit.engine.builder import build_bundle_engine
    from edgekit.runtime.bundle import verify
    from edgekit.runtime.model import load

    target = _target_for_this_gpu()
    bundle = build(tiny_qwen2_dir, target, output=tmp_path / "tiny", precision="fp32", context=128,
                   backend="tensorrt").bundle
    probe = probe_driver()
    written, first = build_bundle_engine(bundle, trt=tensorrt, probe=probe)
    assert written["engine"]["compute_capability"] == probe.devices[0].sm and verify(bundle).ok

    trt_model = load(bundle)                                   # backend "auto" = the bundle's: tensorrt
    cpu_model = load(bundle, backend="onnxruntime-cpu")
    assert type(trt_model.decoder).__name__ == "TrtDecoder"
    prompt = np.arange(20, dtype=np.int64) % trt_model.decoder.vocab
    a, b = trt_model.decoder.step(prompt), cpu_model.decoder.step(prompt)
    assert np.max(np.abs(a - b)) <= 1e-2 * max(1.0, float(np.max(np.abs(b))))
    for _ in range(10):
        token = np.asarray([int(b.argmax())], dtype=np.int64)
        assert int(a.argmax()) == int(token[0])
        a, b = trt_model.decoder.step(token), cpu_model.decoder.step(token)
    trt_model.decoder.close()

    _, second = build_bundle_engine(bundle, trt=tensorrt, probe=probe)
    assert second.timing_cache_reused


@pytest.mark.parametrize("precision", ["int4", "int8", "fp16"])
def test_quantized_bundle_engines_match_onnxruntime(tiny_qwen2_dir, tmp_path, precision):
    """The tensorrt-dialect INT4/INT8/fp16 graphs (positive DequantizeLinear scales, DequantizeLinear -> Gather
    embedding) through the real parser and builder; logits against onnxruntime CPU on the same graph. fp16
    compute on both sides, so the tolerance is a few percent of the logits' scale and the greedy tokens."""
    import tensorrt

    from edgekit.build import QuantOptions, build
    from edgekit.engine.builder import build_bundle_engine
    from edgekit.runtime.model import load

    target = _target_for_this_gpu()
    if precision not in target.backend("tensorrt").precisions:
        pytest.skip(f"{target.name}'s TensorRT backend does not list {precision}")
    bundle = build(tiny_qwen2_dir, target, output=tmp_path / precision, precision=precision, context=128,
                   backend="tensorrt", quant=QuantOptions(method="rtn")).bundle
    build_bundle_engine(bundle, trt=tensorrt, probe=probe_driver())
    trt_model, cpu_model = load(bundle), load(bundle, backend="onnxruntime-cpu")
    prompt = np.arange(20, dtype=np.int64) % trt_model.decoder.vocab
    a, b = trt_model.decoder.step(prompt), cpu_model.decoder.step(prompt)
    assert np.max(np.abs(a - b)) <= 5e-2 * max(1.0, float(np.max(np.abs(b))))
    agree = 0
    for _ in range(8):
        token = np.asarray([int(b.argmax())], dtype=np.int64)
        agree += int(a.argmax()) == int(token[0])
        a, b = trt_model.decoder.step(token), cpu_model.decoder.step(token)
    assert agree >= 7
    trt_model.close()
