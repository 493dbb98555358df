"""Getting a bundle's files into ``DIR/releases/<id>/`` on the device: plan, reuse, send, verify, finalize.

- **Plan**: a file already in the release folder is kept; a file whose sha256 another complete release on
  the device has is hard-linked from it (copied if the filesystem cannot link); a ``NAME.part`` left by an
  interrupted transfer continues from its size; everything else is sent.
- **Send**: one ``cat >> NAME.part`` per file over the shared ssh connection, so nothing but ssh and a
  POSIX shell is needed on the device and a partial file never has its final name.
- **Check here**: each file sent is hashed while it is read; a local file that does not match the manifest
  (the bundle was edited after it was built) stops the flash naming that file.
- **Verify**: ``sha256sum`` on the device, for every file, compared here with the manifest. A file sent
  in this run that does not match is deleted and the flash fails naming it; a reused file that does not
  match (an older release rotted on disk) is deleted and sent once more.
- **Finalize**: ``.part`` files are renamed, files the manifest does not list are removed, and manifest.json
  is written last: a release folder with a manifest is complete and verified, one without never becomes
  ``current``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import BinaryIO

from ..errors import DeployFailed
from .probe import DeviceState
from .ssh import Session

# Actions: "present" (final name already there), "part" (a complete NAME.part: hash, then rename),
# "resume" (NAME.part continues from offset), "send" (from the start), "link" (from another release).
SENT = ("resume", "send")


@dataclass(frozen=True)
class FileAction:
    name: str
    size: int
    sha256: str
    how: str
    offset: int = 0              # bytes already in NAME.part (resume)
    source: str | None = None    # "<release id>/<name>" on the device (link)

    @property
    def staged(self) -> str:
        """The name it has on the device until finalize."""
        return self.name + ".part" if self.how in ("part", "resume", "send") else self.name

    @property
    def to_send(self) -> int:
        return self.size - self.offset if self.how in SENT else 0


def plan_files(files: dict[str, dict], state: DeviceState, release_id: str) -> list[FileAction]:
    """What to do with each file of the bundle (``files`` is the manifest's table), given the device state."""
    target = state.releases.get(release_id)
    have: dict[tuple[str, int], str] = {}
    # Prefer the current release as the source of links: it is the one most recently verified in use.
    order = sorted((r for r in state.releases.values() if r.complete and r.id != release_id),
                   key=lambda r: r.id != state.current)
    for rel in order:
        for name, entry in rel.files.items():
            if isinstance(entry, dict) and isinstance(entry.get("sha256"), str) and isinstance(entry.get("size"), int):
                have.setdefault((entry["sha256"], entry["size"]), f"{rel.id}/{name}")
    on_device = state.target_files
    actions = []
    for name, entry in sorted(files.items()):
        size, digest = entry["size"], entry["sha256"]
        part = on_device.get(name + ".part")
        if (target is not None and target.complete) or on_device.get(name) == size:
            actions.append(FileAction(name, size, digest, "present"))
        elif part is not None and part == size:
            actions.append(FileAction(name, size, digest, "part"))
        elif part is not None and 0 < part < size:
            actions.append(FileAction(name, size, digest, "resume", offset=part))
        elif (digest, size) in have:
            actions.append(FileAction(name, size, digest, "link", source=have[(digest, size)]))
        else:
            actions.append(FileAction(name, size, digest, "send"))
    return actions


# Arguments: DIR, release id, then (source "<id>/<name>", destination name) pairs.
_PREPARE = r"""
dir=$1; rel="$1/releases/$2"; shift 2
mkdir -p "$rel" || exit 3
while [ $# -ge 2 ]; do
  src="$dir/releases/$1"; dst="$rel/$2"; shift 2
  mkdir -p "$(dirname "$dst")" && rm -f "$dst" "$dst.part" || exit 3
  if ! ln "$src" "$dst" 2>/dev/null; then
    cp "$src" "$dst.part" && mv -f "$dst.part" "$dst" || { rm -f "$dst.part"; echo "cannot copy $src" >&2; exit 4; }
  fi
done
"""

# Arguments: DIR, release id, file name, bytes already in NAME.part. Appends stdin to NAME.part.
_SEND = r"""
f="$1/releases/$2/$3.part"
mkdir -p "$(dirname "$f")" || exit 3
if [ "$4" = 0 ]; then
  : > "$f" || exit 3
else
  have=$(stat -c %s "$f" 2>/dev/null || echo none)
  [ "$have" = "$4" ] || { echo "$3.part changed on the device ($have bytes, expected $4)" >&2; exit 5; }
fi
exec cat >> "$f"
"""

# Arguments: DIR, release id, names. One "hash=<sha256>" or "hash=missing" per name, then every entry.
_HASH = r"""
cd "$1/releases/$2" || exit 3
shift 2
for f; do
  if [ -f "$f" ] && [ ! -L "$f" ]; then
    h=$(sha256sum < "$f") && echo "hash=${h%% *}" || echo "hash=unreadable"
  else
    echo "hash=missing"
  fi
done
find . ! -type d | sed 's|^\./|entry=|'
"""

_REMOVE = r"""
cd "$1/releases/$2" || exit 3
shift 2
rm -f -- "$@"
"""

# Arguments: DIR, release id, "write" or "keep" (manifest), names to rename from .part, "--", names to remove.
# stdin: manifest.json (when "write"). Files are made read-only because releases share them as hard links:
# writing into one release's file would change the others. sync before returning: the switch must never
# publish files whose data is not on disk yet.
_FINALIZE = r"""
set -e
rel="$1/releases/$2"; mode=$3; shift 3
while [ $# -gt 0 ] && [ "$1" != "--" ]; do mv -f -- "$rel/$1.part" "$rel/$1"; shift; done
[ $# -gt 0 ] && shift
for x; do rm -f -- "$rel/$x"; done
if [ "$mode" = write ]; then
  cat > "$rel/manifest.json.part"
  mv -f -- "$rel/manifest.json.part" "$rel/manifest.json"
fi
find "$rel" -type f ! -name '*.part' -exec chmod a-w {} +
sync
"""


def prepare(session: Session, path: str, release_id: str, actions: list[FileAction]) -> None:
    """Create the release folder and hard-link (or copy) the files other releases already have."""
    args = [path, release_id]
    for a in actions:
        if a.how == "link":
            args += [a.source, a.name]
    # No timeout here and in finalize: copying (no hard links) or sync after GBs on an SD card takes minutes;
    # ssh's keep-alives still notice a dead link.
    done = session.run(_PREPARE, args, what="preparing the release folder", timeout=None)
    if done.returncode:
        raise DeployFailed(f"{session.device.name}: cannot prepare {path}/releases/{release_id} on the device "
                           f"({done.last_error()}): check the disk and permissions there", device=session.device.name)


class _Hashing:
    """A file read for sending that also feeds sha256: the local copy is checked by the same read."""

    def __init__(self, f: BinaryIO, digest):
        self.f, self.digest = f, digest

    def read(self, n: int) -> bytes:
        chunk = self.f.read(n)
        self.digest.update(chunk)
        return chunk


def send_file(session: Session, path: str, release_id: str, action: FileAction, local: Path,
              on_bytes: Callable[[int], None]) -> int:
    """Send one file (from ``action.offset``) into NAME.part; returns the bytes sent. DeployFailed with how far
    it got when the connection breaks (the next flash continues from there).

    The local file is hashed while it is read (a resumed file's first ``offset`` bytes are read here too): a
    bundle edited after it was built (same size, other bytes) fails here naming the local file, and its
    copy on the device is deleted, instead of failing the device's verification on every run."""
    name = session.device.name
    digest = hashlib.sha256()
    with open(local, "rb") as f:
        left = action.offset
        while left:
            chunk = f.read(min(left, 8 * 1024 * 1024))
            if not chunk:
                break
            digest.update(chunk)
            left -= len(chunk)
        sent, done = session.send(_SEND, [path, release_id, action.name, str(action.offset)], _Hashing(f, digest),
                                  action.to_send, what=f"sending {action.name}", on_bytes=on_bytes)
    if done.returncode == 255:
        raise DeployFailed(f"{name}: connection lost while sending {action.name} ({action.offset + sent} of "
                           f"{action.size} bytes written): nothing was switched; run the same command again to "
                           "resume", device=name)
    if done.returncode:
        why = done.last_error()
        hint = ("free space on the device or pass --path on a bigger disk" if "space" in why.lower()
                else "run the same command again")
        raise DeployFailed(f"{name}: sending {action.name} failed ({why}): nothing was switched; {hint}", device=name)
    got = digest.hexdigest()
    if sent != action.to_send or got != action.sha256:
        remove(session, path, release_id, [action.staged])
        what = (f"is shorter than its manifest says ({action.offset + sent} of {action.size} bytes)"
                if sent != action.to_send else
                f"has sha256 {got[:12]}... but the bundle's manifest says {action.sha256[:12]}...")
        raise DeployFailed(f"{name}: the local file {local} {what}: the bundle was changed after it was built; "
                           "nothing was switched; rebuild the bundle (edgekit build) or restore the file, check "
                           "it with `edgekit verify`, then flash again", device=name)
    return sent


def hash_files(session: Session, path: str, release_id: str,
                actions: list[FileAction]) -> tuple[dict[str, str], list[str]]:
    """({file name: sha256 computed on the device, or "missing"}, every entry in the release folder)."""
    done = session.run(_HASH, [path, release_id, *(a.staged for a in actions)], what="verifying files",
                       timeout=None)
    if done.returncode:
        raise DeployFailed(f"{session.device.name}: cannot verify {path}/releases/{release_id} on the device "
                           f"({done.last_error()})", device=session.device.name)
    lines = done.stdout.splitlines()
    hashes = [ln[5:] for ln in lines if ln.startswith("hash=")]
    entries = [ln[6:] for ln in lines if ln.startswith("entry=")]
    if len(hashes) != len(actions):
        raise DeployFailed(f"{session.device.name}: the device returned {len(hashes)} hashes for {len(actions)} "
                           "files: run the same command again", device=session.device.name)
    return {a.name: h for a, h in zip(actions, hashes)}, entries


def remove(session: Session, path: str, release_id: str, names: list[str]) -> None:
    if names:
        session.run(_REMOVE, [path, release_id, *names], what="removing bad copies")


def finalize(session: Session, path: str, release_id: str, actions: list[FileAction], extras: list[str],
             manifest_bytes: bytes | None) -> None:
    """Rename the verified .part files, remove unlisted entries, write manifest.json last (None: keep it)."""
    renames = [a.name for a in actions if a.staged != a.name]
    args = [path, release_id, "write" if manifest_bytes is not None else "keep", *renames, "--", *extras]
    done = session.run(_FINALIZE, args, what="finalizing the release", input=manifest_bytes or b"", timeout=None)
    if done.returncode:
        raise DeployFailed(f"{session.device.name}: cannot finalize {path}/releases/{release_id} on the device "
                           f"({done.last_error()}): nothing was switched; run the same command again",
                           device=session.device.name)


def mismatches(actions: list[FileAction], hashes: dict[str, str]) -> list[FileAction]:
    return [a for a in actions if hashes.get(a.name) != a.sha256]


def as_send(action: FileAction) -> FileAction:
    """The same file, to be sent from the start (its copy on the device was bad)."""
    return replace(action, how="send", offset=0, source=None)


def extras(entries: list[str], actions: list[FileAction]) -> list[str]:
    """Entries of the release folder that are not the bundle's files (stale .part files, leftovers)."""
    keep = {a.staged for a in actions} | {"manifest.json"}
    return sorted(e for e in entries if e not in keep and not e.startswith("/") and ".." not in e.split("/"))
