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

Two ways to use an entry: ``restore``/``store`` copy a build's export out of and into the cache (a bundle
owns its files), ``use_or_export`` exports straight into the cache and hands back the entry's folder to run
in place (``edgekit eval``'s fp32 reference: too big to copy, and it never becomes part of a bundle). Both
check the same recorded sizes and hashes.
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
    return _hashed(dest)   # a reflink shares the cache's blocks: hash what the bundle now holds


def _hashed(path: Path) -> tuple[int, str]:
    """(size, sha256) of ``path``, read once."""
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def _check(entry: Path, meta, digest: Callable[[str], tuple[int, str]]) -> None:
    """Raise _Stale unless every file of ``entry`` has the size and sha256 ``meta`` recorded.

    ``digest(name)`` returns the (size, sha256) to compare: of a copy being made, or of the file itself.
    """
    recorded = meta.get("files") if isinstance(meta, dict) else None
    if not isinstance(recorded, dict):
        raise _Stale("it records no file hashes (written by an older edgekit)")
    for name in FILES:
        want = recorded.get(name) or {}
        if not (entry / name).is_file() or (entry / name).stat().st_size != want.get("size"):
            raise _Stale(f"{name} changed size since it was stored")
        got = digest(name)
        if got != (want.get("size"), want.get("sha256")):
            raise _Stale(f"{name} changed since it was stored (sha256 {got[1][:12]}..., recorded "
                         f"{str(want.get('sha256'))[:12]}...)")


def _discard(entry: Path, why: _Stale, discarded: Callable[[str], None] | None) -> None:
    shutil.rmtree(entry, ignore_errors=True)
    if discarded is not None:
        discarded(f"cache entry {entry} discarded: {why}")


def _read_meta(entry: Path):
    try:
        return json.loads((entry / META).read_text())
    except (OSError, ValueError):
        return None


def restore(cache_dir: Path, key: str, into: Path, *, discarded: Callable[[str], None] | None = None) -> dict | None:
    """Copy a cached export's files into ``into``; returns its metadata, or None on a miss.

    An entry whose files no longer have the size and sha256 recorded when it was stored (edited in place,
    damaged disk, or written by an edgekit that recorded no hashes) is deleted and ``discarded(reason)`` is
    called: the caller exports again instead of shipping weights nobody checked.
    """
    entry = Path(cache_dir) / key
    meta = _read_meta(entry)
    if meta is None:
        return None
    try:
        _check(entry, meta, lambda name: _copy_hashed(entry / name, into / name))
    except (OSError, _Stale) as e:
        for name in FILES:
            (into / name).unlink(missing_ok=True)
        if isinstance(e, _Stale):
            _discard(entry, e, discarded)
        return None
    return meta


class _Stale(Exception):
    pass


def use_or_export(cache_dir: Path, key: str, export: Callable[[Path], dict], *,
                  discarded: Callable[[str], None] | None = None) -> tuple[Path, dict]:
    """The folder of the entry ``key`` and its metadata, used in place; ``export(folder)`` fills it on a miss.

    A hit is checked as in :func:`restore` (one read of its files; a stale entry is deleted, ``discarded``
    told, and exported again). On a miss ``export`` writes ``FILES`` into a temporary folder in the cache
    and returns the metadata to record; the folder is renamed into place only when complete, so a half-done
    export is never used. Unlike :func:`store`, errors propagate: the caller has no other copy.
    """
    entry = Path(cache_dir) / key
    meta = _read_meta(entry)
    if meta is not None:
        try:
            _check(entry, meta, lambda name: _hashed(entry / name))
            return entry, meta
        except _Stale as e:
            _discard(entry, e, discarded)
    tmp = Path(cache_dir) / f".{key}.{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir(parents=True)
        meta = export(tmp)
        hashes = {name: _hashed(tmp / name) for name in FILES}
        try:
            return entry, _seal(tmp, entry, meta, hashes)
        except OSError:
            other = _read_meta(entry)
            if other is None:
                raise
            return entry, other      # another process stored the same export first: theirs is as good
    finally:
        shutil.rmtree(tmp, ignore_errors=True)     # gone after the rename; left over only on failure


def _seal(tmp: Path, entry: Path, meta: dict, hashes: dict[str, tuple[int, str]]) -> dict:
    """Record ``hashes`` in ``tmp``'s metadata and rename ``tmp`` to ``entry``; the metadata written."""
    files = {name: {"size": size, "sha256": sha} for name, (size, sha) in hashes.items()}
    for name in files:
        os.chmod(tmp / name, 0o444)   # a reminder; the hash check is what protects later builds
    meta = {**meta, "files": files}
    (tmp / META).write_text(json.dumps(meta))
    os.replace(tmp, entry)
    return meta


def store(cache_dir: Path, key: str, folder: Path, meta: dict) -> None:
    """Save ``folder``'s export under ``key`` (best effort: a full or read-only cache never fails a build)."""
    entry = Path(cache_dir) / key
    if entry.exists():
        return
    tmp = Path(cache_dir) / f".{key}.{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir(parents=True)
        _seal(tmp, entry, meta, {name: _copy_hashed(folder / name, tmp / name) for name in FILES})
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
