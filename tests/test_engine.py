"""TensorRT engines without a GPU: the build plan, compatibility decisions, the builder adapter against a
recording stand-in of the TensorRT 10 API, the TensorRT backend's KV bookkeeping (checked against
onnxruntime through a stand-in engine), the manifest update, and the `engine`/`selftest` commands."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

sys.path.insert(0, str(Path(__file__).parent / "gpu"))

import standin

from edgekit.build.memory_plan import plan as memory_plan
from edgekit.build.target import load_target
from edgekit.cli import cli
from edgekit.engine import builder as eb
from edgekit.engine import compat
from edgekit.engine.engine_plan import (
    POOL_CAP,
    build_profiles,
    contract_io,
    engine_plan,
    plan_for_manifest,
    pool_limit,
    profile_ranges,
)
from edgekit.errors import BackendUnavailable, BudgetExceeded, BundleError, DoesNotFit, GenerationError, GpuStepFailed
from edgekit.gpu import probe as gp
from edgekit.runtime import gpu_driver as gd
from edgekit.runtime import trt_compat
from edgekit.runtime.bundle import hash_file, read_manifest, verify, write_manifest
from edgekit.runtime.ort_backend import OrtDecoder
from edgekit.runtime.trt_backend import KvLayout, TrtDecoder, open_engine_decoder, plan_step
from edgekit.spec import ModelSpec, spec_from_config_file
from edgekit.units import GiB, MiB

CONFIGS = Path(__file__).parent / "fixtures" / "configs"


@pytest.fixture(scope="module")
def r1_15b() -> ModelSpec:
    return spec_from_config_file(CONFIGS / "DeepSeek-R1-Distill-Qwen-1.5B" / "config.json")


@pytest.fixture(scope="module")
def trt_bundles(tiny_qwen2_dir, tmp_path_factory) -> dict[str, Path]:
    """Tiny Qwen2 bundles in the tensorrt dialect for orin-nano, fp32 and fp16, context 64."""
    from edgekit.build import build

    out = {}
    for precision in ("fp32", "fp16"):
        folder = tmp_path_factory.mktemp("trt-bundles") / f"tiny-{precision}"
        build(tiny_qwen2_dir, load_target("orin-nano"), output=folder, precision=precision, context=64,
              backend="tensorrt")
        out[precision] = folder
    return out


# ----- the plan for R1-Distill-Qwen-1.5B INT4 on orin-nano --------------------------------------------------
def test_r1_15b_int4_orin_nano_plan(r1_15b):
    target = load_target("orin-nano")
    p = engine_plan(r1_15b, target, precision="int4", max_context=4096)
    assert (p.target, p.compute_capability, p.kv_dtype, p.prefill_chunk) == ("orin-nano-8gb", "8.7", "float16", 256)
    assert p.network_flags == ("STRONGLY_TYPED",) and p.builder_flags == ()
    prefill, decode = p.profiles
    assert (prefill.name, prefill.seq, prefill.past) == ("prefill", (1, 256, 256), (0, 256, 4095))
    assert (decode.name, decode.seq, decode.past) == ("decode", (1, 1, 1), (0, 2048, 4095))
    for profile in p.profiles:
        assert len(profile.shapes) == 1 + 2 * 28          # input_ids + past_key/value of every layer
        shapes = {s.name: s for s in profile.shapes}
        assert shapes["input_ids"].max == (1, profile.seq[2])
        assert shapes["past_value_27"].min == (1, 0, 2, 128)
        assert shapes["past_key_0"].max == (1, 4095, 2, 128)
        assert shapes["past_key_13"].opt == (1, profile.past[1], 2, 128)
    # Pool: the target's budget minus what the memory planner counts, capped at 1 GiB.
    m = memory_plan(r1_15b, target, precision="int4", context=4096, backend="tensorrt")
    headroom = m.budget_bytes - m.weights_bytes - m.kv_bytes - m.workspace_bytes - m.overhead_bytes
    assert headroom > POOL_CAP and p.workspace_pool_bytes == POOL_CAP == 1 * GiB
    uncapped, source, chunk = pool_limit(r1_15b, target, precision="int4", max_context=4096, cap=64 * GiB)
    assert uncapped == headroom // MiB * MiB and chunk == 256 and "headroom" in source
    assert any("build on the device" in n for n in p.notes)
    json.dumps(p.to_dict())


def test_pool_follows_the_real_weights_and_refuses_when_nothing_is_left(r1_15b):
    target = load_target("orin-nano")
    small = pool_limit(r1_15b, target, precision="int4", max_context=4096, cap=64 * GiB)[0]
    heavier = pool_limit(r1_15b, target, precision="int4", max_context=4096, cap=64 * GiB,
                         weights_bytes=memory_plan(r1_15b, target, precision="int4", context=4096,
                                                   backend="tensorrt").weights_bytes + 512 * MiB)[0]
    assert small - heavier == 512 * MiB
    tight = dataclasses.replace(target, budget_bytes=int(2.3e9))
    with pytest.raises(DoesNotFit, match="shorter --context"):
        engine_plan(r1_15b, tight, precision="int4", max_context=4096)


def test_profile_ranges_edges():
    r = profile_ranges(64, 64)
    assert r["prefill"]["seq"] == (1, 64, 64) and r["prefill"]["past_seq"] == (0, 0, 63)
    assert r["decode"]["past_seq"] == (0, 32, 63)
    assert profile_ranges(4096, 8192)["prefill"]["seq"] == (1, 4096, 4096)
    with pytest.raises(Exception, match="at least 2"):
        profile_ranges(1, 1)


def test_contract_io_is_what_the_exporter_writes(trt_bundles):
    for precision, kv in (("fp32", "float32"), ("fp16", "float16")):
        m = read_manifest(trt_bundles[precision])
        inputs, outputs = contract_io(m.spec(), kv)
        assert [dict(i) for i in inputs] == m.graph["inputs"]
        assert [dict(o) for o in outputs] == m.graph["outputs"]


def test_profiles_refuse_unknown_dimensions_and_ort_graphs(tiny_bundle):
    bad = [{"name": "input_ids", "dtype": "int64", "shape": ["batch", "seq"]},
           {"name": "past_key_0", "dtype": "float16", "shape": ["batch", "kv_len", 2, 16]}]
    with pytest.raises(BundleError, match="'kv_len'"):
        build_profiles(bad, 64, 8)
    with pytest.raises(BundleError, match="not a tensorrt-dialect decoder"):
        build_profiles([{"name": "x", "dtype": "float32", "shape": ["batch"]}], 64, 8)
    m = read_manifest(tiny_bundle)
    with pytest.raises(BundleError, match="'ort' graph dialect"):
        plan_for_manifest(m, load_target("orin-nano"))
    with pytest.raises(Exception, match="has no GPU"):
        engine_plan(m.spec(), load_target("cpu"), precision="fp32", max_context=64)


# ----- compatibility ---------------------------------------------------------------------------------------
def test_versions():
    assert trt_compat.version_tuple("10.3.0.30") == (10, 3, 0, 30)
    assert trt_compat.version_tuple("10.3.0.post1") == (10, 3, 0)
    assert trt_compat.same_tensorrt("10.3.0.30", "10.3.0") and not trt_compat.same_tensorrt("10.3.0", "10.4.0")
    assert trt_compat.same_tensorrt("10.3.0.30", "10.3.0.30") and not trt_compat.same_tensorrt("10.3.0.30", "10.3.0.26")
    assert not trt_compat.same_tensorrt("10.3", "10.3.1.5")                  # major.minor alone says too little
    assert not trt_compat.same_tensorrt(None, "10.3.0")
    with pytest.raises(BackendUnavailable, match=r"too old.*JetPack 6\.1 or newer; JetPack 6\.0 ships TensorRT 8\.6"):
        trt_compat.check_tensorrt_version("8.6.2")
    with pytest.raises(BackendUnavailable, match="not installed"):
        trt_compat.check_tensorrt_version(None)


def test_build_refuses_another_compute_capability():
    rtx = standin.gpu_probe(standin.RTX_4090)
    with pytest.raises(BackendUnavailable) as e:
        compat.check_build("orin-nano-8gb", "8.7", rtx, targets_for_sm=["rtx-4090"])
    msg = str(e.value)
    assert "SM 8.7" in msg and "SM 8.9" in msg and "RTX 4090" in msg and "--target rtx-4090" in msg
    assert "\n" not in msg
    assert compat.check_build("orin-nano-8gb", "8.7", standin.gpu_probe()).name == "Orin"
    none = gd.DriverProbe("no-driver", "no NVIDIA GPU driver (libcuda.so.1 not found)")
    with pytest.raises(BackendUnavailable, match="cannot build a TensorRT engine on this machine: no NVIDIA"):
        compat.check_build("orin-nano-8gb", "8.7", none)
    with pytest.raises(BundleError, match="no GPU"):
        compat.check_build("cpu", None, standin.gpu_probe())


def test_engine_checks_at_load_name_both_sides_and_the_fix():
    engine = {"file": "model.engine", "tensorrt_version": "10.3.0", "compute_capability": "8.7", "device": "Orin"}
    orin, rtx = standin.gpu_probe(), standin.gpu_probe(standin.RTX_4090)
    assert trt_compat.check_engine(engine, orin, "10.3.0.30", bundle="b").sm == "8.7"
    with pytest.raises(BackendUnavailable,
                       match=r"built for SM 8\.7 \(Orin\) but this GPU is .*SM 8\.9.*edgekit engine b"):
        trt_compat.check_engine(engine, rtx, "10.3.0", bundle="b")
    with pytest.raises(BackendUnavailable,
                       match=r"TensorRT 10\.3\.0 but this machine has TensorRT 10\.7\.0.*edgekit engine b"):
        trt_compat.check_engine(engine, orin, "10.7.0", bundle="b")
    with pytest.raises(BackendUnavailable, match="built for TensorRT but has no engine yet: build it .*edgekit engine"):
        trt_compat.check_engine(None, orin, "10.3.0", bundle="b")
    with pytest.raises(BackendUnavailable, match="not installed"):
        trt_compat.check_engine(engine, orin, None, bundle="b")


# ----- the builder adapter against the recording stand-in --------------------------------------------------
def _tiny_plan(bundle: Path):
    m = read_manifest(bundle)
    return m, plan_for_manifest(m, load_target("orin-nano"))


def test_builder_calls_follow_the_tensorrt_10_api(trt_bundles, tmp_path):
    m, plan = _tiny_plan(trt_bundles["fp16"])
    trt = standin.make_trt()
    seen = []
    outcome = eb.build_engine(trt, plan, m.path("model.onnx"), tmp_path / "model.engine",
                              timing_cache=tmp_path / "model.timing-cache", progress=lambda *a: seen.append(a))
    names = standin.call_names(trt)
    head = ["Logger", "Builder", "create_network", "OnnxParser", "parse_from_file", "create_builder_config",
            "set_memory_pool_limit"]
    assert names[:len(head)] == head
    assert dict(trt.calls)["create_network"] == (1 << 1,)          # 1 << STRONGLY_TYPED
    assert dict(trt.calls)["parse_from_file"] == (str(m.path("model.onnx")),)
    assert dict(trt.calls)["set_memory_pool_limit"] == (trt.MemoryPoolType.WORKSPACE, plan.workspace_pool_bytes)
    assert "set_flag" not in names                                 # strongly typed: no FP16/INT8 flags
    # Two profiles, each with a shape for every dynamic input, added in order, before the build.
    i = names.index("create_optimization_profile")
    per_profile = ["create_optimization_profile"] + ["set_shape"] * 5 + ["add_optimization_profile"]
    assert names[i:i + 14] == per_profile * 2
    shapes = [c[1] for c in trt.calls if c[0] == "set_shape"]
    assert {s[0] for s in shapes[:5]} == {"input_ids", "past_key_0", "past_value_0", "past_key_1", "past_value_1"}
    assert shapes[0] == ("input_ids", (1, 1), (1, 64), (1, 64)) and shapes[5] == ("input_ids", (1, 1), (1, 1), (1, 1))
    tail = ["create_timing_cache", "set_timing_cache", "IProgressMonitor.__init__", "progress_monitor",
            "build_serialized_network", "get_timing_cache", "serialize"]
    assert names[i + 14:] == tail
    assert dict(trt.calls)["create_timing_cache"] == (b"",) and not outcome.timing_cache_reused
    assert json.loads((tmp_path / "model.engine").read_bytes())["onnx"] == str(m.path("model.onnx"))
    assert (tmp_path / "model.timing-cache").read_bytes() == b"+timings"
    assert outcome.engine_bytes == (tmp_path / "model.engine").stat().st_size and outcome.tensorrt_version == "10.3.0"
    assert seen[0] == ("Building engine", 0, 3) and seen[-1] == ("Building engine", 3, 3)
    assert ("Computing costs", 1, 1) in seen and not any(s[0].startswith("Timing layer") for s in seen)

    again = standin.make_trt()
    second = eb.build_engine(again, plan, m.path("model.onnx"), tmp_path / "model.engine",
                             timing_cache=tmp_path / "model.timing-cache")
    assert dict(again.calls)["create_timing_cache"] == (b"+timings",) and second.timing_cache_reused
    assert "progress_monitor" not in standin.call_names(again)     # nobody listens: no monitor
    (tmp_path / "model.timing-cache").write_bytes(b"garbage from another GPU")
    third = standin.make_trt()
    assert not eb.build_engine(third, plan, m.path("model.onnx"), tmp_path / "e2",
                               timing_cache=tmp_path / "model.timing-cache").timing_cache_reused
    assert [c[1] for c in third.calls if c[0] == "create_timing_cache"] == [(b"garbage from another GPU",), (b"",)]


def test_builder_failures_are_one_line(trt_bundles, tmp_path):
    m, plan = _tiny_plan(trt_bundles["fp16"])
    # TensorRT failing after edgekit's checker passed is a device/tool failure: exit 1, not 2 ("bad input")
    with pytest.raises(GpuStepFailed, match=r"cannot parse model.onnx: In node 3 .*fake error 0 \(2 error") as e:
        eb.build_engine(standin.make_trt(parse_ok=False), plan, m.path("model.onnx"), tmp_path / "e")
    assert e.value.exit_code == 1
    with pytest.raises(GpuStepFailed, match="could not build the engine"):
        eb.build_engine(standin.make_trt(build_ok=False), plan, m.path("model.onnx"), tmp_path / "e")
    assert not (tmp_path / "e").exists()
    missing = dataclasses.replace(plan, profiles=tuple(dataclasses.replace(
        p, shapes=tuple(s for s in p.shapes if s.name != "past_value_1")) for p in plan.profiles))
    with pytest.raises(BundleError, match="past_value_1 has dynamic shape"):
        eb.build_engine(standin.make_trt(), missing, m.path("model.onnx"), tmp_path / "e")


def test_build_bundle_engine_writes_the_manifest(trt_bundles, copy_bundle):
    bundle = copy_bundle(trt_bundles["fp16"])
    written, outcome = eb.build_bundle_engine(bundle, trt=standin.make_trt(), probe=standin.gpu_probe())
    m = read_manifest(bundle)
    e = m.engine
    assert written["engine"] == e and e["file"] == "model.engine" and e["timing_cache"] == "model.timing-cache"
    assert (e["tensorrt_version"], e["compute_capability"], e["device"]) == ("10.3.0", "8.7", "Orin")
    assert e["onnx"]["sha256"] == hash_file(bundle / "model.onnx")
    assert e["onnx"]["data_sha256"] == hash_file(bundle / "model.onnx.data")
    assert [p["name"] for p in e["options"]["profiles"]] == ["prefill", "decode"]
    assert e["options"]["network_flags"] == ["STRONGLY_TYPED"] and e["options"]["max_context"] == 64
    assert {"model.engine", "model.timing-cache"} <= set(m.files)
    assert verify(bundle).ok
    with pytest.raises(BackendUnavailable, match="SM 8.9"):
        eb.build_bundle_engine(copy_bundle(trt_bundles["fp32"]), trt=standin.make_trt(),
                               probe=standin.gpu_probe(standin.RTX_4090))


# ----- the backend's bookkeeping -----------------------------------------------------------------------------
def test_plan_step_rows_addresses_and_copies():
    layout = KvLayout(layers=1, kv_heads=2, head_dim=64, capacity=100, itemsize=2)   # 256-byte rows
    cache = {"key_0": 0x10000, "value_0": 0x20000}
    io = plan_step(10, 3, layout, cache=cache, ids=0x100, logits=0x200, scratch=None,
                   profiles={"prefill": 0, "decode": 1})
    assert io.profile == 0 and io.copies == ()
    assert io.shapes == {"input_ids": (1, 3), "past_key_0": (1, 10, 2, 64), "past_value_0": (1, 10, 2, 64)}
    assert io.addresses["past_key_0"] == 0x10000 and io.addresses["new_key_0"] == 0x10000 + 10 * 256
    assert plan_step(10, 1, layout, cache=cache, ids=1, logits=2, scratch=None,
                     profiles={"prefill": 0, "decode": 1}).profile == 1
    odd = KvLayout(layers=1, kv_heads=2, head_dim=16, capacity=100, itemsize=2)      # 64-byte rows
    scratch = {"key_0": 0x30000, "value_0": 0x40000}
    io = plan_step(5, 2, odd, cache=cache, ids=1, logits=2, scratch=scratch, profiles={"prefill": 0})
    assert io.addresses["new_key_0"] == 0x30000
    assert io.copies == ((0x10000 + 5 * 64, 0x30000, 128), (0x20000 + 5 * 64, 0x40000, 128))
    assert plan_step(4, 1, odd, cache=cache, ids=1, logits=2, scratch=scratch,
                     profiles={"prefill": 0}).copies == ()                           # 4 * 64 is aligned
    with pytest.raises(GenerationError):
        plan_step(99, 2, odd, cache=cache, ids=1, logits=2, scratch=scratch, profiles={"prefill": 0})


def _decoders(bundle: Path, **kw):
    """(TrtDecoder over the stand-ins, onnxruntime reference) for a bundle built with the stand-in."""
    eb.build_bundle_engine(bundle, trt=standin.make_trt(), probe=standin.gpu_probe())
    m = read_manifest(bundle)
    cuda = standin.FakeCuda()
    trt = standin.make_trt(cuda=cuda)
    ours = open_engine_decoder(m, capacity=64, probe=standin.gpu_probe(), trt=trt, cuda=cuda)
    ref = OrtDecoder(str(bundle / "model.onnx"), dialect="tensorrt", spec=m.spec(), capacity=64,
                     kv_dtype=m.graph["kv_dtype"])
    return ours, ref, trt, cuda


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_trt_decoder_matches_onnxruntime_through_the_standin(trt_bundles, copy_bundle, precision):
    ours, ref, trt, cuda = _decoders(copy_bundle(trt_bundles[precision]))
    assert (ours.capacity, ours.vocab, ours.position) == (64, ref.vocab, 0)
    rng = np.random.default_rng(0)
    steps = [rng.integers(0, ref.vocab, n) for n in (7, 1, 1, 5, 1, 1, 1, 3, 1)]
    for tokens in steps:
        got, want = ours.step(tokens.astype(np.int64)), ref.step(tokens.astype(np.int64))
        np.testing.assert_array_equal(got, want)
    assert ours.position == ref.position == sum(len(t) for t in steps)
    switches = [c[1][0] for c in trt.calls if c[0] == "set_optimization_profile_async"]
    assert switches == [0, 1, 0, 1, 0, 1]                          # prefill/decode only when S changes kind
    assert any(c[0] == "dtod" for c in cuda.calls)                  # misaligned rows went through scratch
    ours.reset(), ref.reset()
    np.testing.assert_array_equal(ours.step(steps[0].astype(np.int64)), ref.step(steps[0].astype(np.int64)))
    allocated = set(cuda.allocs)
    ours.close()
    assert not cuda.allocs and set(cuda.freed) >= allocated


def test_trt_decoder_splits_long_steps_and_refuses_a_full_cache(trt_bundles, copy_bundle):
    bundle = copy_bundle(trt_bundles["fp32"])
    _, ref, _, _ = _decoders(bundle)
    m = read_manifest(bundle)
    cuda = standin.FakeCuda()
    small = TrtDecoder((bundle / "model.engine").read_bytes(), spec=m.spec(), capacity=64, kv_dtype="float32",
                       max_seq=4, profiles={"prefill": 0, "decode": 1}, trt=standin.make_trt(cuda=cuda), cuda=cuda,
                       direct_kv_writes=False)
    tokens = np.arange(10, dtype=np.int64) + 3
    np.testing.assert_allclose(small.step(tokens), ref.step(tokens), rtol=1e-5, atol=1e-5)  # 4 + 4 + 2
    assert small.position == 10
    with pytest.raises(GenerationError, match="KV cache is full"):
        small.step(np.zeros(55, np.int64))


def test_open_engine_decoder_refusals(trt_bundles, copy_bundle):
    bundle = copy_bundle(trt_bundles["fp16"])
    m = read_manifest(bundle)
    with pytest.raises(BackendUnavailable, match="built for TensorRT but has no engine yet: build it .*edgekit engine"):
        open_engine_decoder(m, capacity=64, probe=standin.gpu_probe(), trt=standin.make_trt())
    eb.build_bundle_engine(bundle, trt=standin.make_trt(), probe=standin.gpu_probe())
    m = read_manifest(bundle)
    with pytest.raises(BackendUnavailable, match=r"SM 8\.7 \(Orin\) but this GPU is NVIDIA GeForce RTX 4090"):
        open_engine_decoder(m, capacity=64, probe=standin.gpu_probe(standin.RTX_4090), trt=standin.make_trt())
    with pytest.raises(BackendUnavailable, match=r"TensorRT 10\.3\.0 but this machine has TensorRT 10\.4\.1"):
        open_engine_decoder(m, capacity=64, probe=standin.gpu_probe(), trt=standin.make_trt("10.4.1"))
    with pytest.raises(BackendUnavailable, match="libcuda"):
        open_engine_decoder(m, capacity=64, probe=gd.DriverProbe("no-driver", "no driver (libcuda.so.1 not found)"))
    with pytest.raises(GenerationError, match="max_context 65"):
        open_engine_decoder(m, capacity=65, probe=standin.gpu_probe(), trt=standin.make_trt())
    # On a Jetson (this bundle's target) cudaMemGetInfo misses reclaimable memory: it is not asked; the load-time
    # MemAvailable budget check covers the unified memory. A discrete GPU is refused before any allocation.
    cuda = standin.FakeCuda(free=1024)
    dec = open_engine_decoder(m, capacity=64, probe=standin.gpu_probe(), trt=standin.make_trt(cuda=cuda), cuda=cuda)
    assert dec._unified and ("malloc", dec.layout.buffer_bytes) in cuda.calls
    dec.close()
    cuda = standin.FakeCuda(free=1024)
    with pytest.raises(BudgetExceeded, match="GPU has 0 MiB free: load with a smaller max_context"):
        TrtDecoder(m.path("model.engine"), spec=m.spec(), capacity=64, kv_dtype="float16", max_seq=8,
                   profiles={"prefill": 0, "decode": 1}, trt=standin.make_trt(cuda=cuda), cuda=cuda,
                   unified_memory=False)
    assert not [c for c in cuda.calls if c[0] == "malloc"]


def test_cuda_runtime_wrapper_against_a_recording_cudart():
    from edgekit.errors import BudgetExceeded
    from edgekit.runtime.trt_backend import CudaRuntime

    class Err:
        def __init__(self, name):
            self.name = name

    ok, oom = Err("cudaSuccess"), Err("cudaErrorMemoryAllocation")
    calls = []

    class Kind:
        cudaMemcpyHostToDevice, cudaMemcpyDeviceToHost, cudaMemcpyDeviceToDevice = 1, 2, 3

    class Rt:
        cudaError_t = type("E", (), {"cudaSuccess": ok})
        cudaMemcpyKind = Kind

        def cudaMalloc(self, n):
            calls.append(("cudaMalloc", n))
            return (ok, 0xABC00) if n < 1000 else (oom, 0)

        def cudaMemcpyAsync(self, dst, src, n, kind, stream):
            calls.append(("cudaMemcpyAsync", dst, src, n, kind, stream))
            return (ok,)

        def cudaStreamCreate(self):
            return ok, 77

        def cudaMemGetInfo(self):
            return ok, 5, 9

    rt = CudaRuntime(Rt())
    assert rt.malloc(10) == 0xABC00 and rt.stream() == 77 and rt.mem_get_info() == (5, 9)
    host = np.zeros(4, np.int64)
    rt.htod(0xABC00, host, 32, 77)
    rt.dtoh(host, 0xABC00, 32, 77)
    assert calls[1] == ("cudaMemcpyAsync", 0xABC00, host.ctypes.data, 32, 1, 77)
    assert calls[2] == ("cudaMemcpyAsync", host.ctypes.data, 0xABC00, 32, 2, 77)
    with pytest.raises(BudgetExceeded, match="out of memory"):
        rt.malloc(5000)


# ----- commands ------------------------------------------------------------------------------------------
def _r1_manifest_bundle(r1_15b, source: Path, folder: Path) -> Path:
    """A manifest-only bundle shaped like R1-Distill-Qwen-1.5B INT4 for orin-nano (small placeholder files)."""
    shutil.copytree(source, folder)
    m = read_manifest(folder).to_dict()
    target = load_target("orin-nano")
    p = memory_plan(r1_15b, target, precision="int4", context=4096, backend="tensorrt")
    inputs, outputs = contract_io(r1_15b, "float16")
    m.update(model=r1_15b.to_dict(), precision="int4", max_context=4096)
    m["graph"].update(inputs=list(inputs), outputs=list(outputs), kv_dtype="float16")
    m["memory"].update(weights_bytes=p.weights_bytes, kv_bytes_per_token=p.kv_bytes_per_token,
                       kv_cache_bytes=p.kv_bytes, prefill_chunk=256)
    m.pop("files")
    write_manifest(folder, m)
    return folder


def test_engine_dry_run_prints_the_plan(r1_15b, trt_bundles, tmp_path, monkeypatch):
    from edgekit.export.trt_check import CheckReport

    bundle = _r1_manifest_bundle(r1_15b, trt_bundles["fp16"], tmp_path / "r1-1.5b-int4")
    # an R1 manifest over the tiny graph: its contract check would fail (tests/test_trt_engine.py runs it for real)
    checked = []
    monkeypatch.setattr(eb, "check_bundle_graph",
                        lambda m, t: checked.append(t.name) or CheckReport(quantized={"int4": 112, "int8": 2}))
    result = CliRunner().invoke(cli, ["engine", str(bundle), "--dry-run"])
    assert result.exit_code == 0, result.output
    out = result.output
    assert checked == ["orin-nano-8gb"]
    assert "graph        passes TensorRT 10.3's parser rules (edgekit's checker; quantized weights: 112 INT4, " \
           "2 INT8)" in out
    assert "DeepSeek-R1-Distill-Qwen-1.5B: int4, KV cache float16, 28 layers" in out
    assert "orin-nano-8gb (SM 8.7)" in out and "4096 tokens, prefill chunk 256" in out
    assert "profile 0    prefill: seq 1..256 (opt 256), past_seq 0..4095 (opt 256), 57 dynamic inputs" in out
    assert "profile 1    decode: seq 1, past_seq 0..4095 (opt 2048), 57 dynamic inputs" in out
    assert "1.00 GiB pool limit" in out and "STRONGLY_TYPED" in out and "builder flags: none" in out
    as_json = json.loads(CliRunner().invoke(cli, ["engine", str(bundle), "--dry-run", "--json"]).output)
    expected = plan_for_manifest(read_manifest(bundle), load_target("orin-nano")).to_dict()
    assert as_json == json.loads(json.dumps(expected))
    assert as_json["workspace_pool_bytes"] == GiB


def test_engine_and_selftest_without_gpu_fail_in_one_line(trt_bundles, monkeypatch):
    no_gpu = gd.DriverProbe("no-driver", "no NVIDIA GPU driver (libcuda.so.1 not found): install the driver")
    monkeypatch.setattr(gp, "probe_driver", lambda load=None: no_gpu)
    monkeypatch.setattr(trt_compat, "import_tensorrt", lambda probe: pytest.fail("TensorRT imported without a GPU"))
    runner = CliRunner()
    result = runner.invoke(cli, ["engine", str(trt_bundles["fp16"])])
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit)   # a clean exit, not a crash
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot build a TensorRT engine on this machine: no NVIDIA")
    result = runner.invoke(cli, ["selftest"])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        "error: selftest needs an NVIDIA GPU with TensorRT: no NVIDIA GPU driver (libcuda.so.1 not found): "
        "install the driver"]
    assert "tensorrt" not in sys.modules


def test_selftest_plumbing_with_standins():
    from edgekit.engine.selftest import run_selftest

    cuda = standin.FakeCuda()
    result = run_selftest(probe=standin.gpu_probe(), trt=standin.make_trt(cuda=cuda), cuda=cuda)
    assert result.passed and result.max_abs_diff == 0.0 and result.greedy_agree
    assert (result.steps, result.compute_capability, result.tensorrt_version) == (8, "8.7", "10.3.0")


def test_nothing_imports_tensorrt_or_cuda_at_import_time():
    code = ("import sys, edgekit.runtime.model, edgekit.runtime.trt_backend, edgekit.engine.builder, "
            "edgekit.engine.engine_plan, edgekit.engine.compat, edgekit.gpu, edgekit.cli; "
            "bad = [m for m in ('tensorrt', 'cuda', 'pycuda', 'onnx', 'torch') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def test_engine_and_selftest_commands_with_a_gpu(trt_bundles, copy_bundle, monkeypatch):
    """The success paths of the commands, with the stand-ins in place of the GPU, TensorRT and CUDA."""
    from edgekit.runtime import trt_backend

    cuda = standin.FakeCuda()
    trt = standin.make_trt(cuda=cuda)
    monkeypatch.setattr(gp, "probe_driver", lambda load=None: standin.gpu_probe())
    monkeypatch.setattr(trt_compat, "import_tensorrt", lambda probe: trt)
    monkeypatch.setattr(trt_backend.CudaRuntime, "load", classmethod(lambda cls: cuda))
    bundle = copy_bundle(trt_bundles["fp16"])
    result = CliRunner().invoke(cli, ["engine", str(bundle)])
    assert result.exit_code == 0, result.output
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("engine model.engine (") and "TensorRT 10.3.0 on Orin (SM 8.7)" in last
    assert "timing cache model.timing-cache (new); manifest updated" in last
    assert read_manifest(bundle).engine["compute_capability"] == "8.7"
    again = CliRunner().invoke(cli, ["engine", str(bundle), "--timing-cache", str(bundle / "model.timing-cache")])
    assert "(reused)" in again.output.strip().splitlines()[-1]
    result = CliRunner().invoke(cli, ["selftest"])
    assert result.exit_code == 0, result.output
    assert result.output.strip().splitlines()[-1].startswith("selftest PASS: max |logit difference| 0 (tolerance")
    assert json.loads(CliRunner().invoke(cli, ["selftest", "--json"]).output)["passed"] is True

    monkeypatch.setattr(gp, "probe_driver", lambda load=None: standin.gpu_probe(standin.RTX_4090))
    result = CliRunner().invoke(cli, ["engine", str(copy_bundle(trt_bundles["fp32"]))])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [result.output.strip()]
    assert "(SM 8.7) but this GPU is NVIDIA GeForce RTX 4090 (SM 8.9)" in result.output
    assert "--target rtx-4090" in result.output
