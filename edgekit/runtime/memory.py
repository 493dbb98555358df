"""What a bundle will allocate, what this device has free, and the check between them.

The check runs before anything is allocated: a robot that runs out of memory halfway through loading takes
its other processes down with it (the Linux OOM killer does not pick the newcomer), so refusing up front
with numbers is the only safe answer.

Where "available" comes from:
- Linux host or Jetson (unified memory: the GPU allocates from the same RAM): ``MemAvailable`` in
  /proc/meminfo. On Jetson, large single buffers also come from the CMA pool / NvMap carve-outs, which can
  fail below MemAvailable; ``edgekit plan`` warns about the largest single tensor for that reason.
- In a container: the cgroup limit (v2 ``memory.max`` minus ``memory.current``; v1 ``memory.limit_in_bytes``
  minus ``memory.usage_in_bytes``) when it is lower.
- A desktop GPU's own free memory is the TensorRT backend's concern (it asks CUDA); onnxruntime-cuda
  bundles are checked against host memory only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import BudgetExceeded, BundleError
from .dtypes import KV_DTYPES, ONNX_ELEM_BYTES, ONNX_ELEM_TYPES

MiB = 1024 * 1024


@dataclass(frozen=True)
class MemoryNeed:
    weights_bytes: int
    kv_cache_bytes: int
    workspace_bytes: int
    overhead_bytes: int
    max_context: int

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.kv_cache_bytes + self.workspace_bytes + self.overhead_bytes


def need_for(memory: dict, max_context: int) -> MemoryNeed:
    """The allocation for ``max_context`` from a manifest's ``memory`` section."""
    return MemoryNeed(int(memory["weights_bytes"]), int(memory["kv_bytes_per_token"]) * max_context,
                      int(memory.get("workspace_bytes", 0)), int(memory.get("overhead_bytes", 0)), max_context)


def graph_memory(manifest, info) -> dict:
    """The manifest's ``memory`` section with what the backend really allocates in place of its claims.

    A manifest is untrusted and the budget check must hold against a hostile one: the KV bytes per token
    come from the graph's ``past_*`` inputs (checked to agree with the model section, which sizes the
    buffers: 2 x layers x kv_heads x head_dim x the cache's element size), and the weights are at least
    the size of the files the graph reads (their sizes are verified). ``info`` is the graph's
    :class:`edgekit.runtime.onnx_refs.GraphInfo`.
    """
    spec, graph = manifest.spec(), manifest.graph["file"]
    kv_dtype = manifest.graph.get("kv_dtype", "float32")
    if kv_dtype not in KV_DTYPES:
        raise BundleError(f"manifest.json graph.kv_dtype {kv_dtype!r} is not a KV cache type edgekit knows "
                          f"({', '.join(KV_DTYPES)}): rebuild the bundle")
    elem = ONNX_ELEM_TYPES[KV_DTYPES[kv_dtype]]
    expected = {f"past_{kind}_{i}" for i in range(spec.num_layers) for kind in ("key", "value")}
    past = {name: v for name, v in info.inputs.items() if name.startswith("past_")}
    per_token = 0
    for name in sorted(expected | set(past)):
        elem_type, dims = past.get(name, (0, []))
        if name not in expected or elem_type != elem or [d for d in dims if isinstance(d, int)] != \
                [spec.num_kv_heads, spec.head_dim] or len(dims) != 4:
            shown = "missing" if name not in past else f"type {elem_type} with shape {dims}"
            raise BundleError(
                f"{graph} input {name} is {shown} but the manifest describes {spec.num_layers} layers of "
                f"{kv_dtype} K/V with {spec.num_kv_heads} kv heads x head_dim {spec.head_dim}: the manifest does "
                "not match the graph (corrupt or hostile); rebuild the bundle")
        per_token += spec.num_kv_heads * spec.head_dim * ONNX_ELEM_BYTES[elem_type]
    graph_dir = graph.rpartition("/")[0]
    data = {f"{graph_dir}/{loc}" if graph_dir else loc for loc in info.locations}
    weights = sum(int(manifest.files[name]["size"]) for name in data if name in manifest.files)
    if manifest.engine:
        weights = max(weights, int(manifest.files[manifest.engine["file"]]["size"]))
    return {**manifest.memory, "kv_bytes_per_token": per_token,
            "weights_bytes": max(weights, int(manifest.memory["weights_bytes"]))}


def rotary_rows(manifest, info) -> int:
    """How many positions the graph's rotary tables cover: the longest context it can run."""
    names = info.rotary_tables | ({"rope.cos", "rope.sin"} & set(info.initializers))
    rows = [info.initializers[n][0] for n in names if len(info.initializers.get(n, ())) == 2]
    if not rows or len(rows) != len(names):
        raise BundleError(f"{manifest.graph['file']} has no rotary table edgekit can read (rope.cos, rope.sin): "
                          "it is not an edgekit graph, or it is corrupt; rebuild the bundle")
    return min(rows)


def read_meminfo(root: Path = Path("/")) -> dict[str, int]:
    """MemTotal, MemAvailable, CmaTotal, CmaFree (those present) in bytes from /proc/meminfo."""
    out: dict[str, int] = {}
    try:
        lines = (root / "proc/meminfo").read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        key, _, rest = line.partition(":")
        if key in ("MemTotal", "MemAvailable", "CmaTotal", "CmaFree"):
            parts = rest.split()
            if parts and parts[0].isdigit():
                out[key] = int(parts[0]) * (1024 if len(parts) > 1 and parts[1].lower() == "kb" else 1)
    return out


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def cgroup_limit(root: Path = Path("/")) -> int | None:
    """The container's memory limit (cgroup v2 ``memory.max``), or None without one ("max" or no cgroup v2)."""
    return _read_int(root / "sys/fs/cgroup/memory.max")


def available_memory(root: Path = Path("/")) -> tuple[int, str]:
    """(bytes available to this process, where the number comes from). ``root`` is for tests."""
    candidates: list[tuple[int, str]] = []
    available = read_meminfo(root).get("MemAvailable")
    if available is not None:
        candidates.append((available, "MemAvailable in /proc/meminfo"))
    cg = root / "sys/fs/cgroup"
    limit, used = cgroup_limit(root), _read_int(cg / "memory.current")
    if limit is not None and used is not None:
        candidates.append((max(0, limit - used), "cgroup v2 memory.max - memory.current"))
    limit, used = _read_int(cg / "memory/memory.limit_in_bytes"), _read_int(cg / "memory/memory.usage_in_bytes")
    if limit is not None and used is not None and limit < (1 << 60):
        candidates.append((max(0, limit - used), "cgroup v1 memory.limit_in_bytes - usage"))
    if not candidates:
        return (1 << 62), "unknown (no /proc/meminfo): not checked"
    return min(candidates)


def check_budget(memory: dict, max_context: int, *, budget: int | None = None,
                 available: tuple[int, str] | None = None, bundle_context: int | None = None) -> MemoryNeed:
    """Raise BudgetExceeded (with the largest max_context that fits) unless the need fits; return the need."""
    need = need_for(memory, max_context)
    free, source = available if available is not None else available_memory()
    limit, what = (free, source)
    if budget is not None and budget < free:
        limit, what = budget, "memory_budget"
    if need.total_bytes <= limit:
        return need
    per_token = int(memory["kv_bytes_per_token"])
    fixed = need.weights_bytes + need.workspace_bytes + need.overhead_bytes
    fits = max(0, (limit - fixed) // per_token) if per_token else 0
    fits = min(fits, bundle_context or max_context)
    hint = (f"the largest max_context that fits is {fits}" if fits >= 16 else
            "even the weights do not fit: free memory, raise the budget, or use a smaller/lower-precision bundle")
    raise BudgetExceeded(
        f"this bundle needs {need.total_bytes / MiB:.0f} MiB for max_context {max_context} (weights "
        f"{need.weights_bytes / MiB:.0f} MiB + KV cache {need.kv_cache_bytes / MiB:.0f} MiB + workspace "
        f"{need.workspace_bytes / MiB:.0f} MiB + runtime {need.overhead_bytes / MiB:.0f} MiB) but only "
        f"{limit / MiB:.0f} MiB is available ({what}); {hint}",
        needed_bytes=need.total_bytes, available_bytes=limit, max_context=fits if fits >= 16 else 0)


_malloc_trim: list = []


def release_free_heap() -> None:
    """Give freed heap pages back to the system (glibc's malloc_trim; nothing elsewhere).

    glibc keeps freed heap pages, and its mmap threshold grows after large frees, so buffers of a few MiB end up
    on the heap: onnxruntime's constant folding at session creation (the expansion of compact scales) left
    ~2.6 GiB of such pages behind for R1-Distill-Qwen-7B, and a burst of large server requests tens of MiB."""
    if not _malloc_trim:
        import ctypes
        import ctypes.util

        try:
            _malloc_trim.append(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim)
        except (OSError, AttributeError):   # not glibc (musl, macOS): nothing to trim with
            _malloc_trim.append(None)
    if _malloc_trim[0] is not None:
        _malloc_trim[0](0)
