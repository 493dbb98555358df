"""Device targets: one TOML file per device in ``targets/`` (packaged as ``edgekit.targets``), read into
frozen :class:`Target` objects, and the one capability table that says which backend runs which precision.

A target is data, not code: memory, the usable budget and why, each backend's fixed overhead and why,
bandwidth, compute capability, CMA pool, software stack. Adding a device is adding a file; a user can also
give the path of their own ``.toml`` wherever a target name is accepted. This module holds the types,
the capability table and finding a target by name; :mod:`edgekit.build.target_file` reads and checks a file.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from ..errors import UnknownTarget, UnsupportedPrecision, UserInputError
from .precision import PRECISIONS, PRECISIONS_SMALL_FIRST

# Backend name -> where it computes. onnxruntime-cpu on a Jetson still uses the same (unified) memory.
BACKENDS: dict[str, str] = {"tensorrt": "gpu", "onnxruntime-cuda": "gpu", "onnxruntime-cpu": "cpu", "ggml-cpu": "cpu"}
KINDS = ("jetson", "desktop-gpu", "cpu")

# What each backend can run at all, whatever the device; the TOML files list a subset.
BACKEND_PRECISIONS: dict[str, tuple[str, ...]] = {
    "tensorrt": PRECISIONS,
    "onnxruntime-cuda": ("fp32", "fp16", "bf16", "int8", "int4"),
    # onnxruntime's CPU kernels compute in fp32; int8/int4 are weight-only MatMuls that dequantize to fp32.
    "onnxruntime-cpu": ("fp32", "int8", "int4"),
    # llama.cpp's CPU kernels run a GGUF's blocks as stored: the precision is the file's (ggml_precision).
    "ggml-cpu": ("fp32", "fp16", "int8", "int4"),
}


@dataclass(frozen=True)
class _HardwareRule:
    precision: str
    min_sm: tuple[int, int]
    reason: str
    excluded: tuple[tuple[str, str], ...] = ()     # (target kind, backend) pairs that lack it anyway


# Hardware facts every target file must agree with; check_combination quotes the reason.
HARDWARE_RULES: dict[str, _HardwareRule] = {
    "fp8": _HardwareRule("fp8", (8, 9), "FP8 needs SM 8.9 or newer: Ada, Hopper, Blackwell"),
    "bf16": _HardwareRule("bf16", (8, 0), "BF16 needs SM 8.0 or newer, and TensorRT 10.3 on Orin (SM 8.7) "
                          "has no BF16 kernels", excluded=(("jetson", "tensorrt"),)),
}
_CPU_REASON = "onnxruntime's CPU kernels compute in fp32"


@dataclass(frozen=True)
class Backend:
    """One backend on one target: the precisions it runs there and its fixed memory overhead."""

    name: str
    precisions: tuple[str, ...]
    overhead_bytes: int
    overhead_source: str

    @property
    def device(self) -> str:
        return BACKENDS[self.name]


@dataclass(frozen=True)
class Target:
    name: str
    aliases: tuple[str, ...]
    description: str
    kind: str                                   # jetson | desktop-gpu | cpu
    total_memory_bytes: int
    total_memory_source: str
    unified_memory: bool                        # Jetson: CPU and GPU share one DRAM
    budget_bytes: int                           # what edgekit may plan to use by default
    budget_source: str
    bandwidth_gbs: float                        # memory bandwidth, GB/s (10^9 bytes)
    bandwidth_source: str
    compute_capability: tuple[int, int] | None  # None for the cpu target
    cma_bytes: int                              # Jetson contiguous-memory pool; 0 elsewhere
    cma_source: str
    software: tuple[tuple[str, str], ...]       # (component, version) pairs
    backends: tuple[Backend, ...]
    default_backend: str
    prefill_chunk: int                          # prompt tokens the runtime processes per step
    prefill_chunk_source: str

    @property
    def sm(self) -> str | None:
        """``"8.7"`` (or None without a GPU)."""
        cc = self.compute_capability
        return f"{cc[0]}.{cc[1]}" if cc else None

    @property
    def hardware(self) -> str:
        """How error messages name the hardware: ``SM 8.7`` or ``no GPU``."""
        return f"SM {self.sm}" if self.sm else "no GPU"

    def backend(self, name: str | None = None) -> Backend:
        name = name or self.default_backend
        for b in self.backends:
            if b.name == name:
                return b
        raise UserInputError(
            f"backend {name!r} is not available on {self.name}: use one of {', '.join(self.backend_names)}")

    @property
    def backend_names(self) -> tuple[str, ...]:
        return tuple(b.name for b in self.backends)

    @property
    def precisions(self) -> tuple[str, ...]:
        """Every precision some backend of this target runs, smallest first."""
        have = {p for b in self.backends for p in b.precisions}
        return tuple(p for p in PRECISIONS_SMALL_FIRST if p in have)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "aliases": list(self.aliases), "description": self.description, "kind": self.kind,
            "total_memory_bytes": self.total_memory_bytes, "total_memory_source": self.total_memory_source,
            "unified_memory": self.unified_memory,
            "budget_bytes": self.budget_bytes, "budget_source": self.budget_source,
            "bandwidth_gbs": self.bandwidth_gbs, "bandwidth_source": self.bandwidth_source,
            "compute_capability": self.sm,
            "cma_bytes": self.cma_bytes, "cma_source": self.cma_source,
            "software": dict(self.software),
            "backends": [{"name": b.name, "precisions": list(b.precisions), "overhead_bytes": b.overhead_bytes,
                          "overhead_source": b.overhead_source} for b in self.backends],
            "default_backend": self.default_backend,
            "prefill_chunk": self.prefill_chunk, "prefill_chunk_source": self.prefill_chunk_source,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Target:
        """Inverse of :meth:`to_dict` (what ``edgekit targets --json`` prints)."""
        d = dict(d)
        cc = d.pop("compute_capability")
        return cls(
            **{k: v for k, v in d.items() if k not in ("aliases", "software", "backends")},
            aliases=tuple(d["aliases"]),
            compute_capability=parse_sm(cc) if cc else None,
            software=tuple((str(k), str(v)) for k, v in d["software"].items()),
            backends=tuple(Backend(b["name"], tuple(b["precisions"]), b["overhead_bytes"], b["overhead_source"])
                           for b in d["backends"]),
        )


# ----- the capability table ----------------------------------------------------------------------
def check_combination(target: Target, backend: str | None, precision: str) -> Backend:
    """The backend that will run ``precision`` on ``target``, or a one-line error naming valid choices.

    ``backend=None`` means the target's default backend, or else the first of its backends that runs the
    precision. Called before any work starts, so an impossible build fails in milliseconds.
    """
    if precision not in PRECISIONS:
        raise UnsupportedPrecision(
            f"unknown precision {precision!r}: use one of {', '.join(PRECISIONS_SMALL_FIRST)}")
    if backend is not None and backend not in BACKENDS:
        raise UserInputError(f"unknown backend {backend!r}: use one of {', '.join(target.backend_names)} "
                             f"on {target.name}")
    if backend is not None:
        chosen = target.backend(backend)
        if precision in chosen.precisions:
            return chosen
        others = [b.name for b in target.backends if precision in b.precisions]
        if others:
            raise UnsupportedPrecision(
                f"{precision} is not supported by {backend} on {target.name}: use one of "
                f"{_small_first(chosen.precisions)} with {backend}, or backend {others[0]} for {precision}")
    else:
        # ggml-cpu runs GGUF files only, at their own precision: never chosen for a precision unless it is the
        # target's default (memory_plan.choose_backend picks it for a GGUF)
        ordered = sorted(_implicit(target), key=lambda b: b.name != target.default_backend)
        for b in ordered:
            if precision in b.precisions:
                return b
    valid = _small_first(tuple({p for b in _implicit(target) for p in b.precisions})).split(", ") if backend is None \
        else _small_first(target.backend(backend).precisions).split(", ")
    reason = _why_not(target, backend, precision)
    raise UnsupportedPrecision(
        f"{precision} is not supported on {target.name} ({target.hardware}): use one of {', '.join(valid)}"
        + (f" ({reason})" if reason else ""))


def _why_not(target: Target, backend: str | None, precision: str) -> str:
    rule = HARDWARE_RULES.get(precision)
    if target.compute_capability is None or (backend and BACKENDS[backend] == "cpu"):
        return _CPU_REASON if precision in ("fp16", "bf16", "fp8") else ""
    if rule and not _rule_allows(rule, target, backend or target.default_backend):
        return rule.reason
    return ""


def _rule_allows(rule: _HardwareRule, target: Target, backend: str) -> bool:
    if BACKENDS[backend] == "cpu":
        return True
    cc = target.compute_capability
    return cc is not None and cc >= rule.min_sm and (target.kind, backend) not in rule.excluded


def _small_first(precisions: tuple[str, ...]) -> str:
    return ", ".join(p for p in PRECISIONS_SMALL_FIRST if p in precisions)


# ----- loading -----------------------------------------------------------------------------------
def load_target(name: str) -> Target:
    """The target called ``name`` (or one of its aliases), or the target described by a ``.toml`` path."""
    text = str(name).strip()
    if text.lower().endswith(".toml"):
        path = Path(text).expanduser()
        if not path.is_file():
            raise UnknownTarget(f"no such target file {text!r}: give an existing .toml file or one of "
                                f"{', '.join(t.name for t in list_targets())}")
        from .target_file import parse_file  # imported here: target_file builds on this module's types

        return parse_file(path.read_bytes(), str(path))
    key = text.lower().replace("_", "-")
    targets = _packaged()
    by_name = {t.name: t for t in targets.values()}
    for t in targets.values():
        by_name.update({a: t for a in t.aliases})
    if key in by_name:
        return by_name[key]
    close = difflib.get_close_matches(key, list(by_name), n=2, cutoff=0.5)
    hint = f"did you mean {' or '.join(close)}? " if close else ""
    raise UnknownTarget(f"unknown target {text!r}: {hint}valid targets: {', '.join(sorted(targets))} "
                        "(or the path of a .toml target file)")


def list_targets() -> list[Target]:
    """Every packaged target: Jetsons, then desktop GPUs, then the CPU; smaller memory first."""
    return sorted(_packaged().values(),
                  key=lambda t: (KINDS.index(t.kind), t.total_memory_bytes, t.bandwidth_gbs, t.name))


@lru_cache(maxsize=1)
def _packaged() -> dict[str, Target]:
    from importlib.resources import files

    from .target_file import malformed, parse_file  # imported here: target_file builds on this module's types

    targets: dict[str, Target] = {}
    folder = files("edgekit.targets")
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if not entry.name.endswith(".toml"):
            continue
        t = parse_file(entry.read_bytes(), f"targets/{entry.name}")
        if t.name != entry.name[:-5]:
            malformed(f"targets/{entry.name}", f"name {t.name!r} differs from the file name")
        targets[t.name] = t
    seen: dict[str, str] = {}
    for t in targets.values():
        for key in (t.name, *t.aliases):
            if key in seen and seen[key] != t.name:
                malformed(f"targets/{t.name}.toml", f"{key!r} is also a name or alias of {seen[key]}")
            seen[key] = t.name
    return targets


def parse_sm(text: Any) -> tuple[int, int] | None:
    parts = str(text).split(".")
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        return None
    return int(parts[0]), int(parts[1])


def _implicit(target: Target) -> list:
    """The backends a precision alone may choose: not ggml-cpu (GGUF files at their own precision only) unless it
    is the target's default."""
    return [b for b in target.backends if b.name != "ggml-cpu" or b.name == target.default_backend]
