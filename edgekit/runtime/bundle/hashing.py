"""sha256 of the bundle's files: the ``files`` table a manifest lists, and the bundle id derived from it.

Files are read in 1 MiB chunks from a file descriptor opened without following symlinks, so a multi-GB
weight file never sits in memory and nothing outside the bundle is hashed.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ...errors import BundleError
from .paths import path_problem
from .schema import MANIFEST

_CHUNK = 1024 * 1024


def hash_fd(fd: int) -> str:
    """sha256 (hex) of what is left to read from an open file descriptor."""
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
        return hash_fd(fd)
    finally:
        os.close(fd)


def walk(folder: Path, prefix: str = "") -> Iterator[tuple[str, str]]:
    """(relative posix name, kind) of every entry below folder, kind in file/symlink/other; never follows links."""
    with os.scandir(folder) as it:
        entries = sorted(it, key=lambda e: e.name)
    for e in entries:
        name = prefix + e.name
        if e.is_symlink():
            yield name, "symlink"
        elif e.is_dir(follow_symlinks=False):
            yield from walk(Path(e.path), name + "/")
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
    for name, kind in walk(folder):
        if name == MANIFEST:
            continue
        if kind == "symlink":
            raise BundleError(f"{folder / name} is a symlink: a bundle holds regular files only; "
                              "copy the file into the bundle instead")
        if kind != "file":
            raise BundleError(f"{folder / name} is not a regular file: a bundle holds regular files only")
        problem = path_problem(name)
        if problem:
            raise BundleError(f"file name {name!r} in {folder} cannot be listed in a manifest ({problem}): rename it")
        fd = os.open(folder / name, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        try:
            table[name] = {"sha256": hash_fd(fd), "size": os.fstat(fd).st_size}
        finally:
            os.close(fd)
    return table


def bundle_id(manifest) -> str:
    """12 hex digits identifying the bundle's content: the sha256 of its files table in canonical JSON.

    Two bundles with the same files (names, sizes, hashes) have the same id whatever their manifest's
    timestamps say; ``edgekit flash`` names releases by it.
    """
    files = manifest.get("files") if isinstance(manifest, dict) else manifest.files
    if not isinstance(files, dict):
        raise BundleError("the manifest has no files table: cannot derive a bundle id; rebuild the bundle")
    canonical = json.dumps(files, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()[:12]
