"""Reading and writing ``manifest.json``: the validated :class:`Manifest` of a bundle folder.

Reading refuses anything a hostile bundle could use against the reader (symlinked or huge manifests,
repeated keys, non-JSON constants) with one-line errors; writing fills the files table and replaces the
manifest atomically, so a reader sees the old manifest or the new one, never half of one.
"""

from __future__ import annotations

import copy
import json
import os
import stat
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ... import __version__
from ...errors import BundleError
from ..model_spec import ModelSpec
from .hashing import bundle_id, file_table
from .paths import resolve_in
from .schema import MANIFEST, SCHEMA, check_manifest

# A manifest is a few KiB; refusing huge ones keeps a hostile bundle from exhausting a device's memory.
MAX_MANIFEST_BYTES = 16 * 1024 * 1024


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
        path = resolve_in(self.folder, name)
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
