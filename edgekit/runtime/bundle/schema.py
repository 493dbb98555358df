"""Schema ``edgekit.bundle/1``: the sections of a manifest, their required keys and kinds, and the check.

The sections and their required keys are ``_FIELDS`` below; ``files`` maps every file except manifest.json
to its sha256 and size. Unknown extra keys are allowed, so later v1 writers can add fields; removing or
retyping a field needs a new schema number. Only the manifest dictionary is checked here: files on disk
are :mod:`edgekit.runtime.bundle.verification`'s.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from typing import Any

from ... import __version__
from ...errors import BundleError
from .paths import check_path

SCHEMA = "edgekit.bundle/1"
MANIFEST = "manifest.json"

SOURCE_KINDS = ("hf", "gguf")
BACKENDS = ("onnxruntime-cpu", "onnxruntime-cuda", "tensorrt", "ggml-cpu")
# "gguf": no ONNX graph; graph.file is the GGUF itself, run by llama.cpp (runtime/ggml_backend.py)
DIALECTS = ("ort", "tensorrt", "gguf")
PRECISIONS = ("fp32", "fp16", "int8", "int4")
LOGITS = ("last", "all")

# Field kinds (checked by _kind_ok): "str", "int" (any), "count" (>= 0), "positive" (> 0), "num",
# "bool", "dict", "list", "hex" (sha256), "time" (ISO-8601), "path" (safe relative path), a trailing "?"
# allows null, and a tuple is a list of allowed strings.
_FIELDS: dict[str, tuple[tuple[str, Any], ...]] = {
    "": (("schema", "str"), ("edgekit_version", "str"), ("created", "time"), ("source", "dict"),
         ("model", "dict"), ("target", "dict"), ("backend", BACKENDS), ("dialect", DIALECTS),
         ("precision", PRECISIONS), ("max_context", "positive"), ("graph", "dict"), ("memory", "dict"),
         ("tokenizer", "dict"), ("generation", "dict"), ("engine", "dict?"), ("files", "dict")),
    "source": (("kind", SOURCE_KINDS), ("name", "str"), ("sha256", "hex")),
    # The part of ModelSpec.to_dict() the runtime needs; the rest is kept but not required.
    "model": (("architecture", "str"), ("family", "str"), ("vocab_size", "positive"),
              ("hidden_size", "positive"), ("num_layers", "positive"), ("num_heads", "positive"),
              ("num_kv_heads", "positive"), ("head_dim", "positive"), ("parameters", "positive")),
    "target": (("name", "str"), ("kind", "str"), ("compute_capability", "str|num?")),
    "graph": (("file", "path"), ("inputs", "list"), ("outputs", "list"), ("kv_cache", "dict"),
              ("logits", LOGITS)),
    "memory": (("weights_bytes", "count"), ("kv_cache_bytes", "count"), ("kv_bytes_per_token", "count"),
               ("workspace_bytes", "count"), ("total_bytes", "count")),
    "tokenizer": (("file", "path"), ("chat_template", "path?"), ("bos_token_id", "int?"),
                  ("eos_token_ids", "list"), ("add_bos_token", "bool")),
    "generation": (("temperature", "num"), ("top_p", "num"), ("top_k", "int"), ("max_new_tokens", "positive"),
                   ("reasoning", "bool")),
    "engine": (("file", "path"),),
}
# The required keys per section ("" is the top level), as the brief for writers.
REQUIRED_KEYS: dict[str, tuple[str, ...]] = {sec: tuple(k for k, _ in fs) for sec, fs in _FIELDS.items()}

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_SCHEMA_RE = re.compile(r"^edgekit\.bundle/([0-9]+)$")


def _kind_ok(value: Any, kind: Any) -> bool:
    if isinstance(kind, tuple):
        return value in kind
    if kind.endswith("?"):
        return value is None or _kind_ok(value, kind[:-1])
    if "|" in kind:
        return any(_kind_ok(value, k) for k in kind.split("|"))
    is_int = isinstance(value, int) and not isinstance(value, bool)
    return {
        "str": isinstance(value, str), "path": isinstance(value, str), "time": isinstance(value, str),
        "hex": isinstance(value, str) and bool(_HEX64.match(value)),
        "int": is_int, "count": is_int and value >= 0, "positive": is_int and value > 0,
        "num": (is_int or isinstance(value, float)) and value == value and abs(value) != float("inf"),
        "bool": isinstance(value, bool), "dict": isinstance(value, dict), "list": isinstance(value, list),
    }[kind]


_KIND_TEXT = {"str": "a string", "path": "a string", "time": "an ISO-8601 time string",
              "hex": "64 lowercase hex digits (sha256)", "int": "an integer", "count": "an integer >= 0",
              "positive": "an integer > 0", "num": "a finite number", "bool": "true or false",
              "dict": "an object", "list": "a list", "str|num": "a string or number"}


def _describe(kind: Any) -> str:
    if isinstance(kind, tuple):
        return "one of " + ", ".join(kind)
    if kind.endswith("?"):
        return _describe(kind[:-1]) + " or null"
    return _KIND_TEXT[kind]


def _check_section(data: dict[str, Any], section: str, label: str) -> None:
    for key, kind in _FIELDS[section]:
        where = f"{label}.{key}" if label else key
        if key not in data:
            raise BundleError(f"manifest.json has no {where!r}: the bundle is incomplete or was not made by "
                              "edgekit build; rebuild it")
        value = data[key]
        if not _kind_ok(value, kind):
            raise BundleError(f"manifest.json {where} is {_short(value)}, expected {_describe(kind)}: "
                              "the manifest is corrupt; rebuild the bundle")
        if kind == "time":
            try:
                datetime.fromisoformat(value[:-1] + "+00:00" if value.endswith("Z") else value)
            except ValueError:
                raise BundleError(f"manifest.json {where} is {_short(value)}, expected an ISO-8601 time "
                                  "such as 2026-01-31T12:00:00Z: the manifest is corrupt") from None
        if kind in ("path", "path?") and value is not None:
            check_path(value, f"manifest.json {where}")


def _short(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=True, default=repr)
    return text if len(text) <= 60 else text[:57] + "..."


def check_schema(schema: Any) -> None:
    """BundleError unless schema is the one this edgekit reads, with the fix (upgrade) for newer ones."""
    if schema == SCHEMA:
        return
    m = _SCHEMA_RE.match(schema) if isinstance(schema, str) else None
    if m and int(m.group(1)) > int(SCHEMA.rsplit("/", 1)[1]):
        raise BundleError(f"bundle schema {schema!r} is newer than this edgekit ({__version__}) reads "
                          f"({SCHEMA}): upgrade edgekit")
    raise BundleError(f"manifest.json has schema {_short(schema)}, not {SCHEMA!r}: this is not an edgekit "
                      "bundle this version can read; rebuild it with edgekit build")


def check_manifest(data: Any) -> None:
    """Validate a manifest dictionary: schema, required keys, types, and safe names. BundleError on the first
    problem. Files on disk are not looked at (that is :func:`verify`)."""
    if not isinstance(data, dict):
        raise BundleError("manifest.json is not a JSON object: the manifest is corrupt; rebuild the bundle")
    if "schema" not in data:
        raise BundleError(f"manifest.json has no 'schema': not an edgekit bundle (expected {SCHEMA!r})")
    check_schema(data["schema"])
    _check_section(data, "", "")
    for section in ("source", "model", "target", "graph", "memory", "tokenizer", "generation"):
        _check_section(data[section], section, section)
    if data["engine"] is not None:
        _check_section(data["engine"], "engine", "engine")
    for key in ("inputs", "outputs"):
        for i, io in enumerate(data["graph"][key]):
            if not (isinstance(io, dict) and isinstance(io.get("name"), str) and isinstance(io.get("dtype"), str)
                    and isinstance(io.get("shape"), list)
                    and all(_kind_ok(d, "int") or isinstance(d, str) for d in io["shape"])):
                raise BundleError(f"manifest.json graph.{key}[{i}] is {_short(io)}, expected "
                                  '{"name": str, "dtype": str, "shape": [int or str, ...]}: rebuild the bundle')
    if not all(_kind_ok(t, "int") for t in data["tokenizer"]["eos_token_ids"]):
        raise BundleError("manifest.json tokenizer.eos_token_ids must be a list of integers: rebuild the bundle")
    files = data["files"]
    for name, entry in files.items():
        check_path(name, "manifest.json files entry")
        if name == MANIFEST:
            raise BundleError("manifest.json lists itself in files: the manifest is corrupt; rebuild the bundle")
        if not (isinstance(entry, dict) and _kind_ok(entry.get("sha256"), "hex")
                and _kind_ok(entry.get("size"), "count")):
            raise BundleError(f"manifest.json files[{name!r}] is {_short(entry)}, expected "
                              '{"sha256": 64 hex digits, "size": integer >= 0}: rebuild the bundle')
    refs = [("graph.file", data["graph"]["file"]), ("tokenizer.file", data["tokenizer"]["file"]),
            ("tokenizer.chat_template", data["tokenizer"]["chat_template"])]
    if data["engine"] is not None:
        refs.append(("engine.file", data["engine"]["file"]))
    for where, name in refs:
        if name is not None and name not in files:
            raise BundleError(f"manifest.json {where} {name!r} is not listed in files: the manifest is corrupt; "
                              "rebuild the bundle")
