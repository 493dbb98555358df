"""A real OpenSSH server on 127.0.0.1 for the flash tests, with everything it needs in one temporary folder.

``SshServer(folder).start()`` generates a host key and a user key with ssh-keygen, writes an sshd_config
(``StrictModes no``, ``UsePAM no``, key login only), a known_hosts holding the server's host key and an
ssh_config for the client with these host aliases:

- ``device1``, ``device2``: the server, logging in as the current user with the authorized key;
- ``badkey``: the server, offering a key that is not authorized (login refused);
- ``strangehost``: the server, with an empty known_hosts (host key verification fails);
- ``nosuchhost``: a name that does not resolve (``.invalid`` is reserved for that).

Host-key checking stays on (``StrictHostKeyChecking yes``): the test client trusts only the key this
fixture generated. ``kill_sessions()`` kills the server side of every open connection, as a dropped link
would.
"""

from __future__ import annotations

import getpass
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"


def sshd_missing_reason() -> str | None:
    """Why the flash tests cannot run here, or None."""
    if not os.access(SSHD, os.X_OK):
        return "OpenSSH server not installed (no sshd): apt-get install openssh-server openssh-client"
    for tool in ("ssh", "ssh-keygen"):
        if not shutil.which(tool):
            return f"OpenSSH client not installed (no {tool}): apt-get install openssh-client"
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _keygen(path: Path) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", path.name, "-f", str(path)],
                   check=True, stdin=subprocess.DEVNULL)


class SshServer:
    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.port = 0
        self.proc: subprocess.Popen | None = None
        self.config = self.folder / "ssh_config"       # pass to ssh -F (Device(ssh_config=...))
        self.log = self.folder / "sshd.log"

    def start(self) -> SshServer:
        f = self.folder
        f.mkdir(parents=True, exist_ok=True)
        for key in ("host_key", "user_key", "other_key"):
            if not (f / key).exists():
                _keygen(f / key)
        shutil.copy(f / "user_key.pub", f / "authorized_keys")
        if os.geteuid() == 0:
            # sshd refuses to start without its privilege-separation folder (normally made by the package's service).
            os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
        for _attempt in range(3):   # another process may grab the free port between probe and bind
            self.port = _free_port()
            self._write_configs()
            if self._launch():
                return self
        raise RuntimeError(f"sshd did not start: {self.log.read_text(errors='replace')[-2000:]}")

    def _write_configs(self) -> None:
        f = self.folder
        (f / "sshd_config").write_text(
            f"Port {self.port}\nListenAddress 127.0.0.1\nHostKey {f / 'host_key'}\nPidFile {f / 'sshd.pid'}\n"
            f"AuthorizedKeysFile {f / 'authorized_keys'}\nStrictModes no\nUsePAM no\nPermitRootLogin yes\n"
            "PubkeyAuthentication yes\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
            "PrintMotd no\nPrintLastLog no\nMaxStartups 50\nMaxSessions 20\n")
        host_pub = (f / "host_key.pub").read_text().split()
        (f / "known_hosts").write_text(f"[127.0.0.1]:{self.port} {host_pub[0]} {host_pub[1]}\n")
        (f / "empty_known_hosts").write_text("")
        user = getpass.getuser()

        def host(aliases: str, *, key: str = "user_key", known: str = "known_hosts", name: str = "127.0.0.1") -> str:
            return (f"Host {aliases}\n  HostName {name}\n  Port {self.port}\n  User {user}\n"
                    f"  UserKnownHostsFile {f / known}\n  GlobalKnownHostsFile /dev/null\n"
                    f"  StrictHostKeyChecking yes\n  IdentityFile {f / key}\n  IdentitiesOnly yes\n"
                    "  BatchMode yes\n  LogLevel ERROR\n")
        self.config.write_text(host("device1 device2") + host("badkey", key="other_key")
                               + host("strangehost", known="empty_known_hosts")
                               + host("nosuchhost", name="nosuchhost.invalid"))

    def _launch(self) -> bool:
        log = open(self.log, "wb")
        self.proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(self.folder / "sshd_config")],
                                     stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        log.close()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return True
            except OSError:
                time.sleep(0.05)
        self.stop()
        return False

    def session_pids(self) -> list[int]:
        """The server-side processes of open connections: the listener's children."""
        if self.proc is None:
            return []
        pids = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            # The command name is in parentheses and may contain spaces: the ppid is the 2nd field after it.
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid == self.proc.pid:
                pids.append(int(entry))
        return pids

    def kill_sessions(self) -> int:
        """SIGKILL the server side of every open connection (as a pulled cable would end it); how many."""
        pids = self.session_pids()
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return len(pids)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.kill_sessions()
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
