"""The bundle format: a folder with ``manifest.json`` and the files it lists, and how to trust it.

A bundle arrives over the network onto a robot, so everything read here is untrusted: names in the
manifest are checked to be plain relative paths that stay inside the bundle, no symlink is followed,
every file's size and sha256 are compared with the manifest, and unlisted files are reported. Only the
standard library is used, so the on-device runtime can import this without the build dependencies.

Schema ``edgekit.bundle/1``: the sections and their required keys are ``_FIELDS`` below; ``files`` maps
every file except manifest.json to its sha256 and size. Unknown extra keys are allowed, so later v1 writers
can add fields; removing or retyping a field needs a new schema number.

Note that ``verify`` proves a bundle is intact and consistent with its manifest, not who made it: the
manifest is not signed.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .. import __version__
from ..errors import BundleError
from .model_spec import ModelSpec

SCHEMA = "edgekit.bundle/1"
MANIFEST = "manifest.json"

SOURCE_KINDS = ("hf", "gguf")
BACKENDS = ("onnxruntime-cpu", "onnxruntime-cuda", "tensorrt")
DIALECTS = ("ort", "tensorrt")
PRECISIONS = ("fp32", "fp16", "int8", "int4")
LOGITS = ("last", "all")

# A manifest is a few KiB; refusing huge ones keeps a hostile bundle from exhausting a device's memory.
MAX_MANIFEST_BYTES = 16 * 1024 * 1024
# verify(weights=False) hashes only files up to this size (tokenizer, template, graph without weights);
# bigger files (weights, engines) get the size check only. Decided by size, not name, so it holds for
# whatever the exporter calls its external-data files.
QUICK_HASH_LIMIT = 64 * 1024 * 1024
_CHUNK = 1024 * 1024

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
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


# ----- hashing and the files table -----------------------------------------------------------------
def _hash_fd(fd: int) -> str:
    h = hashlib.sha256()
    while True:
        chunk = os.read(fd, _CHUNK)
        if not chunk:
            return h.hexdigest()
        h.update(chunk)


def hash_file(path: str | os.PathLike) -> str:
    """sha256 (hex) of a file, read in 1 MiB chunks so a multi-GB weight file never sits in memory."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return _hash_fd(fd)
    finally:
        os.close(fd)


def _walk(folder: Path, prefix: str = "") -> Iterator[tuple[str, str]]:
    """(relative posix name, kind) of every entry below folder, kind in file/symlink/other; never follows links."""
    with os.scandir(folder) as it:
        entries = sorted(it, key=lambda e: e.name)
    for e in entries:
        name = prefix + e.name
        if e.is_symlink():
            yield name, "symlink"
        elif e.is_dir(follow_symlinks=False):
            yield from _walk(Path(e.path), name + "/")
        elif e.is_file(follow_symlinks=False):
            yield name, "file"
        else:
            yield name, "other"


def file_table(folder: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """``{name: {"sha256", "size"}}`` for every regular file below folder except the top-level manifest.json.

    Names are relative, '/'-separated and sorted. A symlink or special file anywhere raises BundleError:
    a bundle holds regular files only, so nothing in it can point outside.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise BundleError(f"bundle folder {folder} does not exist or is not a folder")
    table: dict[str, dict[str, Any]] = {}
    for name, kind in _walk(folder):
        if name == MANIFEST:
            continue
        if kind == "symlink":
            raise BundleError(f"{folder / name} is a symlink: a bundle holds regular files only; "
                              "copy the file into the bundle instead")
        if kind != "file":
            raise BundleError(f"{folder / name} is not a regular file: a bundle holds regular files only")
        problem = _path_problem(name)
        if problem:
            raise BundleError(f"file name {name!r} in {folder} cannot be listed in a manifest ({problem}): rename it")
        fd = os.open(folder / name, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        try:
            table[name] = {"sha256": _hash_fd(fd), "size": os.fstat(fd).st_size}
        finally:
            os.close(fd)
    return table


def bundle_id(manifest: Manifest | dict[str, Any]) -> str:
    """12 hex digits identifying the bundle's content: the sha256 of its files table in canonical JSON.

    Two bundles with the same files (names, sizes, hashes) have the same id whatever their manifest's
    timestamps say; ``edgekit flash`` names releases by it.
    """
    files = manifest.files if isinstance(manifest, Manifest) else manifest.get("files")
    if not isinstance(files, dict):
        raise BundleError("the manifest has no files table: cannot derive a bundle id; rebuild the bundle")
    canonical = json.dumps(files, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()[:12]


# ----- safe paths -------------------------------------------------------------------------------------
def _path_problem(name: Any) -> str | None:
    """Why name is not a plain relative path inside the bundle, or None if it is."""
    if not isinstance(name, str) or not name:
        return "not a non-empty string"
    if "\x00" in name:
        return "it contains a NUL byte"
    if "\\" in name:
        return "it contains a backslash"
    if _CONTROL.search(name):
        return "it contains a control character"
    if name.startswith("/"):
        return "it is an absolute path"
    parts = name.split("/")
    if ".." in parts:
        return "it has a '..' component"
    if "" in parts or "." in parts:
        return "it has an empty or '.' component"
    if len(parts[0]) >= 2 and parts[0][1] == ":":
        return "it starts with a drive letter"
    return None


def _check_path(name: Any, where: str) -> None:
    problem = _path_problem(name)
    if problem:
        raise BundleError(f"{where} {name!r} is not a safe relative path inside the bundle ({problem}): "
                          "the manifest is corrupt or hostile; do not use this bundle")


def _locate(folder: Path, name: str) -> tuple[Path, str | None]:
    """On-disk path of a syntactically safe name, and why it must not be used (a symlink on the way, or
    it resolves outside the bundle), or None. A missing file is not a problem here (the caller reports it)."""
    root = Path(os.path.realpath(folder))
    path = root
    for part in name.split("/"):
        path = path / part
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return path, None
        except OSError as e:
            return path, f"cannot be read ({e.strerror})"
        if stat.S_ISLNK(st.st_mode):
            link = path.relative_to(root).as_posix()
            return path, f"{link!r} is a symlink (bundles hold regular files only; links are never followed)"
    if os.path.commonpath([os.path.realpath(path), root]) != str(root):   # defence in depth
        return path, "resolves outside the bundle"
    return path, None


def _resolve_in(folder: Path, name: str) -> Path:
    """Like _locate, but a problem is a BundleError."""
    _check_path(name, "file name")
    path, problem = _locate(folder, name)
    if problem:
        raise BundleError(f"bundle {folder}: {name}: {problem}: do not use this bundle")
    return path


# ----- validation -------------------------------------------------------------------------------------
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
            _check_path(value, f"manifest.json {where}")


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
        _check_path(name, "manifest.json files entry")
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


# ----- reading and writing ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Manifest:
    """A validated manifest and the folder it came from. Sections are plain dicts (read them, do not edit)."""

    folder: Path
    data: dict[str, Any] = field(repr=False)

    schema = property(lambda self: self.data["schema"])
    edgekit_version = property(lambda self: self.data["edgekit_version"])
    created = property(lambda self: self.data["created"])
    source = property(lambda self: self.data["source"])
    model = property(lambda self: self.data["model"])
    target = property(lambda self: self.data["target"])
    backend = property(lambda self: self.data["backend"])
    dialect = property(lambda self: self.data["dialect"])
    precision = property(lambda self: self.data["precision"])
    max_context = property(lambda self: self.data["max_context"])
    graph = property(lambda self: self.data["graph"])
    memory = property(lambda self: self.data["memory"])
    tokenizer = property(lambda self: self.data["tokenizer"])
    generation = property(lambda self: self.data["generation"])
    engine = property(lambda self: self.data["engine"])
    files = property(lambda self: self.data["files"])

    @property
    def id(self) -> str:
        return bundle_id(self)

    def path(self, name: str) -> Path:
        """On-disk path of a listed file (e.g. ``m.path(m.graph["file"])``), refusing symlinks and escapes."""
        if name not in self.files:
            raise BundleError(f"{name!r} is not listed in the manifest of {self.folder}: it is not part of the bundle")
        path = _resolve_in(self.folder, name)
        if not path.is_file():
            raise BundleError(f"bundle {self.folder}: {name} is listed in the manifest but missing: "
                              "re-copy the bundle (edgekit verify checks all files)")
        return path

    def spec(self):
        """The model section as a :class:`edgekit.runtime.model_spec.ModelSpec`."""
        try:
            return ModelSpec.from_dict(self.model)
        except (TypeError, ValueError) as e:
            raise BundleError(f"manifest.json model section does not describe a model ({e}): "
                              "rebuild the bundle") from None

    def to_dict(self) -> dict[str, Any]:
        return copy.deepcopy(self.data)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # Two readers of a JSON object with a repeated key may disagree on which one counts: refuse it.
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise BundleError(f"manifest.json repeats the key {k!r}: the manifest is corrupt or hostile")
        out[k] = v
    return out


def _bad_constant(name: str) -> Any:
    raise BundleError(f"manifest.json contains {name}, which is not valid JSON: the manifest is corrupt")


def read_manifest(folder: str | os.PathLike) -> Manifest:
    """Read and validate ``folder/manifest.json``. Every problem is a one-line BundleError."""
    folder = Path(folder)
    if not folder.exists():
        raise BundleError(f"bundle {folder} does not exist: give the folder that edgekit build wrote (-o)")
    if not folder.is_dir():
        raise BundleError(f"bundle {folder} is not a folder: give the folder that contains manifest.json")
    path = folder / MANIFEST
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise BundleError(f"{folder} has no {MANIFEST}: it is not an edgekit bundle "
                          "(or the copy is incomplete)") from None
    except OSError as e:
        raise BundleError(f"cannot read {path}: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise BundleError(f"{path} is not a regular file (a symlink or special file): do not use this bundle")
    if st.st_size > MAX_MANIFEST_BYTES:
        raise BundleError(f"{path} is {st.st_size} bytes, more than a manifest can be "
                          f"({MAX_MANIFEST_BYTES}): the bundle is corrupt or hostile")
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        with os.fdopen(fd, "rb") as f:
            raw = f.read(MAX_MANIFEST_BYTES + 1)
    except OSError as e:
        raise BundleError(f"cannot read {path}: {e.strerror}") from None
    try:
        data = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates, parse_constant=_bad_constant)
    except UnicodeDecodeError:
        raise BundleError(f"{path} is not UTF-8 text: the manifest is corrupt; rebuild the bundle") from None
    except json.JSONDecodeError as e:
        raise BundleError(f"{path} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}): "
                          "the manifest is corrupt or truncated; rebuild or re-copy the bundle") from None
    except ValueError as e:        # e.g. an integer with more digits than Python converts
        raise BundleError(f"{path} cannot be parsed ({e}): the manifest is corrupt or hostile") from None
    except RecursionError:
        raise BundleError(f"{path} is nested too deeply to be a manifest: the bundle is corrupt or hostile") from None
    try:
        check_manifest(data)
    except BundleError as e:   # name the bundle: flash and the runtime may be looking at several
        msg = str(e)
        raise BundleError(f"{path}{msg[len(MANIFEST):]}" if msg.startswith(MANIFEST + " ") else msg) from None
    return Manifest(folder=folder, data=data)


def _utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def fsync_dir(folder: Path) -> None:
    # Makes a rename durable; not every platform can open a directory, and failing here loses nothing.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_manifest(folder: str | os.PathLike, manifest: dict[str, Any]) -> dict[str, Any]:
    """Fill ``files`` from the folder, validate, and write ``folder/manifest.json`` atomically.

    ``schema``, ``edgekit_version`` and ``created`` are filled in when absent. The file is written to a
    temporary name, fsynced and renamed over manifest.json, so a reader sees the old manifest or the new
    one, never half of one. Returns the manifest as written.
    """
    folder = Path(folder)
    data = copy.deepcopy(manifest)
    data.setdefault("schema", SCHEMA)
    data.setdefault("edgekit_version", __version__)
    data.setdefault("created", _utc_now())
    data["files"] = file_table(folder)
    check_manifest(data)
    try:
        text = json.dumps(data, indent=2, ensure_ascii=False, allow_nan=False) + "\n"
    except (TypeError, ValueError) as e:
        raise BundleError(f"the manifest for {folder} cannot be written as JSON ({e})") from None
    tmp = folder / f".{MANIFEST}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, folder / MANIFEST)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(folder)
    return data


# ----- verification -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Problem:
    name: str       # file name relative to the bundle
    what: str       # what differs, e.g. "sha256 differs from the manifest"

    def __str__(self) -> str:
        # Names come from disk or an untrusted manifest: quote any with control characters (one line, no escapes).
        name = repr(self.name) if _CONTROL.search(self.name) else self.name
        return f"{name}: {self.what}"


@dataclass(frozen=True)
class VerifyReport:
    """What :func:`verify` found. ``ok`` is True when nothing differs; :meth:`raise_for_problems` turns the
    first problem into a one-line BundleError."""

    folder: Path
    bundle_id: str
    hashed: tuple[str, ...]        # size and sha256 checked
    size_only: tuple[str, ...]     # size checked, hash skipped (weights=False)
    problems: tuple[Problem, ...]

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def checked(self) -> int:
        return len(self.hashed) + len(self.size_only)

    def raise_for_problems(self) -> None:
        if self.problems:
            more = len(self.problems) - 1
            tail = f" (and {more} more problem{'s' if more > 1 else ''})" if more else ""
            raise BundleError(f"bundle {self.folder} failed verification: {self.problems[0]}{tail}: "
                              "re-copy or rebuild the bundle")

    def summary(self) -> str:
        if not self.ok:
            return f"{len(self.problems)} problem(s): " + "; ".join(str(p) for p in self.problems)
        text = f"ok: {self.checked} files verified"
        if self.size_only:
            text += f" ({len(self.size_only)} by size only, hashes skipped)"
        return text


def _check_file(folder: Path, name: str, entry: dict[str, Any], hash_it: bool | None) -> tuple[Problem | None, bool]:
    """(problem or None, whether the hash was checked) for one listed file."""
    path, problem = _locate(folder, name)
    if problem:
        return Problem(name, problem), False
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        return Problem(name, "listed in the manifest but missing"), False
    except OSError as e:
        return Problem(name, f"cannot be read ({e.strerror})"), False
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return Problem(name, "is not a regular file"), False
        if st.st_size != entry["size"]:
            how = "truncated" if st.st_size < entry["size"] else "grown"
            return Problem(name, f"size is {st.st_size} bytes, the manifest says {entry['size']} ({how})"), False
        if hash_it is None:
            hash_it = st.st_size <= QUICK_HASH_LIMIT
        if hash_it:
            digest = _hash_fd(fd)
            if digest != entry["sha256"]:
                return Problem(name, f"sha256 is {digest[:12]}..., the manifest says {entry['sha256'][:12]}... "
                                     "(content modified or corrupted)"), True
        return None, hash_it
    finally:
        os.close(fd)


def verify(folder: str | os.PathLike, *, weights: bool = True) -> VerifyReport:
    """Check every listed file against the manifest, and the files the graph reads; list unlisted files,
    symlinks and special files too.

    Sizes are always checked. With ``weights=False`` files larger than QUICK_HASH_LIMIT (weights,
    engines) are not hashed, which takes seconds instead of minutes on a Jetson. A manifest that cannot
    be read raises BundleError; problems with the files are collected in the returned report.
    """
    manifest = read_manifest(folder)
    folder = manifest.folder
    problems: list[Problem] = []
    hashed: list[str] = []
    size_only: list[str] = []
    for name, entry in sorted(manifest.files.items()):
        problem, was_hashed = _check_file(folder, name, entry, True if weights else None)
        if problem:
            problems.append(problem)
        elif was_hashed:
            hashed.append(name)
        else:
            size_only.append(name)
    reported = {p.name for p in problems}   # a listed symlink is already reported by name
    if manifest.graph["file"] not in reported:        # the files its tensors read (onnx_refs: stdlib only)
        from .onnx_refs import graph_problems

        problems += [Problem(manifest.graph["file"], what) for what in graph_problems(manifest)]
    try:
        for name, kind in _walk(folder):
            if name == MANIFEST or name in reported or (kind == "file" and name in manifest.files):
                continue
            if kind == "symlink":
                problems.append(Problem(name, "is a symlink (bundles hold regular files only)"))
            elif kind == "other":
                problems.append(Problem(name, "is not a regular file"))
            else:
                problems.append(Problem(name, "is not listed in the manifest (unexpected extra file)"))
    except OSError as e:
        problems.append(Problem(".", f"cannot list the bundle folder ({e.strerror})"))
    except RecursionError:
        problems.append(Problem(".", "folders are nested too deeply for a bundle"))
    return VerifyReport(folder=folder, bundle_id=manifest.id, hashed=tuple(hashed), size_only=tuple(size_only),
                        problems=tuple(problems))
