"""Running commands on a device with the system OpenSSH client.

The user's ssh_config, agent, keys and known_hosts apply unchanged: edgekit only adds options that make an
unattended run safe (``BatchMode``: never prompt; a connect timeout; keep-alives so a dead link is noticed)
and one shared connection per device (``ControlMaster`` in a private temporary folder), so a flash logs in
once -- one touch of a hardware key, not one per step. Host-key checking is never relaxed: an unknown or
changed host key is an error that says how to check and accept it.

Every remote command is a POSIX sh script run as ``env LC_ALL=C sh -c SCRIPT sh ARG...`` with each argument
quoted, so the user's login shell (bash, zsh, fish) only runs one plain command, paths with spaces stay one
argument, and tools print in the C locale that the parsers expect.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO

from ..errors import DeployFailed, DeviceError, DeviceUnreachable, UserInputError

DEFAULT_PATH = "~/edgekit"
DEFAULT_PYTHON = "python3"
_CHUNK = 1024 * 1024
_BAD_DEST = re.compile(r"[\s\x00-\x1f\x7f]")


@dataclass(frozen=True)
class Device:
    """How to reach one device and where its releases live.

    ``destination`` is ``user@host``, ``host`` or a ``Host`` name from ssh_config; ``path`` is the folder on
    the device (``~/`` and relative paths are under the remote home); ``python`` is the interpreter that runs
    edgekit on the device (only needed for ``--smoke`` and ``--build-engine``); ``ssh_config`` is passed to
    ``ssh -F``.
    """

    destination: str
    path: str = DEFAULT_PATH
    port: int | None = None
    identity: str | None = None
    ssh_config: str | None = None
    python: str = DEFAULT_PYTHON
    connect_timeout: int = 15

    def __post_init__(self):
        d = self.destination
        if not isinstance(d, str) or not d or d.startswith("-") or _BAD_DEST.search(d):
            raise UserInputError(f"invalid device {d!r}: give user@host, a host name, or a Host name from "
                                 "~/.ssh/config (no spaces, not starting with '-')")
        if not self.path or "\x00" in self.path or "\n" in self.path:
            raise UserInputError(f"invalid device path {self.path!r}: give a folder such as ~/edgekit or /opt/edgekit")
        if self.port is not None and not 0 < self.port < 65536:
            raise UserInputError(f"invalid port {self.port}: use 1-65535")
        if not self.python or "\n" in self.python or "\x00" in self.python:
            raise UserInputError(f"invalid remote python {self.python!r}: give a command such as python3 or "
                                 "/opt/venv/bin/python")

    @property
    def name(self) -> str:
        return self.destination


def parse_device(text: str, **defaults) -> Device:
    """A Device from ``DEST`` or ``DEST:PATH`` (scp style; ``[v6addr]:PATH`` for IPv6 literals).

    ``defaults`` are the other Device fields (path, port, ...); a ``:PATH`` in the text wins over ``path``.
    """
    text = text.strip()
    v6 = re.match(r"^((?:[^@\s]*@)?)\[([^\]]+)\](?::(.*))?$", text)
    if v6:
        dest, path = v6.group(1) + v6.group(2), v6.group(3)
    elif text.count(":") == 1:
        dest, path = text.split(":")
    else:   # no path, or a bare IPv6 address
        dest, path = text, None
    kw = dict(defaults)
    if path:
        kw["path"] = path
    return Device(dest, **kw)


def as_device(device: str | Device) -> Device:
    """``device`` itself, or the :class:`Device` that ``"user@host[:PATH]"`` / an ssh_config name stands for."""
    return device if isinstance(device, Device) else parse_device(device)


def remote_command(script: str, args: tuple[str, ...] | list[str] = ()) -> str:
    """The one-line command ssh hands to the remote login shell: the script and its arguments, quoted."""
    return " ".join(["env", "LC_ALL=C", "sh", "-c", shlex.quote(script), "sh", *(shlex.quote(str(a)) for a in args)])


@dataclass(frozen=True)
class Completed:
    returncode: int
    stdout: str
    stderr: str

    def last_error(self, limit: int = 240) -> str:
        """The last non-empty stderr line (or stdout line), shortened: what a one-line message quotes."""
        for text in (self.stderr, self.stdout):
            lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
            if lines:
                line = lines[-1]
                return line if len(line) <= limit else line[:limit - 3] + "..."
        return f"exit status {self.returncode}"


def classify(stderr: str, device: Device, what: str) -> DeviceError:
    """The typed one-line error for an ssh failure (exit status 255), from what ssh printed."""
    host = device.destination
    text = stderr
    if "Could not resolve hostname" in text or "Name or service not known" in text:
        return DeviceUnreachable(f"{host}: unknown host (ssh cannot resolve the name): check the spelling, or add a "
                                 "Host entry for it to ~/.ssh/config", device=host)
    if "REMOTE HOST IDENTIFICATION HAS CHANGED" in text:
        return DeviceUnreachable(f"{host}: the device's host key differs from the one in known_hosts (reinstalled "
                                 f"device, or someone in between): check it, then remove the old key with "
                                 f"ssh-keygen -R <host>", device=host)
    if "Host key verification failed" in text or "No ED25519 host key is known" in text or \
            re.search(r"No \S+ host key is known", text):
        return DeviceUnreachable(f"{host}: its host key is not in known_hosts and edgekit never accepts unknown keys: "
                                 f"run `ssh {host}` once, check the fingerprint and accept it", device=host)
    if "Permission denied" in text or "Too many authentication failures" in text:
        return DeviceUnreachable(f"{host}: the device refused the login (key not accepted): add your public key to "
                                 f"its ~/.ssh/authorized_keys (ssh-copy-id {host}) or pass -i KEY", device=host)
    if "Connection refused" in text:
        return DeviceUnreachable(f"{host}: connection refused: no SSH server listens there; check that sshd runs on "
                                 "the device and the port (--port)", device=host)
    for pattern, reason in (("timed out", "connection timed out"), ("No route to host", "no route to host"),
                            ("Network is unreachable", "network unreachable"),
                            ("Connection closed", "connection closed by the device"),
                            ("Connection reset", "connection reset")):
        if pattern in text:
            return DeviceUnreachable(f"{host}: cannot reach the device while {what} ({reason}): check that it is "
                                     "powered and on the network, then run the command again", device=host)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    detail = lines[-1] if lines else "no message"
    return DeviceUnreachable(f"{host}: ssh failed while {what} ({detail}): check `ssh {host}` works without a "
                             "prompt, then run the command again", device=host)


def _ssh_binary() -> str:
    path = shutil.which("ssh")
    if not path:
        raise UserInputError("the OpenSSH client (ssh) is not installed: install openssh-client")
    return path


class SessionGroup:
    """The sessions of one command (``flash_many``'s threads), so that all can be cut at once.

    ``abort(reason)`` -- on Ctrl-C, SIGTERM or SIGHUP in the thread that waits for them -- kills every ssh
    process of every session (the shared connection included), removes their temporary folders, and makes
    each session's next command, and any session opened afterwards, raise DeployFailed("interrupted").
    """

    def __init__(self):
        self._sessions: set[Session] = set()
        self._lock = threading.Lock()
        self.reason: str | None = None

    def add(self, session: Session) -> None:
        with self._lock:
            if self.reason is not None:
                raise session.interrupted("connecting", self.reason)
            self._sessions.add(session)

    def discard(self, session: Session) -> None:
        with self._lock:
            self._sessions.discard(session)

    def abort(self, reason: str) -> None:
        with self._lock:
            self.reason = reason
            sessions = list(self._sessions)
        for session in sessions:
            session.abort(reason)


class Session:
    """One logged-in connection to a device, shared by every command of a flash (``with Session(dev) as s``)."""

    def __init__(self, device: Device, group: SessionGroup | None = None):
        self.device = device
        self.group = group
        self._ssh = _ssh_binary()
        self._dir: str | None = None
        self._control: str | None = None
        self._master: subprocess.Popen | None = None
        self._procs: set[subprocess.Popen] = set()    # ssh commands running now (killed by abort)
        self._plock = threading.Lock()
        self._aborted: str | None = None

    # ----- connection ---------------------------------------------------------------------------
    def _argv(self, *extra: str) -> list[str]:
        d = self.device
        argv = [self._ssh]
        if d.ssh_config:
            argv += ["-F", d.ssh_config]
        if d.port:
            argv += ["-p", str(d.port)]
        if d.identity:
            argv += ["-i", d.identity]
        argv += ["-T", "-o", "BatchMode=yes", "-o", f"ConnectTimeout={d.connect_timeout}",
                 "-o", "ServerAliveInterval=15", "-o", "ServerAliveCountMax=4", "-o", "ClearAllForwardings=yes"]
        return argv + list(extra)

    def __enter__(self) -> Session:
        self.open()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def open(self) -> None:
        """Log in once; later commands reuse the connection. Raises DeviceUnreachable with ssh's reason."""
        if self.group is not None:
            self.group.add(self)
        self._dir = tempfile.mkdtemp(prefix="edgekit-ssh-")
        sock = os.path.join(self._dir, "c")
        argv = self._argv("-o", "ControlMaster=yes", "-o", f"ControlPath={sock}", "-o", "ControlPersist=no",
                          "-N", "--", self.device.destination)
        limit = self.device.connect_timeout + 45    # TCP connect, then key exchange and login (agent, ProxyJump)
        with tempfile.TemporaryFile() as err:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
            self._master = proc
            try:
                # The control socket appears once the login succeeded; the process ends if it failed.
                deadline = time.monotonic() + limit
                while not os.path.exists(sock):
                    if self._aborted:
                        raise self.interrupted("connecting")
                    if proc.poll() is not None:
                        err.seek(0)
                        raise classify(err.read().decode("utf-8", "replace"), self.device, "connecting")
                    if time.monotonic() > deadline:
                        raise DeviceUnreachable(f"{self.device.name}: no login within {limit}s: check the device, "
                                                "and that `ssh` to it works without a prompt", device=self.device.name)
                    time.sleep(0.02)
            except BaseException:
                self.close()
                raise
        self._control = sock

    def abort(self, reason: str) -> None:
        """Kill this session's ssh processes and close it; its next command raises DeployFailed (any thread)."""
        with self._plock:
            self._aborted = reason
            procs = list(self._procs)
        for p in procs:
            if p.poll() is None:
                p.kill()
        self.close()

    def interrupted(self, what: str, reason: str | None = None) -> DeployFailed:
        name = self.device.name
        return DeployFailed(f"{name}: interrupted ({reason or self._aborted}) while {what}: the connection was "
                            f"closed; `edgekit releases {name}` shows what is current there, run the flash again "
                            "to finish", device=name)

    def _popen(self, argv: list[str], **kw) -> subprocess.Popen:
        with self._plock:
            if self._aborted:
                raise self.interrupted("starting a command")
            p = subprocess.Popen(argv, **kw)
            self._procs.add(p)
            return p

    def _forget(self, p: subprocess.Popen) -> None:
        with self._plock:
            self._procs.discard(p)

    def close(self) -> None:
        if self.group is not None:
            self.group.discard(self)
        master, self._master, self._control = self._master, None, None
        if master is not None and master.poll() is None:
            master.terminate()
            try:
                master.wait(timeout=10)
            except subprocess.TimeoutExpired:
                master.kill()
                master.wait()
        if self._dir:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def _command_argv(self, script: str, args) -> list[str]:
        # Without a live master (or if it died) ssh connects directly: slower, same result.
        mux = ["-o", "ControlMaster=no", "-o", f"ControlPath={self._control}"] if self._control else []
        return self._argv(*mux, "--", self.device.destination, remote_command(script, args))

    # ----- commands -----------------------------------------------------------------------------
    def run(self, script: str, args=(), *, what: str, input: bytes | None = None,
            timeout: float | None = 120) -> Completed:
        """Run a script; a non-zero exit status is returned (the caller knows what it means), an ssh failure
        (exit 255) or a timeout raises."""
        argv = self._command_argv(script, args)
        p = self._popen(argv, stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            out, err = p.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.communicate()
            raise DeployFailed(f"{self.device.name}: no answer within {timeout:.0f}s while {what}: check the device "
                               "(load, disk), then run the command again", device=self.device.name) from None
        finally:
            self._forget(p)
        if self._aborted:
            raise self.interrupted(what)
        done = Completed(p.returncode, out.decode("utf-8", "replace"), err.decode("utf-8", "replace"))
        if p.returncode == 255:
            raise classify(done.stderr, self.device, what)
        return done

    def send(self, script: str, args, source: BinaryIO, count: int, *, what: str,
             on_bytes: Callable[[int], None] | None = None) -> tuple[int, Completed]:
        """Run a script with ``count`` bytes of ``source`` on its stdin, in 1 MiB chunks.

        Returns (bytes written, the completed command); exit status 255 means the connection broke, and
        the byte count says how far it got.
        """
        argv = self._command_argv(script, args)
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            proc = self._popen(argv, stdin=subprocess.PIPE, stdout=out, stderr=err)
            written = 0
            try:
                while written < count:
                    chunk = source.read(min(_CHUNK, count - written))
                    if not chunk:
                        break
                    proc.stdin.write(chunk)
                    written += len(chunk)
                    if on_bytes:
                        on_bytes(len(chunk))
                proc.stdin.close()
            except (BrokenPipeError, ConnectionResetError):
                pass
            finally:
                # Also on an exception from on_bytes (e.g. Ctrl-C): the remote side sees EOF and stops.
                if not proc.stdin.closed:
                    try:
                        proc.stdin.close()
                    except OSError:
                        pass
                rc = proc.wait()
                self._forget(proc)
            if self._aborted:
                raise self.interrupted(what)
            out.seek(0)
            err.seek(0)
            done = Completed(rc, out.read().decode("utf-8", "replace"), err.read().decode("utf-8", "replace"))
        return written, done

    def start(self, script: str, args=()) -> subprocess.Popen:
        """Start a script that runs until its stdin is closed (the device lock); pipes for stdin and stdout.
        The caller closes stdin and calls :meth:`finish`."""
        # Unbuffered: the caller waits for lines with select(), which cannot see bytes already in a buffer.
        return self._popen(self._command_argv(script, args), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                           stderr=subprocess.DEVNULL, bufsize=0)

    def finish(self, proc: subprocess.Popen, timeout: float = 15) -> None:
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        finally:
            self._forget(proc)
