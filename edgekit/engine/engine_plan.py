"""The TensorRT engine build plan: everything decided before TensorRT is called, as plain data.

``engine_plan(spec, target, precision=..., max_context=..., inputs=...)`` says what the builder adapter
(:mod:`edgekit.engine.builder`) will ask TensorRT for:

- two optimization profiles over the graph contract of the ``tensorrt`` dialect
  (:mod:`edgekit.export.decoder`): ``prefill`` (1 .. prefill_chunk new tokens) and ``decode`` (exactly 1),
  each with the cached length ``past_seq`` from 0 to max_context - 1, batch fixed at 1. Decode is the hot
  path, so it gets a profile whose kernels are tuned for one token;
- the WORKSPACE memory-pool limit, from the target's budget minus what the plan already spends (weights,
  KV cache, activations, the backend's overhead), capped so that an engine cannot take the whole headroom;
- a strongly typed network (the ONNX types decide every precision): TensorRT 11 removed the weak-typing
  FP16/INT8 builder flags, so this one path serves TensorRT 10 and 11 alike, and no builder flag is set;
- the engine and timing-cache file names, kept beside each other in the bundle.

Nothing here imports TensorRT; every number is testable on a machine without a GPU.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from ..build.memory_plan import plan as memory_plan
from ..build.target import Target
from ..errors import BundleError, DoesNotFit, UserInputError
from ..spec import ModelSpec
from ..units import GiB, MiB, fmt_bytes

ENGINE_FILE = "model.engine"
TIMING_CACHE_FILE = "model.timing-cache"
NETWORK_FLAGS = ("STRONGLY_TYPED",)
# A cap on the builder's scratch pool. TensorRT sizes an execution context's device memory from the tactics
# it picked, and the pool limit bounds their scratch: without a cap a desktop build could pick tactics
# that hold GBs at run time. 1 GiB leaves every GEMM tactic of a batch-1 decoder available.
POOL_CAP = 1 * GiB
POOL_MIN = 64 * MiB       # below this TensorRT has too few tactics to build a decoder reliably
BATCH = 1                 # the runtime decodes one sequence

# Symbolic dimension names of the graph contract (edgekit.export.decoder).
DIM_BATCH, DIM_SEQ, DIM_PAST = "batch", "seq", "past_seq"
_KV_DTYPES = {"fp32": "float32", "fp16": "float16", "float32": "float32", "float16": "float16"}


@dataclass(frozen=True)
class ShapeRange:
    """One input of one profile: the shapes TensorRT must accept (min .. max) and tunes kernels for (opt)."""

    name: str
    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "min": list(self.min), "opt": list(self.opt), "max": list(self.max)}


@dataclass(frozen=True)
class Profile:
    name: str                          # "prefill" | "decode"
    seq: tuple[int, int, int]          # (min, opt, max) new tokens per step
    past: tuple[int, int, int]         # (min, opt, max) tokens already in the cache
    shapes: tuple[ShapeRange, ...]     # every dynamic input

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "seq": list(self.seq), "past_seq": list(self.past),
                "shapes": [s.to_dict() for s in self.shapes]}


@dataclass(frozen=True)
class EnginePlan:
    model: str
    target: str
    compute_capability: str | None
    precision: str
    kv_dtype: str                      # "float16" | "float32": the cache inputs' element type
    max_context: int
    prefill_chunk: int
    num_layers: int
    profiles: tuple[Profile, ...]
    workspace_pool_bytes: int
    workspace_pool_source: str
    inputs: tuple[dict, ...]
    outputs: tuple[dict, ...]
    network_flags: tuple[str, ...] = NETWORK_FLAGS
    builder_flags: tuple[str, ...] = ()
    engine_file: str = ENGINE_FILE
    timing_cache_file: str = TIMING_CACHE_FILE
    notes: tuple[str, ...] = field(default=())

    def profile_index(self, name: str) -> int:
        return next(i for i, p in enumerate(self.profiles) if p.name == name)

    def to_dict(self) -> dict[str, Any]:
        """The build options, as recorded in the manifest's ``engine.options`` and printed by --dry-run."""
        return {"model": self.model, "target": self.target, "compute_capability": self.compute_capability,
                "precision": self.precision, "kv_dtype": self.kv_dtype, "max_context": self.max_context,
                "prefill_chunk": self.prefill_chunk, "num_layers": self.num_layers,
                "profiles": [p.to_dict() for p in self.profiles],
                "workspace_pool_bytes": self.workspace_pool_bytes,
                "workspace_pool_source": self.workspace_pool_source,
                "network_flags": list(self.network_flags), "builder_flags": list(self.builder_flags),
                "engine_file": self.engine_file, "timing_cache_file": self.timing_cache_file,
                "notes": list(self.notes)}


# ----- the graph contract ---------------------------------------------------------------------------------
def contract_io(spec: ModelSpec, kv_dtype: str) -> tuple[tuple[dict, ...], tuple[dict, ...]]:
    """Inputs and outputs of the ``tensorrt`` dialect graph for ``spec`` (logits "last"), in the exporter's
    format ``{"name", "dtype", "shape"}``: what a bundle's manifest lists, without building one."""
    kv = _KV_DTYPES[kv_dtype]
    hkv, d = spec.num_kv_heads, spec.head_dim
    inputs = [{"name": "input_ids", "dtype": "int64", "shape": [DIM_BATCH, DIM_SEQ]}]
    outputs = []
    for i in range(spec.num_layers):
        for kind in ("key", "value"):
            inputs.append({"name": f"past_{kind}_{i}", "dtype": kv, "shape": [DIM_BATCH, DIM_PAST, hkv, d]})
            outputs.append({"name": f"new_{kind}_{i}", "dtype": kv, "shape": [DIM_BATCH, DIM_SEQ, hkv, d]})
    outputs.append({"name": "logits", "dtype": "float32", "shape": [DIM_BATCH, 1, spec.vocab_size]})
    return tuple(inputs), tuple(outputs)


def profile_ranges(max_context: int, prefill_chunk: int) -> dict[str, dict[str, tuple[int, int, int]]]:
    """(min, opt, max) of ``seq`` and ``past_seq`` per profile.

    A step appends S tokens after P cached ones with P + S <= max_context, so P never exceeds
    max_context - 1. Each dimension's range is independent in TensorRT; the runtime refuses P + S beyond
    the cache before it asks. The opt points are where kernels are timed: a prompt chunk after a short
    history (an empty past is legal but a poor tuning point), and one token half way into the context
    (the average position of a decode step over a conversation that fills the cache).
    """
    if max_context < 2:
        raise UserInputError(f"max_context {max_context} is too small for an engine: use at least 2 tokens")
    if prefill_chunk < 1:
        raise UserInputError(f"prefill_chunk {prefill_chunk} must be at least 1 token")
    chunk = min(prefill_chunk, max_context)
    last = max_context - 1
    return {
        "prefill": {DIM_SEQ: (1, chunk, chunk), DIM_PAST: (0, max(0, min(chunk, max_context - chunk)), last)},
        "decode": {DIM_SEQ: (1, 1, 1), DIM_PAST: (0, max_context // 2, last)},
    }


def _dim(value: Any, ranges: dict[str, tuple[int, int, int]], where: str) -> tuple[int, int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise BundleError(f"{where} has a negative dimension {value}: rebuild the bundle")
        return value, value, value
    if value == DIM_BATCH:
        return BATCH, BATCH, BATCH
    if value in ranges:
        return ranges[value]
    raise BundleError(f"{where} has the dimension {value!r}, which the tensorrt graph contract does not know "
                      f"(known: {DIM_BATCH}, {DIM_SEQ}, {DIM_PAST}): rebuild the bundle with this edgekit")


def build_profiles(inputs: tuple[dict, ...] | list[dict], max_context: int,
                   prefill_chunk: int) -> tuple[Profile, ...]:
    """The prefill and decode profiles, with a shape range for every input that has a symbolic dimension."""
    names = {io["name"] for io in inputs}
    if "input_ids" not in names or "past_key_0" not in names:
        raise BundleError("the graph has no input_ids/past_key_0 inputs: it is not a tensorrt-dialect decoder; "
                          "rebuild the bundle for a TensorRT target (edgekit build --target orin-nano)")
    profiles = []
    for name, ranges in profile_ranges(max_context, prefill_chunk).items():
        shapes = []
        for io in inputs:
            if all(isinstance(d, int) and not isinstance(d, bool) for d in io["shape"]):
                continue   # a static input needs no profile entry
            dims = [_dim(d, ranges, f"graph input {io['name']}") for d in io["shape"]]
            shapes.append(ShapeRange(io["name"], tuple(d[0] for d in dims), tuple(d[1] for d in dims),
                                     tuple(d[2] for d in dims)))
        profiles.append(Profile(name, ranges[DIM_SEQ], ranges[DIM_PAST], tuple(shapes)))
    return tuple(profiles)


# ----- memory ---------------------------------------------------------------------------------------------
def pool_limit(spec: ModelSpec, target: Target, *, precision: str, max_context: int,
               weights_bytes: int | None = None, cap: int = POOL_CAP) -> tuple[int, str, int]:
    """(WORKSPACE pool bytes, how it was derived, prefill chunk) for ``spec`` on ``target``.

    Headroom = budget - (weights + KV cache at max_context + activations of one prefill chunk + the
    TensorRT backend's overhead), from :func:`edgekit.build.memory_plan.plan`; ``weights_bytes`` replaces the planner's
    weight estimate when a bundle knows its real size. The pool gets the headroom, capped at ``cap`` and
    rounded down to whole MiB; less than POOL_MIN of headroom is DoesNotFit.
    """
    p = memory_plan(spec, target, precision=precision, context=max_context, backend="tensorrt")
    weights = p.weights_bytes if weights_bytes is None else int(weights_bytes)
    used = weights + p.kv_bytes + p.workspace_bytes + p.overhead_bytes
    headroom = p.budget_bytes - used
    if headroom < POOL_MIN:
        raise DoesNotFit(
            f"{spec.name or 'the model'} at {precision} with context {max_context} leaves "
            f"{fmt_bytes(max(headroom, 0))} of {target.name}'s {fmt_bytes(p.budget_bytes)} budget for TensorRT's "
            f"builder workspace, less than the {fmt_bytes(POOL_MIN)} it needs: rebuild the bundle with a shorter "
            f"--context (edgekit plan shows the breakdown)")
    pool = min(headroom, cap) // MiB * MiB
    source = (f"budget {fmt_bytes(p.budget_bytes)} - weights {fmt_bytes(weights)} - KV cache "
              f"{fmt_bytes(p.kv_bytes)} - activations {fmt_bytes(p.workspace_bytes)} - overhead "
              f"{fmt_bytes(p.overhead_bytes)} = {fmt_bytes(headroom)} headroom"
              + (f", capped at {fmt_bytes(cap)}" if headroom > cap else ""))
    return pool, source, p.prefill_chunk


def kv_dtype_for(target: Target, precision: str) -> str:
    """The cache element type TensorRT computes with for ``precision`` (the planner's compute dtype)."""
    from ..build.precision import compute_dtype

    return _KV_DTYPES.get(compute_dtype(precision, "gpu"), "float16")


# ----- the plan -------------------------------------------------------------------------------------------
def engine_plan(spec: ModelSpec, target: Target, *, precision: str, max_context: int,
                inputs: tuple[dict, ...] | list[dict] | None = None, outputs: tuple[dict, ...] | list[dict] = (),
                prefill_chunk: int | None = None, weights_bytes: int | None = None,
                kv_dtype: str | None = None, pool_bytes: int | None = None) -> EnginePlan:
    """The engine build plan for ``spec`` at ``precision`` on ``target`` (a GPU target).

    ``inputs``/``outputs`` are the graph's I/O as a manifest lists them (default: the graph contract for
    ``spec``). ``pool_bytes`` replaces the budget-derived pool (selftest uses a fixed small one).
    """
    if target.compute_capability is None:
        raise UserInputError(f"target {target.name} has no GPU: TensorRT engines are built for GPU targets "
                             "(edgekit targets lists them)")
    if "tensorrt" not in target.backend_names:
        raise UserInputError(f"target {target.name} has no tensorrt backend: use one of "
                             f"{', '.join(target.backend_names)}")
    kv = _KV_DTYPES.get(kv_dtype or "", None) or kv_dtype_for(target, precision)
    if inputs is None:
        inputs, outputs = contract_io(spec, kv)
    if pool_bytes is None:
        pool, pool_source, chunk = pool_limit(spec, target, precision=precision, max_context=max_context,
                                              weights_bytes=weights_bytes)
    else:
        pool, pool_source, chunk = int(pool_bytes), "given by the caller", target.prefill_chunk
    chunk = min(prefill_chunk or chunk, max_context)
    notes = []
    if target.kind == "jetson":
        notes.append("build on the device itself (or an identical one): TensorRT cannot build Jetson engines "
                     "on another GPU architecture, and an engine only loads in the TensorRT version that built it")
    return EnginePlan(
        model=spec.name, target=target.name, compute_capability=target.sm, precision=precision, kv_dtype=kv,
        max_context=max_context, prefill_chunk=chunk, num_layers=spec.num_layers,
        profiles=build_profiles(inputs, max_context, chunk), workspace_pool_bytes=pool,
        workspace_pool_source=pool_source, inputs=tuple(inputs), outputs=tuple(outputs), notes=tuple(notes))


def plan_for_manifest(manifest, target: Target) -> EnginePlan:
    """The plan for a bundle (a :class:`edgekit.runtime.bundle.Manifest`) on its target."""
    if manifest.dialect != "tensorrt":
        # suggest a build that exists: the bundle's own target only when it has a TensorRT backend
        fix = (f"--target {target.name} --backend tensorrt" if "tensorrt" in target.backend_names else
               "--target orin-nano, or another GPU target from edgekit targets")
        raise BundleError(f"bundle {manifest.folder} holds the {manifest.dialect!r} graph dialect (built for "
                          f"{manifest.backend} on {target.name}), which TensorRT cannot build: rebuild it for "
                          f"TensorRT with edgekit build MODEL {fix}")
    return engine_plan(manifest.spec(), target, precision=manifest.precision, max_context=int(manifest.max_context),
                       inputs=manifest.graph["inputs"], outputs=manifest.graph["outputs"],
                       prefill_chunk=int(manifest.memory.get("prefill_chunk") or target.prefill_chunk),
                       weights_bytes=int(manifest.memory["weights_bytes"]),
                       kv_dtype=manifest.graph.get("kv_dtype"))


# ----- the manifest's engine section ----------------------------------------------------------------------
def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def engine_section(plan: EnginePlan, *, tensorrt_version: str, device: Any, onnx_file: str, onnx_sha256: str,
                   onnx_data_file: str | None, onnx_data_sha256: str | None, timing_cache: str | None,
                   build_seconds: float, built: str | None = None) -> dict[str, Any]:
    """The manifest's ``engine`` section: what the engine is, what it was built from, and how.

    ``device`` is the :class:`edgekit.gpu.GpuDevice` it was built on. The runtime compares
    ``tensorrt_version`` and ``compute_capability`` with the machine before loading the engine.
    """
    return {
        "file": plan.engine_file,
        "format": "tensorrt-plan",
        "tensorrt_version": tensorrt_version,
        "compute_capability": device.sm,
        "device": device.name,
        "built": built or datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "build_seconds": round(float(build_seconds), 1),
        "onnx": {"file": onnx_file, "sha256": onnx_sha256, "data_file": onnx_data_file,
                 "data_sha256": onnx_data_sha256},
        "timing_cache": timing_cache,
        "options": {k: v for k, v in plan.to_dict().items() if k not in ("notes", "model", "target")},
    }
