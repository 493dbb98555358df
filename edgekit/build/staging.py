"""Atomic build output: a bundle appears complete at its destination, or not at all.

``staged_output(dest, force=...)`` hands the build a hidden temporary folder next to ``dest`` (same
filesystem, so the final step is a rename, not a copy). When the build finishes, the files are flushed
to disk and the folder is renamed to ``dest``; if anything goes wrong (an error, Ctrl-C, a full disk)
the temporary folder is deleted, so no half-written bundle is left to be flashed by mistake.
"""

from __future__ import annotations

import errno
import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import OutputError
from ..runtime.bundle import fsync_dir as _fsync_dir
from ..units import fmt_bytes

_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def _no_space_error(exc: BaseException) -> OSError | None:
    """The ENOSPC/EDQUOT OSError in exc or its cause/context chain (libraries often wrap it), or None."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in _NO_SPACE:
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def _tree_bytes(path: Path) -> int:
    if not os.path.isdir(path):
        return os.lstat(path).st_size if _exists(path) else 0
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_size
            except OSError:
                pass
    return total


def _free_bytes(path: Path) -> int:
    try:
        st = os.statvfs(path)
    except (OSError, AttributeError):
        return 0
    return st.f_bavail * st.f_frsize


def _fsync_tree(path: Path) -> None:
    """Flush every file and folder below path, so the rename never publishes files whose data is not on disk."""
    for root, _dirs, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    for root, _dirs, _files in os.walk(path, topdown=False):
        _fsync_dir(Path(root))


def _hidden_sibling(dest: Path, tag: str) -> Path:
    """Create and return an empty hidden folder ``.NAME.TAG-XXXXXXXX`` next to dest.

    Not tempfile.mkdtemp: that makes the folder 0700, and the bundle would keep that mode after the rename.
    os.mkdir honours the umask like any folder the user creates.
    """
    while True:
        path = dest.parent / f".{dest.name}.{tag}-{secrets.token_hex(4)}"
        try:
            os.mkdir(path)
            return path
        except FileExistsError:
            continue


def _exists(path: Path) -> bool:
    return os.path.lexists(path)


def _remove(path: Path) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def _exists_error(dest: Path) -> OutputError:
    return OutputError(f"{dest} exists: pass --force to replace it, or choose another -o")


@contextmanager
def staged_output(dest: str | os.PathLike, *, force: bool, expected_bytes: int | None = None) -> Iterator[Path]:
    """Yield an empty temporary folder; on success it becomes ``dest``.

    ``dest`` existing raises OutputError unless ``force``; with ``force`` the old one is replaced only after
    the new one is complete (moved aside, the new one renamed in, then the old one deleted). A full disk
    becomes an OutputError saying how much to free (``expected_bytes``, the planner's size of the bundle,
    makes that number exact). Any exception, including KeyboardInterrupt, deletes the temporary folder.
    """
    dest = Path(dest)
    if _exists(dest) and not force:
        raise _exists_error(dest)
    parent = dest.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = _hidden_sibling(dest, "tmp")
    except OSError as e:
        if e.errno in _NO_SPACE:
            raise _space_error(dest, expected_bytes, 0, replacing=force and _exists(dest)) from None
        raise OutputError(f"cannot create the output folder next to {dest}: {e.strerror}; "
                          "choose another -o") from None
    try:
        yield tmp
        _fsync_tree(tmp)
        _publish(tmp, dest, force=force)
    except BaseException as e:
        written = _tree_bytes(tmp) if _exists(tmp) else 0
        _remove(tmp)
        if _no_space_error(e) is not None:
            raise _space_error(dest, expected_bytes, written, replacing=force and _exists(dest)) from None
        raise


def _publish(tmp: Path, dest: Path, *, force: bool) -> None:
    """Rename tmp to dest; with force, swap out an existing dest and delete it afterwards."""
    if not _exists(dest):
        try:
            os.rename(tmp, dest)
            _fsync_dir(dest.parent)
            return
        except OSError as e:
            if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
            # Someone else created dest while we were building: same rule as if it had been there.
    if not force:
        raise _exists_error(dest)
    # Move the old output aside (still complete, and restorable) before the new one takes its name.
    old = _hidden_sibling(dest, "old")
    os.rmdir(old)   # only the unique name is wanted; rename needs it free when dest is a file
    os.rename(dest, old)
    try:
        os.rename(tmp, dest)
    except BaseException:
        os.rename(old, dest)
        raise
    _fsync_dir(dest.parent)
    _remove(old)


def _space_error(dest: Path, expected_bytes: int | None, written: int, *, replacing: bool) -> OutputError:
    """Called after the temporary folder is deleted, so the free space is what a retry would have."""
    free = _free_bytes(dest.parent if dest.parent.exists() else Path("."))
    # --force keeps the old output until the new one is complete, so its space is not available meanwhile.
    old = (f"; the old {dest} ({fmt_bytes(_tree_bytes(dest))}) is kept until the new one is complete, "
           "deleting it first frees that too" if replacing else "")
    if expected_bytes:
        short = max(expected_bytes - free, 1)
        return OutputError(f"no space left on device writing {dest}: free {fmt_bytes(short)} or choose another -o "
                           f"(the bundle needs about {fmt_bytes(expected_bytes)}, {fmt_bytes(free)} is free{old})")
    # Without the bundle's size the amount to free is unknown: say what is known.
    return OutputError(f"no space left on device writing {dest}: the disk filled after {fmt_bytes(written)} and "
                       f"{fmt_bytes(free)} is free now; free space on it or choose another -o{old}")
