"""The target file format: one TOML document (``targets/*.toml`` or the user's own file) checked field by
field and turned into a :class:`~edgekit.build.target.Target`.

Every mistake is a one-line error naming the file and the field, and pointing at ``targets/orin-nano-8gb.toml``,
which shows every field. :func:`edgekit.build.target.load_target` finds the file; this module reads it.
"""

from __future__ import annotations

import os
from typing import Any, NoReturn

from ..errors import UserInputError
from ..runtime.memory import cgroup_limit
from ..units import GiB, parse_size
from .target import (
    BACKEND_PRECISIONS,
    BACKENDS,
    HARDWARE_RULES,
    KINDS,
    Backend,
    Target,
    _rule_allows,
    parse_sm,
)

_TOP_KEYS = {"name", "aliases", "description", "kind", "compute_capability", "default_backend", "prefill_chunk",
             "prefill_chunk_source", "memory", "software", "backends"}
_MEMORY_KEYS = {"total", "total_source", "unified", "budget", "budget_source", "bandwidth_gbs",
                "bandwidth_source", "cma", "cma_source"}
_BACKEND_KEYS = {"precisions", "overhead", "overhead_source"}


def parse_file(data: bytes, source: str) -> Target:
    """The target in the TOML text ``data``; ``source`` names the file in error messages."""
    try:
        import tomllib
    except ImportError:  # Python 3.10 (JetPack 6)
        import tomli as tomllib
    try:
        doc = tomllib.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        malformed(source, f"not valid TOML ({e})")
    return parse_target(doc, source)


def malformed(source: str, what: str) -> NoReturn:
    raise UserInputError(f"target file {source} is malformed: {what}; fix it (targets/orin-nano-8gb.toml "
                         "shows every field)")


class _Fields:
    """Typed access to the tables of one target file, failing with the file's name and the field's path."""

    def __init__(self, source: str):
        self.source = source

    def fail(self, what: str) -> NoReturn:
        malformed(self.source, what)

    def need(self, table: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str = "") -> Any:
        if key not in table:
            self.fail(f"missing {where}{key}")
        value = table[key]
        if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
            self.fail(f"{where}{key} has the wrong type ({type(value).__name__})")
        return value

    def unknown(self, table: dict[str, Any], allowed: set[str], where: str) -> None:
        extra = sorted(set(table) - allowed)
        if extra:
            self.fail(f"unknown key {where}{extra[0]} (allowed: {', '.join(sorted(allowed))})")

    def size(self, text: Any, where: str) -> int:
        try:
            return parse_size(text)
        except UserInputError:
            self.fail(f"{where} {text!r} is not a size such as \"8GiB\" or \"900MiB\"")


def parse_target(doc: dict[str, Any], source: str = "the target file") -> Target:
    """Validate one parsed TOML document and build the Target; every mistake is a one-line error."""
    f = _Fields(source)
    f.unknown(doc, _TOP_KEYS, "")
    name = f.need(doc, "name", str)
    kind = f.need(doc, "kind", str)
    if kind not in KINDS:
        f.fail(f"kind {kind!r} is not one of {', '.join(KINDS)}")
    cc = _compute_capability(f, doc, kind)
    mem = f.need(doc, "memory", dict)
    memory = _memory(f, mem, kind)
    software = f.need(doc, "software", dict)
    if not all(isinstance(v, str) for v in software.values()):
        f.fail("every software version must be a string, e.g. cuda = \"12.6\"")
    backends_doc = f.need(doc, "backends", dict)
    backends = _backends(f, backends_doc, cc)
    default = f.need(doc, "default_backend", str)
    if default not in backends_doc:
        f.fail(f"default_backend {default!r} is not one of its backends ({', '.join(backends_doc)})")
    chunk = f.need(doc, "prefill_chunk", int)
    if chunk <= 0:
        f.fail("prefill_chunk must be a positive number of tokens")

    target = Target(
        name=name, aliases=tuple(f.need(doc, "aliases", list)) if "aliases" in doc else (),
        description=f.need(doc, "description", str), kind=kind, **memory,
        budget_source=f.need(mem, "budget_source", str, "memory."),
        bandwidth_source=f.need(mem, "bandwidth_source", str, "memory."),
        compute_capability=cc, cma_source=str(mem.get("cma_source", "")),
        software=tuple(software.items()), backends=tuple(backends), default_backend=default,
        prefill_chunk=chunk, prefill_chunk_source=f.need(doc, "prefill_chunk_source", str),
    )
    _check_hardware(f, target)
    return target


def _compute_capability(f: _Fields, doc: dict[str, Any], kind: str) -> tuple[int, int] | None:
    cc_text = doc.get("compute_capability")
    cc = parse_sm(cc_text) if cc_text is not None else None
    if cc_text is not None and cc is None:
        f.fail(f"compute_capability {cc_text!r} is not like \"8.7\"")
    if (cc is None) != (kind == "cpu"):
        f.fail("compute_capability is required for GPU targets and not allowed for the cpu kind")
    return cc


def _memory(f: _Fields, mem: dict[str, Any], kind: str) -> dict[str, Any]:
    """The ``[memory]`` table's numbers, as Target fields (its ``*_source`` texts are read by the caller)."""
    f.unknown(mem, _MEMORY_KEYS, "memory.")
    total_text = f.need(mem, "total", (str, int), "memory.")
    if total_text == "host":
        total, total_source = _host_memory()
    else:
        total, total_source = f.size(total_text, "memory.total"), f.need(mem, "total_source", str, "memory.")
    budget_text = f.need(mem, "budget", (str, int), "memory.")
    if isinstance(budget_text, str) and budget_text.strip().endswith("%"):
        try:
            fraction = float(budget_text.strip()[:-1]) / 100
        except ValueError:
            f.fail(f"memory.budget {budget_text!r} is not a percentage such as \"75%\"")
        budget = int(total * fraction)
    else:
        budget = f.size(budget_text, "memory.budget")
    if not 0 < budget <= total:
        f.fail(f"memory.budget ({budget} bytes) must be positive and at most memory.total ({total})")
    unified = f.need(mem, "unified", bool, "memory.")
    if kind == "jetson" and not unified:
        f.fail("a jetson target has unified memory: set memory.unified = true")
    bandwidth = f.need(mem, "bandwidth_gbs", (int, float), "memory.")
    if bandwidth <= 0:
        f.fail("memory.bandwidth_gbs must be positive")
    cma = f.size(mem["cma"], "memory.cma") if "cma" in mem else 0
    if cma and kind != "jetson":
        f.fail("memory.cma applies to jetson targets only")
    return {"total_memory_bytes": total, "total_memory_source": total_source, "unified_memory": unified,
            "budget_bytes": budget, "bandwidth_gbs": float(bandwidth), "cma_bytes": cma}


def _backends(f: _Fields, backends_doc: dict[str, Any], cc: tuple[int, int] | None) -> list[Backend]:
    if not backends_doc:
        f.fail("no backends: add at least [backends.onnxruntime-cpu]")
    backends = []
    for bname, b in backends_doc.items():
        where = f"backends.{bname}."
        if bname not in BACKENDS:
            f.fail(f"unknown backend {bname!r} (known: {', '.join(BACKENDS)})")
        if not isinstance(b, dict):
            f.fail(f"backends.{bname} must be a table")
        f.unknown(b, _BACKEND_KEYS, where)
        precisions = f.need(b, "precisions", list, where)
        for p in precisions:
            if p not in BACKEND_PRECISIONS[bname]:
                f.fail(f"{where}precisions: {bname} cannot run {p!r} (it runs {', '.join(BACKEND_PRECISIONS[bname])})")
        if BACKENDS[bname] == "gpu" and cc is None:
            f.fail(f"backend {bname} needs a GPU but the target has no compute_capability")
        backends.append(Backend(bname, tuple(precisions), f.size(f.need(b, "overhead", (str, int), where),
                                                                 f"{where}overhead"),
                                f.need(b, "overhead_source", str, where)))
    return backends


def _check_hardware(f: _Fields, target: Target) -> None:
    """The file must agree with the hardware facts (no FP8 claimed on an SM 8.7 board)."""
    for b in target.backends:
        for p in b.precisions:
            rule = HARDWARE_RULES.get(p)
            if rule and not _rule_allows(rule, target, b.name):
                f.fail(f"backends.{b.name} lists {p} but {rule.reason}")


def _host_memory() -> tuple[int, str]:
    """Physical memory of this machine, lowered to the container's cgroup limit when there is one."""
    try:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        source = "physical memory of this machine (sysconf)"
    except (ValueError, OSError, AttributeError):
        return 16 * GiB, "this machine's memory could not be read; assumed 16 GiB"
    limit = cgroup_limit()
    if limit is not None and 0 < limit < total:
        total, source = limit, "memory limit of this container (cgroup memory.max)"
    return total, source
