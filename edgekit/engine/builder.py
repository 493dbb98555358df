"""The adapter that calls TensorRT to build an engine, following an :class:`~edgekit.engine.engine_plan.EnginePlan`.

The ``tensorrt`` module is a parameter (``trt``), never imported at module level: tests pass a recording
stand-in that checks the calls against the TensorRT 10 Python API, and the CLI imports the real module
only after :func:`edgekit.gpu.probe_driver` found a GPU (TensorRT segfaults without one). The calls, in
order::

    logger  = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser  = trt.OnnxParser(network, logger); parser.parse_from_file(model.onnx)   # finds model.onnx.data
              (edgekit.export.trt_check has checked model.onnx against this TensorRT's parser rules first)
    config  = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, plan.workspace_pool_bytes)
    per profile: p = builder.create_optimization_profile(); p.set_shape(name, min, opt, max) for every
                 dynamic input; config.add_optimization_profile(p)
    cache = config.create_timing_cache(bytes of the cache file, or b""); config.set_timing_cache(cache, False)
    config.progress_monitor = <IProgressMonitor>           (TensorRT >= 10.0)
    engine = builder.build_serialized_network(network, config)   -> written to model.engine
    config.get_timing_cache().serialize()                         -> written to model.timing-cache
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import BackendUnavailable, BundleError, GpuStepFailed
from .engine_plan import EnginePlan

Progress = Callable[[str, int, int], None]    # (phase, steps done, steps in the phase)


@dataclass(frozen=True)
class BuildOutcome:
    engine_path: Path
    engine_bytes: int
    tensorrt_version: str
    timing_cache_path: Path | None
    timing_cache_reused: bool      # an existing cache was loaded (rebuilds are then much faster)
    seconds: float


def _atomic_write(path: Path, data) -> int:
    """Write bytes (or a buffer such as trt.IHostMemory) to ``path`` via a temporary name; returns the size."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    view = memoryview(data)
    try:
        with open(tmp, "wb") as f:
            f.write(view)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return view.nbytes


def _monitor(trt, progress: Progress | None, cancel: threading.Event | None):
    """An IProgressMonitor forwarding to ``progress``; None when TensorRT has none or nobody listens."""
    base = getattr(trt, "IProgressMonitor", None)
    if base is None or (progress is None and cancel is None):
        return None

    class Monitor(base):
        def __init__(self):
            base.__init__(self)            # pybind11 trampolines need the base initialised explicitly
            self._lock = threading.Lock()  # TensorRT may report from several threads
            self._steps: dict[str, int] = {}
            self._depth: dict[str, int] = {}

        def _report(self, phase: str, done: int) -> None:
            # Only the two outer levels: the inner ones (per-layer tactic timing) come by the hundred.
            if progress is None or self._depth.get(phase, 0) > 1:
                return
            try:
                progress(phase, done, self._steps.get(phase, 0))
            except Exception:   # a failing display must not fail a build that took minutes
                pass

        def phase_start(self, phase_name, parent_phase, num_steps):
            with self._lock:
                self._steps[phase_name] = int(num_steps)
                self._depth[phase_name] = 0 if parent_phase is None else self._depth.get(parent_phase, 0) + 1
                self._report(phase_name, 0)

        def step_complete(self, phase_name, step):
            with self._lock:
                self._report(phase_name, int(step) + 1)
            return not (cancel is not None and cancel.is_set())   # False asks TensorRT to stop

        def phase_finish(self, phase_name):
            with self._lock:
                self._report(phase_name, self._steps.get(phase_name, 0))

    return Monitor()


def _dynamic_inputs(network) -> dict[str, tuple[int, ...]]:
    out = {}
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        shape = tuple(int(d) for d in tensor.shape)
        if any(d < 0 for d in shape):
            out[tensor.name] = shape
    return out


def build_engine(trt, plan: EnginePlan, onnx_path: str | os.PathLike, engine_path: str | os.PathLike, *,
                 timing_cache: str | os.PathLike | None = None, progress: Progress | None = None,
                 cancel: threading.Event | None = None) -> BuildOutcome:
    """Parse ``onnx_path`` (its external data beside it), build the engine, write it and the timing cache."""
    started = time.perf_counter()
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = _parse(trt, builder, logger, plan, onnx_path)
    config = _builder_config(trt, builder, plan)
    cache_path = Path(timing_cache) if timing_cache is not None else None
    reused = _load_timing_cache(config, cache_path)

    monitor = _monitor(trt, progress, cancel)
    if monitor is not None:
        config.progress_monitor = monitor

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        if cancel is not None and cancel.is_set():
            raise BackendUnavailable("the engine build was cancelled")
        raise GpuStepFailed(
            f"TensorRT {trt.__version__} could not build the engine (its messages above say why): a build that "
            f"runs out of memory needs a smaller workspace pool ({plan.workspace_pool_bytes // 2**20} MiB now) "
            "or a shorter --context")
    size = _atomic_write(engine_path, serialized)

    if cache_path is not None:
        final_cache = config.get_timing_cache()
        if final_cache is not None:
            _atomic_write(cache_path, final_cache.serialize())
    return BuildOutcome(engine_path, size, str(trt.__version__), cache_path, reused,
                        time.perf_counter() - started)


def _parse(trt, builder, logger, plan: EnginePlan, onnx_path: Path):
    """The network parsed from ``onnx_path``, after checking every dynamic input has a range in each profile."""
    flags = 0
    for name in plan.network_flags:
        flags |= 1 << int(getattr(trt.NetworkDefinitionCreationFlag, name))
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    # parse_from_file (not parse(bytes)) so the parser resolves model.onnx.data relative to the model's folder.
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        first = errors[0].splitlines()[0][:300] if errors else "no error message"
        # edgekit's checker (export/trt_check.py) passed before this call: TensorRT disagreeing is a tool failure
        raise GpuStepFailed(f"TensorRT {trt.__version__} cannot parse {onnx_path.name}: {first} "
                            f"({len(errors)} error(s)): check that this TensorRT supports the graph's opset "
                            "and types, or rebuild the bundle with this edgekit")

    dynamic = _dynamic_inputs(network)
    for profile in plan.profiles:
        covered = {s.name for s in profile.shapes}
        missing = sorted(set(dynamic) - covered)
        if missing:
            raise BundleError(f"the graph's input {missing[0]} has dynamic shape {dynamic[missing[0]]} but the "
                              f"{profile.name} profile has no range for it: the manifest does not match "
                              f"{onnx_path.name}; rebuild the bundle")
    return network


def _builder_config(trt, builder, plan: EnginePlan):
    """The builder config: workspace pool, builder flags and one optimization profile per plan profile."""
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(plan.workspace_pool_bytes))
    for name in plan.builder_flags:
        config.set_flag(getattr(trt.BuilderFlag, name))
    for profile in plan.profiles:
        p = builder.create_optimization_profile()
        for s in profile.shapes:
            p.set_shape(s.name, s.min, s.opt, s.max)
        if config.add_optimization_profile(p) < 0:
            raise BackendUnavailable(f"TensorRT rejected the {profile.name} optimization profile "
                                     f"({profile.to_dict()['seq']} tokens): see the messages above")
    return config


def _load_timing_cache(config, cache_path: Path | None) -> bool:
    """Give the config the cache file's timing cache (or an empty one); True when an existing cache was used."""
    reused = False
    cached = b""
    if cache_path is not None and cache_path.is_file():
        cached = cache_path.read_bytes()
    cache = config.create_timing_cache(cached)
    if cache is not None and config.set_timing_cache(cache, False):
        reused = bool(cached)
    elif cached:
        # Made by another TensorRT version or GPU: start afresh rather than fail (it is only a speed-up).
        config.set_timing_cache(config.create_timing_cache(b""), False)
    return reused


# ----- a bundle -------------------------------------------------------------------------------------------
def check_bundle_graph(manifest, target) -> Any:
    """TensorRT's parser rules (:mod:`edgekit.export.trt_check`) for the version ``target`` names, applied to
    the bundle's graph before any TensorRT call; BundleError (one line: node, rule, source) when one fails."""
    try:
        from ..export.trt_check import require_tensorrt_graph
    except ImportError as e:
        raise BackendUnavailable(f"edgekit engine checks the graph with the onnx package ({e.name} is missing): "
                                 "pip install onnx") from None
    return require_tensorrt_graph(manifest.path(manifest.graph["file"]), manifest.spec(),
                                  tensorrt=dict(target.software).get("tensorrt"),
                                  fix=f"rebuild the bundle with this edgekit (edgekit build MODEL --target "
                                      f"{target.name})")


def bundle_plan(bundle: str | os.PathLike) -> tuple[Any, Any, EnginePlan]:
    """(manifest, target, plan) of a bundle, reading nothing but its manifest (``--dry-run``)."""
    from ..build.target import load_target
    from ..runtime.bundle import read_manifest
    from .engine_plan import plan_for_manifest

    manifest = read_manifest(bundle)
    target = load_target(str(manifest.target["name"]))
    return manifest, target, plan_for_manifest(manifest, target)


def build_bundle_engine(bundle: str | os.PathLike, *, trt, probe, timing_cache: str | os.PathLike | None = None,
                        progress: Progress | None = None, verify_weights: bool = True,
                        cancel: threading.Event | None = None) -> tuple[dict, BuildOutcome]:
    """Build the engine of a bundle on this machine and record it in the manifest.

    Order: plan (manifest only) -> refuse a GPU of another compute capability -> verify the bundle's files
    -> build (engine and timing cache beside the graph) -> rewrite manifest.json with the ``engine``
    section. Returns (the manifest as written, the outcome).
    """
    from ..build.target import list_targets
    from ..runtime.bundle import verify, write_manifest
    from ..runtime.trt_compat import check_tensorrt_version
    from .compat import check_build
    from .engine_plan import engine_section

    manifest, target, plan = bundle_plan(bundle)
    here = {d.sm for d in probe.devices}
    device = check_build(target.name, target.sm, probe,
                         targets_for_sm=[t.name for t in list_targets() if t.sm in here])
    check_tensorrt_version(str(trt.__version__))
    if progress:
        progress("verifying the bundle", 0, 1)
    verify(bundle, weights=verify_weights).raise_for_problems()
    check_bundle_graph(manifest, target)

    folder = Path(bundle)
    graph = manifest.graph
    onnx_path = manifest.path(graph["file"])
    cache = Path(timing_cache) if timing_cache is not None else folder / plan.timing_cache_file
    outcome = build_engine(trt, plan, onnx_path, folder / plan.engine_file, timing_cache=cache, progress=progress,
                           cancel=cancel)
    data_file = graph.get("data")
    in_bundle = cache.resolve().parent == folder.resolve()
    section = engine_section(
        plan, tensorrt_version=outcome.tensorrt_version, device=device, onnx_file=graph["file"],
        onnx_sha256=manifest.files[graph["file"]]["sha256"], onnx_data_file=data_file,
        onnx_data_sha256=manifest.files[data_file]["sha256"] if data_file in manifest.files else None,
        timing_cache=cache.name if in_bundle else None, build_seconds=outcome.seconds)
    data = manifest.to_dict()
    data["engine"] = section
    data.pop("files", None)          # write_manifest lists (and hashes) every file again, the engine included
    if progress:
        progress("hashing", 0, 1)
    return write_manifest(folder, data), outcome
