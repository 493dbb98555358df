"""Is a bundle intact? Every listed file against the manifest's size and sha256, and nothing unlisted.

Note that ``verify`` proves a bundle is intact and consistent with its manifest, not who made it: the
manifest is not signed.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...errors import BundleError
from .hashing import hash_fd, walk
from .manifest import read_manifest
from .paths import CONTROL, locate
from .schema import MANIFEST

# verify(weights=False) hashes only files up to this size (tokenizer, template, graph without weights);
# bigger files (weights, engines) get the size check only. Decided by size, not name, so it holds for
# whatever the exporter calls its external-data files.
QUICK_HASH_LIMIT = 64 * 1024 * 1024


@dataclass(frozen=True)
class Problem:
    name: str       # file name relative to the bundle
    what: str       # what differs, e.g. "sha256 differs from the manifest"

    def __str__(self) -> str:
        # Names come from disk or an untrusted manifest: quote any with control characters (one line, no escapes).
        name = repr(self.name) if CONTROL.search(self.name) else self.name
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
    path, problem = locate(folder, name)
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
            digest = hash_fd(fd)
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
    # the files an ONNX graph's tensors read (onnx_refs: stdlib only); a GGUF (ggml-cpu) holds its own tensors
    if manifest.dialect != "gguf" and manifest.graph["file"] not in reported:
        from ..onnx_refs import graph_problems

        problems += [Problem(manifest.graph["file"], what) for what in graph_problems(manifest)]
    try:
        for name, kind in walk(folder):
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
