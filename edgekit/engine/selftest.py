"""``edgekit selftest``: build a tiny model's engine on this GPU and compare it with onnxruntime on the CPU.

The model is a 2-layer Qwen2-shaped decoder with random weights (fixed seed), exported in the ``tensorrt``
dialect at fp32 into a temporary folder. Its engine is built with the same adapter and plan code as real
bundles, then both backends run the same token sequence through the same step interface:

- a 11-token prompt, which the prefill profile takes as 8 + 3 tokens (a chunk after a non-empty past),
- then 6 single-token decode steps (the decode profile),

and the largest absolute difference of all logits is compared with a tolerance relative to the logits'
scale. TensorRT may use TF32 for fp32 matrix products on Ampere and newer GPUs (about 10 mantissa bits),
hence a tolerance of 1% of the largest logit rather than fp32 round-off; the greedy token must also agree.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..architectures import weight_shapes
from ..errors import BackendUnavailable
from ..spec import ModelSpec

CONTEXT = 64
CHUNK = 8
PROMPT = (5, 17, 99, 3, 250, 7, 64, 128, 31, 400, 2)          # 11 tokens: one full chunk + 3
DECODE = (11, 300, 42, 42, 8, 501)
RELATIVE_TOLERANCE = 1e-2
POOL_BYTES = 256 * 2**20


def tiny_spec() -> ModelSpec:
    """2 layers, 4 query heads over 2 KV heads, head_dim 16, qkv bias (Qwen2's shape in miniature)."""
    return ModelSpec(architecture="Qwen2ForCausalLM", family="qwen2", vocab_size=512, hidden_size=64,
                     intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                     rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=CONTEXT,
                     tie_word_embeddings=False, qkv_bias=True, name="edgekit-selftest-2layer")


class RandomWeights:
    """A WeightReader with seeded random weights of the shapes the spec implies."""

    def __init__(self, spec: ModelSpec, seed: int = 0):
        self.spec, self.seed = spec, seed

    def has(self, canonical: str, layer: int | None = None) -> bool:
        if canonical == "rope_freqs.weight":
            return False
        if canonical.endswith(".bias"):
            part = canonical.split(".")[-2]
            return part in ("q", "k", "v") and self.spec.qkv_bias
        return canonical in weight_shapes(self.spec)

    def tensor(self, canonical: str, layer: int | None = None) -> np.ndarray:
        shape = weight_shapes(self.spec).get(canonical)
        key = sum(map(ord, canonical)) * 31 + (layer or 0)
        rng = np.random.default_rng(self.seed * 1_000_003 + key)
        if canonical.endswith("norm.weight"):
            return (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        return (0.15 * rng.standard_normal(shape)).astype(np.float32)


@dataclass(frozen=True)
class SelftestResult:
    passed: bool
    max_abs_diff: float
    tolerance: float
    greedy_agree: bool
    steps: int
    device: str
    compute_capability: str
    tensorrt_version: str
    build_seconds: float
    detail: str

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "max_abs_diff": self.max_abs_diff, "tolerance": self.tolerance,
                "greedy_agree": self.greedy_agree, "steps": self.steps, "device": self.device,
                "compute_capability": self.compute_capability, "tensorrt_version": self.tensorrt_version,
                "build_seconds": round(self.build_seconds, 1), "detail": self.detail}


def _selftest_target(device) -> Any:
    """A GPU target with this device's compute capability (the plan needs one; the pool is fixed)."""
    from ..build.target import Backend, Target

    return Target(name=f"this-gpu-sm{device.sm.replace('.', '')}", aliases=(), description=device.name,
                  kind="desktop-gpu", total_memory_bytes=max(device.total_memory_bytes, 1),
                  total_memory_source="cuDeviceTotalMem", unified_memory=False,
                  budget_bytes=max(device.total_memory_bytes, 1), budget_source="cuDeviceTotalMem",
                  bandwidth_gbs=1.0, bandwidth_source="not used", compute_capability=device.compute_capability,
                  cma_bytes=0, cma_source="", software=(),
                  backends=(Backend("tensorrt", ("fp32", "fp16"), 0, "not used"),),
                  default_backend="tensorrt", prefill_chunk=CHUNK, prefill_chunk_source="selftest")


def run_selftest(*, probe=None, trt=None, cuda=None, workdir: str | Path | None = None,
                 progress: Callable[[str, int, int], None] | None = None) -> SelftestResult:
    """Build the tiny engine here and compare it with onnxruntime CPU. Raises BackendUnavailable without a GPU.

    ``probe``/``trt``/``cuda`` are for tests (stand-ins); by default the GPU is probed first and TensorRT is
    imported only when the probe found one.
    """
    from ..gpu.probe import probe_driver

    probe = probe if probe is not None else probe_driver()
    if not probe.ok:
        raise BackendUnavailable(f"selftest needs an NVIDIA GPU with TensorRT: {probe.detail}")
    device = probe.devices[0]
    if trt is None:
        from ..runtime.trt_compat import import_tensorrt

        trt = import_tensorrt(probe)
    try:
        from ..export import GraphOptions, export_onnx
    except ImportError as e:
        raise BackendUnavailable(f"selftest exports a tiny model and needs the build extras ({e.name} is missing): "
                                 "pip install 'edgekit[build]'") from None
    from ..runtime.ort_backend import OrtDecoder
    from ..runtime.trt_backend import CudaRuntime, TrtDecoder
    from .builder import build_engine
    from .engine_plan import engine_plan

    spec = tiny_spec()
    with tempfile.TemporaryDirectory(prefix="edgekit-selftest-", dir=workdir) as tmp:
        folder = Path(tmp)
        if progress:
            progress("export", 0, 1)
        exported = export_onnx(RandomWeights(spec), spec, folder,
                               GraphOptions(dialect="tensorrt", precision="fp32", max_context=CONTEXT))
        from ..export.trt_check import require_tensorrt_graph

        require_tensorrt_graph(folder / exported.model_file, spec, tensorrt=str(trt.__version__),
                               fix="this is an edgekit bug, please report it")     # before any TensorRT call
        plan = engine_plan(spec, _selftest_target(device), precision="fp32", max_context=CONTEXT,
                           inputs=exported.inputs, outputs=exported.outputs, prefill_chunk=CHUNK,
                           kv_dtype="float32", pool_bytes=POOL_BYTES)
        outcome = build_engine(trt, plan, folder / exported.model_file, folder / plan.engine_file,
                               progress=progress)
        profiles = {p.name: i for i, p in enumerate(plan.profiles)}
        ours = TrtDecoder(folder / plan.engine_file, spec=spec, capacity=CONTEXT, kv_dtype="float32", max_seq=CHUNK,
                          profiles=profiles, trt=trt, cuda=cuda if cuda is not None else CudaRuntime.load())
        reference = OrtDecoder(str(folder / exported.model_file), dialect="tensorrt", spec=spec, capacity=CONTEXT,
                               kv_dtype="float32", backend="onnxruntime-cpu")
        try:
            got, want = _run_both(ours, reference)
        finally:
            ours.close()
    return _verdict(got, want, device, outcome)


def _run_both(ours, reference) -> tuple[np.ndarray, np.ndarray]:
    """The logits of both decoders over the same steps: the prompt as two prefill chunks, then decode steps."""
    got, want = [], []
    sequence = [np.asarray(PROMPT[:CHUNK]), np.asarray(PROMPT[CHUNK:])] + [np.asarray([t]) for t in DECODE]
    for tokens in sequence:
        tokens = tokens.astype(np.int64)
        got.append(np.array(ours.step(tokens), dtype=np.float32))
        want.append(np.array(reference.step(tokens), dtype=np.float32))
    return np.stack(got), np.stack(want)


def _verdict(got_all: np.ndarray, want_all: np.ndarray, device, outcome) -> SelftestResult:
    diff = float(np.max(np.abs(got_all - want_all)))
    tolerance = RELATIVE_TOLERANCE * max(1.0, float(np.max(np.abs(want_all))))
    agree = bool(np.all(got_all.argmax(-1) == want_all.argmax(-1)))
    finite = bool(np.all(np.isfinite(got_all)))
    passed = finite and diff <= tolerance and agree
    detail = ("logits agree" if passed else "non-finite logits" if not finite else
              f"max |difference| {diff:.3g} above tolerance {tolerance:.3g}" if diff > tolerance else
              "the greedy token differs")
    return SelftestResult(passed, diff, tolerance, agree, len(got_all), device.name, device.sm,
                          outcome.tensorrt_version, outcome.seconds, detail)
