"""The release layout on a device, and everything that changes which release is in use.

::

    DIR/releases/<id>/      one folder per bundle (id = bundle_id of its manifest); complete once manifest.json exists
    DIR/current             -> releases/<id>: a relative symlink, replaced by a single rename
    DIR/history             ids of the releases made current, oldest first; --rollback goes one back

Only complete releases are ever made current. Pruning keeps the ``keep`` most recently used releases and
never the current one or the one before it (the rollback target), whatever ``keep`` says.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from ..errors import DeployFailed
from .probe import DeviceState
from .ssh import Completed, Session

# Arguments: DIR, release id to make current ("" removes current), the new history (ids, one per line),
# then release ids to delete. A temporary link renamed over ``current`` is atomic: a reader sees the old
# release or the new one, never a missing link. (mv -T is GNU; python3's os.replace is the fallback.)
# Order: everything that needs disk space (the new history, the new link, a hard link keeping the old
# history) is written before anything changes, so a full disk fails with current and history untouched;
# then history and current are renamed into place, and if the second rename fails the first is undone.
# Exit 4: release incomplete, 5: nothing was changed (reason on stderr). Pruning after the switch never
# fails it: an undeletable release is reported as a "warning=" line.
_SWITCH = r"""
dir=$1; new=$2; hist=$3; shift 3
fail() { rm -f "$dir/.current.new" "$dir/.history.new" "$dir/.history.old"; echo "$1" >&2; exit 5; }
unhistory() {
  if [ -f "$dir/.history.old" ]; then mv -f "$dir/.history.old" "$dir/history"; else rm -f "$dir/history"; fi
}
if [ -n "$new" ]; then
  [ -f "$dir/releases/$new/manifest.json" ] || { echo "release $new is not complete" >&2; exit 4; }
fi
{ [ -z "$hist" ] || printf '%s\n' "$hist"; } > "$dir/.history.new" 2>/dev/null &&
  [ "$(cat "$dir/.history.new")" = "$hist" ] || fail "cannot write $dir/.history.new (disk full?)"
if [ -n "$new" ]; then
  rm -f "$dir/.current.new"
  ln -s "releases/$new" "$dir/.current.new" 2>/dev/null || fail "cannot create $dir/.current.new (disk full?)"
fi
rm -f "$dir/.history.old"
if [ -f "$dir/history" ]; then ln "$dir/history" "$dir/.history.old" 2>/dev/null || fail "cannot keep $dir/history"; fi
mv -f "$dir/.history.new" "$dir/history" || fail "cannot replace $dir/history"
if [ -n "$new" ]; then
  mv -T -f "$dir/.current.new" "$dir/current" 2>/dev/null ||
    python3 -c 'import os, sys; os.replace(sys.argv[1], sys.argv[2])' "$dir/.current.new" "$dir/current" ||
    { unhistory; fail "cannot replace $dir/current"; }
else
  rm -f "$dir/current" || { unhistory; fail "cannot remove $dir/current"; }
fi
rm -f "$dir/.history.old"
for p; do rm -rf -- "$dir/releases/$p" 2>/dev/null || echo "warning=could not delete $dir/releases/$p"; done
sync
exit 0
"""

_READLINK = r"""
readlink "$1/current" 2>/dev/null || true
"""

# Arguments: python, then its arguments. From / so that nothing in the login folder (such as ~/edgekit, the
# default DIR) shadows an installed module.
_PYTHON = r"""
py=$1; shift
cd / && exec "$py" "$@"
"""

SMOKE_PROMPT = "Hello"
SMOKE_TOKENS = 4
_SMOKE_CODE = """
import json, sys, time
t0 = time.perf_counter()
from edgekit.runtime.model import load
model = load(sys.argv[1])
t1 = time.perf_counter()
r = model.generate(sys.argv[2], max_new_tokens=int(sys.argv[3]), temperature=0.0)
print(json.dumps({"load_s": round(t1 - t0, 2), "tokens": r.completion_tokens, "text": r.text,
                  "decode_tok_s": round(r.decode_tok_s, 1)}))
"""
# The edgekit CLI without relying on an `edgekit` script on the device's PATH.
_CLI_CODE = "import sys; sys.argv[0] = 'edgekit'; from edgekit.cli import main; main()"


@dataclass(frozen=True)
class Release:
    """One release folder on a device, as ``edgekit releases`` lists it."""

    id: str
    complete: bool
    current: bool
    previous: bool            # where --rollback would go
    created: str | None       # from its manifest
    model: str | None
    target: str | None
    backend: str | None
    precision: str | None
    size: int                 # bytes of its files (from its manifest)

    @property
    def state(self) -> str:
        return ("current" if self.current else "previous" if self.previous else
                "ready" if self.complete else "incomplete")


def base_history(state: DeviceState) -> list[str]:
    """The activation history of complete releases, oldest first, ending with the current release."""
    complete = {r.id for r in state.releases.values() if r.complete}
    out: list[str] = []
    for rid in state.history:
        if rid in complete and rid not in out:
            out.append(rid)
    if state.current in complete:
        out = [r for r in out if r != state.current] + [state.current]
    return out


def history_with(state: DeviceState, new_id: str) -> list[str]:
    return [r for r in base_history(state) if r != new_id] + [new_id]


def prune_list(state: DeviceState, history: list[str], keep: int, flashed: str | None = None) -> list[str]:
    """Releases to delete: all but the ``keep`` most recently used, never the last two of ``history``
    (current and the rollback target). Finished releases that were never used or rolled away from rank after
    used ones (newest first); half-copied ones other than ``flashed`` rank last."""
    used = list(reversed(history))
    unused = sorted((r for r in state.releases.values() if r.complete and r.id not in history),
                    key=lambda r: str((r.manifest or {}).get("created", "")), reverse=True)
    partial = sorted(r.id for r in state.releases.values() if not r.complete and r.id != flashed)
    ranked = used + [r.id for r in unused] + partial
    protected = set(history[-2:]) | ({flashed} if flashed else set())
    kept = set(ranked[:max(keep, 1)]) | protected
    return [r for r in ranked if r not in kept]


def switch(session: Session, path: str, release_id: str | None, history: list[str], prune: list[str], *,
           before: str | None) -> list[str]:
    """Point ``current`` at ``release_id`` (None removes it), write the history, delete ``prune``; returns
    warnings (releases that could not be deleted). ``before`` is the release current was at: on failure the
    message says where current really points, read back from the device."""
    done = session.run(_SWITCH, [path, release_id or "", "\n".join(history), *prune], what="switching current",
                       timeout=None)   # deleting old releases and sync can take minutes on an SD card
    name = session.device.name
    if done.returncode:
        now = session.run(_READLINK, [path], what="reading current").stdout.strip() or None
        now_id = now.rstrip("/").split("/")[-1] if now else None
        where = (f"current was not changed (still {_rel(before)})" if now_id == before else
                 f"current now points to {_rel(now_id)}")
        raise DeployFailed(f"{name}: cannot switch {path}/current to {_rel(release_id)} ({done.last_error()}): "
                           f"{where}; check the free space on the device (df {path}), then run the command again",
                           device=name)
    return [ln[len("warning="):] for ln in done.stdout.splitlines() if ln.startswith("warning=")]


def _rel(release: str | None) -> str:
    return f"releases/{release}" if release else "unset"


def rollback_target(state: DeviceState, name: str) -> tuple[str, list[str]]:
    """(the release to go back to, the history after going back). DeployFailed when there is none."""
    if state.current is None:
        raise DeployFailed(f"{name}: nothing to roll back: current is not set on the device (flash a bundle first)",
                           device=name)
    history = base_history(state)
    if len(history) < 2:
        raise DeployFailed(f"{name}: no earlier release to roll back to (current is releases/{state.current}, "
                           "the first one flashed or the others were pruned): flash the bundle you want instead",
                           device=name)
    return history[-2], history[:-1]


def releases_of(state: DeviceState) -> list[Release]:
    """The releases on the device: current first, then by last use, then the rest."""
    history = base_history(state)
    previous = history[-2] if len(history) >= 2 and history[-1] == state.current else None
    order = {rid: i for i, rid in enumerate(reversed(history))}
    out = []
    for r in state.releases.values():
        m = r.manifest or {}
        model = m.get("model") if isinstance(m.get("model"), dict) else {}
        source = m.get("source") if isinstance(m.get("source"), dict) else {}
        target = m.get("target") if isinstance(m.get("target"), dict) else {}
        out.append(Release(
            id=r.id, complete=r.complete, current=r.id == state.current, previous=r.id == previous,
            created=m.get("created"), model=model.get("name") or source.get("name"), target=target.get("name"),
            backend=m.get("backend"), precision=m.get("precision"), size=r.size))
    used = sorted((r for r in out if r.id in order), key=lambda r: order[r.id])
    rest = sorted((r for r in out if r.id not in order), key=lambda r: (r.complete, r.created or "", r.id),
                  reverse=True)
    return used + rest


def run_python(session: Session, python: str, args: list[str], *, what: str, timeout: float | None) -> Completed:
    return session.run(_PYTHON, [python, *args], what=what, timeout=timeout)


def smoke(session: Session, python: str, path: str, *, timeout: float) -> tuple[bool, str]:
    """Load DIR/current on the device and generate a few tokens. (ok, a one-line report or the error)."""
    done = run_python(session, python, ["-c", _SMOKE_CODE, f"{path}/current", SMOKE_PROMPT, str(SMOKE_TOKENS)],
                      what="running the smoke test", timeout=timeout)
    if done.returncode:
        return False, done.last_error()
    try:
        result = json.loads(done.stdout.strip().splitlines()[-1])
        return True, (f"{result['tokens']} tokens in a {result['load_s']}s load + generation: "
                      f"{result['text']!r}")
    except (ValueError, IndexError, KeyError, TypeError):
        return False, f"unexpected smoke test output: {done.stdout.strip()[-200:]!r}"


def build_engine(session: Session, python: str, release: str, *, timeout: float | None) -> tuple[bool, str]:
    """Run ``edgekit engine <release>`` on the device. (ok, its log: stdout and stderr)."""
    done = run_python(session, python, ["-c", _CLI_CODE, "engine", release], what="building the engine",
                      timeout=timeout)
    log = done.stdout + (("\n" if done.stdout and not done.stdout.endswith("\n") else "") + done.stderr
                         if done.stderr else "")
    return done.returncode == 0, log
