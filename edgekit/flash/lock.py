"""One flash (or rollback) at a time per device folder: a lock on the device, held from the probe to the end.

The lock is ``DIR/.lock``, a symlink whose target is the holder: the pid and start time of a shell on the
device, then who started the flash (user, host, local pid, time). Creating a symlink is atomic, so of two
flashes exactly one gets it; the other stops at once, naming the holder. The shell holding it runs over
the flash's ssh connection and waits for its stdin to close: it removes the lock when the flash closes it
(every exit path, also an exception), when the connection ends (the flash was killed, the link dropped),
or on SIGHUP/SIGTERM. If that shell was killed outright (SIGKILL, reboot), the lock names a process that no
longer exists -- checked by pid and start time, so a reused pid does not count -- and the next flash takes
it over with a warning.
"""

from __future__ import annotations

import os
import pwd
import select
import socket
import subprocess
import time
from dataclasses import dataclass

from ..errors import DeployFailed
from .probe import HOME_PATH
from .ssh import Session

# Arguments: DIR (as given), who is asking. Prints "dir=", then "locked=1" (then holds until stdin closes),
# "busy=<holder>", or "error=<why>"; "stale=<holder>" before taking over a dead holder's lock.
_LOCK = HOME_PATH + r"""
dir=$(home_path "$1"); who=$2
echo "dir=$dir"
created=; [ -d "$dir" ] || created=1
mkdir -p "$dir" 2>/dev/null || { echo "error=cannot create $dir"; exit 3; }
lock="$dir/.lock"
started() { [ -r "/proc/$1/stat" ] && cut -d' ' -f22 "/proc/$1/stat" 2>/dev/null; }
alive() {  # pid, start time recorded in the lock
  if [ -d /proc/self ]; then [ "$(started "$1")" = "$2" ]; else kill -0 "$1" 2>/dev/null; fi
}
me="$$ $(started $$ || echo 0) $who"
tries=0
until ln -s "$me" "$lock" 2>/dev/null; do
  tries=$((tries + 1))
  [ $tries -le 5 ] || { echo "error=cannot create $lock"; exit 3; }
  held=$(readlink "$lock") || continue          # released just now: try again
  pid=${held%% *}; rest=${held#* }; start=${rest%% *}; holder=${rest#* }
  if alive "$pid" "$start"; then
    [ -z "$created" ] || rmdir "$dir" 2>/dev/null
    echo "busy=$holder"; exit 0
  fi
  echo "stale=$holder"
  mv -f "$lock" "$lock.stale.$$" 2>/dev/null || continue
  if [ "$(readlink "$lock.stale.$$")" != "$held" ]; then
    # Another flash took over the same stale lock a moment ago and this moved its fresh one: put it back.
    ln -s "$(readlink "$lock.stale.$$")" "$lock" 2>/dev/null
    rm -f "$lock.stale.$$"
    echo "busy=$(readlink "$lock" | cut -d' ' -f3-)"; exit 0
  fi
  rm -f "$lock.stale.$$"
done
release() {  # and the folder, if this made it and the flash put nothing there (it was refused)
  [ "$(readlink "$lock" 2>/dev/null)" = "$me" ] && rm -f "$lock" && { [ -z "$created" ] || rmdir "$dir" 2>/dev/null; }
}
trap 'release; exit 1' HUP TERM INT PIPE
echo "locked=1"
cat > /dev/null
release
"""


def _me() -> str:
    try:
        user = pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        user = str(os.getuid())
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return f"{user}@{socket.gethostname()} pid {os.getpid()} since {when}"


@dataclass
class DeviceLock:
    session: Session
    proc: subprocess.Popen
    path: str                      # absolute DIR on the device
    stale: str | None = None       # the holder of a dead lock that was taken over

    def release(self) -> None:
        """Close the holder's stdin: the device removes the lock. Safe to call twice."""
        if self.proc.stdin and not self.proc.stdin.closed:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
        self.session.finish(self.proc)

    def __enter__(self) -> DeviceLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def acquire(session: Session, path: str, timeout: float = 60) -> DeviceLock:
    """Take DIR/.lock on the device, or DeployFailed naming who holds it (no waiting: the other flash may run
    for hours)."""
    name = session.device.name
    proc = session.start(_LOCK, [path, _me()])
    lines: dict[str, str] = {}
    stale = None
    deadline = time.monotonic() + timeout
    try:
        while "locked" not in lines:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([proc.stdout], [], [], left)[0]:
                raise DeployFailed(f"{name}: no answer within {timeout:.0f}s while locking {path}: check the device "
                                   "(load, disk), then run the command again", device=name)
            raw = proc.stdout.readline()
            if not raw:
                break
            key, _, value = raw.decode("utf-8", "replace").rstrip("\n").partition("=")
            lines[key] = value
            if key == "stale":
                stale = value
            if key in ("busy", "error"):
                break
    except BaseException:
        _stop(session, proc)
        raise
    where = lines.get("dir") or path
    if "locked" in lines:
        return DeviceLock(session, proc, where, stale)
    _stop(session, proc)
    if "busy" in lines:
        raise DeployFailed(f"{name}: {where} is locked by another flash or rollback ({lines['busy']}): wait for it to "
                           "finish, then run the command again (a flash that was cut off releases it as soon as the "
                           "device drops its connection)", device=name)
    why = lines.get("error") or "the device closed the connection"
    raise DeployFailed(f"{name}: cannot lock {where} on the device ({why}): check the path and its permissions",
                       device=name)


def _stop(session: Session, proc: subprocess.Popen) -> None:
    if proc.stdin and not proc.stdin.closed:
        try:
            proc.stdin.close()
        except OSError:
            pass
    session.finish(proc)
