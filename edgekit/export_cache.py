"""A cache of exported graphs, so that building the same model for a second target reuses the export.

An entry is keyed by everything the graph depends on: the source weights' sha256, dialect, float type,
precision, quantization options, max_context, logits mode and the edgekit version. Two targets that share
those (e.g. ``orin-nano`` and ``orin-nx-16gb`` at INT4 and the same context) share one export. Entries are
written to a temporary folder and renamed into place; files are hard-linked into bundles where the cache
and the bundle share a filesystem (copied otherwise). Nothing is ever evicted automatically: the cache
folder can be deleted at any time.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from dataclasses import asdict, is_dataclass
from pathlib import Path

from . import __version__

FILES = ("model.onnx", "model.onnx.data")
META = "export.json"


def cache_key(fingerprint: str, **options) -> str:
    def plain(v):
        if is_dataclass(v):
            return {k: plain(x) for k, x in asdict(v).items()}
        if isinstance(v, Path):
            return hashlib.sha256(v.read_bytes()).hexdigest() if v.is_file() else str(v)
        return v

    doc = {"source": fingerprint, "edgekit": __version__, **{k: plain(v) for k, v in options.items()}}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _place(src: Path, dest: Path) -> None:
    try:
        os.link(src, dest)
    except OSError:
        shutil.copyfile(src, dest)


def restore(cache_dir: Path, key: str, into: Path) -> dict | None:
    """Put a cached export's files into ``into``; returns its metadata, or None on a miss."""
    entry = Path(cache_dir) / key
    try:
        meta = json.loads((entry / META).read_text())
        for name in FILES:
            _place(entry / name, into / name)
    except (OSError, ValueError):
        for name in FILES:
            (into / name).unlink(missing_ok=True)
        return None
    return meta


def store(cache_dir: Path, key: str, folder: Path, meta: dict) -> None:
    """Save ``folder``'s export under ``key`` (best effort: a full or read-only cache never fails a build)."""
    entry = Path(cache_dir) / key
    if entry.exists():
        return
    tmp = Path(cache_dir) / f".{key}.{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir(parents=True)
        for name in FILES:
            _place(folder / name, tmp / name)
            # read-only: a bundle edited in place must not silently change what later builds reuse
            os.chmod(tmp / name, 0o444)
        (tmp / META).write_text(json.dumps(meta))
        os.replace(tmp, entry)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
