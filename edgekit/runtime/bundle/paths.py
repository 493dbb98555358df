"""Names from an untrusted manifest: which are plain relative paths inside the bundle, and where they lead.

A bundle arrives over the network onto a robot: a name in its manifest must not climb out of the bundle
('..', absolute paths, drive letters), hide a control character, or pass through a symlink.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path
from typing import Any

from ...errors import BundleError

CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def path_problem(name: Any) -> str | None:
    """Why name is not a plain relative path inside the bundle, or None if it is."""
    if not isinstance(name, str) or not name:
        return "not a non-empty string"
    if "\x00" in name:
        return "it contains a NUL byte"
    if "\\" in name:
        return "it contains a backslash"
    if CONTROL.search(name):
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


def check_path(name: Any, where: str) -> None:
    problem = path_problem(name)
    if problem:
        raise BundleError(f"{where} {name!r} is not a safe relative path inside the bundle ({problem}): "
                          "the manifest is corrupt or hostile; do not use this bundle")


def locate(folder: Path, name: str) -> tuple[Path, str | None]:
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


def resolve_in(folder: Path, name: str) -> Path:
    """Like _locate, but a problem is a BundleError."""
    check_path(name, "file name")
    path, problem = locate(folder, name)
    if problem:
        raise BundleError(f"bundle {folder}: {name}: {problem}: do not use this bundle")
    return path
