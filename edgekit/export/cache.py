"""A cache of exported graphs, so that building the same model for a second target reuses the export.

An entry is keyed by everything the graph depends on: the source weights' sha256, dialect, float type,
precision, quantization options, max_context, logits mode and the edgekit version. Two targets that share
those (e.g. ``orin-nano`` and ``orin-nx-16gb`` at INT4 and the same context) share one export. Entries are
written to a temporary folder and renamed into place. Nothing is ever evicted automatically: the cache
folder can be deleted at any time.

Files are copied between the cache and bundles, never hard-linked: a bundle edited in place (root ignores
the cache's 0444 mode) must not change what later builds reuse, and the ``onnx`` package refuses external
data with several links ("potential hardlink attack"). A copy is a reflink where the filesystem shares
blocks (btrfs, XFS), so it costs no space there. Each entry records its files' size and sha256; a restore
hashes what it copies (one read) and discards an entry that no longer matches, so a damaged cache costs a
fresh export, never a bundle with unchecked weights.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable
from dataclasses import asdict, is_dataclass
from pathlib import Path

from .. import __version__

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


_CHUNK = 8 * 1024 * 1024
_FICLONE = 0x40049409   # linux/fs.h: _IOW(0x94, 9, int), share the source's blocks (copy-on-write)


def _copy_hashed(src: Path, dest: Path) -> tuple[int, str]:
    """Copy ``src`` to a new file ``dest``; (size, sha256) of the bytes now in ``dest``, read once."""
    digest, size = hashlib.sha256(), 0
    with open(src, "rb") as fin, open(dest, "wb") as fout:
        try:
            fcntl.ioctl(fout.fileno(), _FICLONE, fin.fileno())
        except OSError:   # no reflink here (ext4, tmpfs, another filesystem): copy while hashing
            while chunk := fin.read(_CHUNK):
                digest.update(chunk)
                fout.write(chunk)
                size += len(chunk)
            return size, digest.hexdigest()
    with open(dest, "rb") as f:   # a reflink shares the cache's blocks: hash what the bundle now holds
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def restore(cache_dir: Path, key: str, into: Path, *, discarded: Callable[[str], None] | None = None) -> dict | None:
    """Copy a cached export's files into ``into``; returns its metadata, or None on a miss.

    An entry whose files no longer have the size and sha256 recorded when it was stored (edited in place,
    damaged disk, or written by an edgekit that recorded no hashes) is deleted and ``discarded(reason)`` is
    called: the caller exports again instead of shipping weights nobody checked.
    """
    entry = Path(cache_dir) / key
    try:
        meta = json.loads((entry / META).read_text())
    except (OSError, ValueError):
        return None
    try:
        recorded = meta.get("files") if isinstance(meta, dict) else None
        if not isinstance(recorded, dict):
            raise _Stale("it records no file hashes (written by an older edgekit)")
        for name in FILES:
            want = recorded.get(name) or {}
            if not (entry / name).is_file() or (entry / name).stat().st_size != want.get("size"):
                raise _Stale(f"{name} changed size since it was stored")
            got = _copy_hashed(entry / name, into / name)
            if got != (want.get("size"), want.get("sha256")):
                raise _Stale(f"{name} changed since it was stored (sha256 {got[1][:12]}..., recorded "
                             f"{str(want.get('sha256'))[:12]}...)")
    except (OSError, _Stale) as e:
        for name in FILES:
            (into / name).unlink(missing_ok=True)
        if isinstance(e, _Stale):
            shutil.rmtree(entry, ignore_errors=True)
            if discarded is not None:
                discarded(f"cache entry {entry} discarded: {e}")
        return None
    return meta


class _Stale(Exception):
    pass


def store(cache_dir: Path, key: str, folder: Path, meta: dict) -> None:
    """Save ``folder``'s export under ``key`` (best effort: a full or read-only cache never fails a build)."""
    entry = Path(cache_dir) / key
    if entry.exists():
        return
    tmp = Path(cache_dir) / f".{key}.{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir(parents=True)
        files = {}
        for name in FILES:
            size, sha = _copy_hashed(folder / name, tmp / name)
            files[name] = {"size": size, "sha256": sha}
            os.chmod(tmp / name, 0o444)   # a reminder; restore's hash check is what protects later builds
        (tmp / META).write_text(json.dumps({**meta, "files": files}))
        os.replace(tmp, entry)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
