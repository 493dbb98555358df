"""``edgekit flash`` hardening against a real OpenSSH server on 127.0.0.1 (tests/sshd.py), issue 13: a bundle
edited after it was built, a full disk at the switch, two flashes at once, a stale lock, SIGTERM/SIGHUP."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import test_flash
from test_flash import _as_orin, cli, current_of, device, errors, needs_sshd, retokenized, variant

from edgekit.errors import DeployFailed, DeviceMismatch
from edgekit.flash import flash, rollback
from edgekit.runtime.bundle import read_manifest, verify

sshd = test_flash.sshd   # the module-scoped loopback sshd fixture, shared


@needs_sshd
def test_a_bundle_edited_after_it_was_built_is_named_as_the_culprit(sshd, tiny_bundle, tmp_path, monkeypatch):
    import edgekit.runtime.bundle.verification as verification

    # Weights above this size are only size-checked before a flash (hashing GBs up front takes minutes): make
    # the tiny bundle's weights count as such, as a real bundle's are.
    monkeypatch.setattr(verification, "QUICK_HASH_LIMIT", 1024)
    edited = tmp_path / "edited"
    shutil.copytree(tiny_bundle, edited)
    data = edited / "model.onnx.data"
    with open(data, "r+b") as f:          # same size, one byte changed: the manifest no longer matches
        f.seek(64)
        b = f.read(1)
        f.seek(64)
        f.write(bytes([b[0] ^ 0x55]))
    root = tmp_path / "device"
    code, out, err = cli("flash", str(edited), f"device1:{root}", "-F", str(sshd.config))
    assert code == 1, (out, err)
    [line] = errors(err)
    assert line.startswith(f"error: device1: the local file {data} has sha256 ") and "manifest says" in line
    assert "the bundle was changed after it was built" in line and "rebuild the bundle" in line
    assert "run the same command again" not in line
    assert current_of(root) is None
    release = root / "releases" / read_manifest(edited).id
    assert not (release / "model.onnx.data.part").exists() and not (release / "manifest.json").exists()


def _small_disk(folder: Path, size: str):
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                             capture_output=True, text=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a small tmpfs here ({mounted.stderr.strip()}); needs root")


def _fill(folder: Path) -> Path:
    """Use up every free byte of the filesystem holding ``folder``; the filler file, to delete afterwards."""
    filler = folder / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        while os.write(fd, b"\0" * 4096):
            pass
    except OSError:   # ENOSPC: full
        pass
    finally:
        os.close(fd)
    return filler


def _leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith("."))


@needs_sshd
def test_a_full_disk_at_the_switch_leaves_current_and_history_as_reported(sshd, tiny_bundle, tmp_path):
    small = tmp_path / "small"
    total = sum(e["size"] for e in read_manifest(tiny_bundle).files.values())
    _small_disk(small, f"{(3 * total) // 1024 + 34 * 1024}k")   # flash keeps 32 MiB spare (SPACE_MARGIN)
    try:
        root = small / "edgekit"
        dev = device(sshd, root)
        id1 = flash(tiny_bundle, dev).bundle_id
        id2 = flash(retokenized(tiny_bundle, tmp_path / "v2"), dev).bundle_id
        history = (root / "history").read_text()
        assert history.split() == [id1, id2]

        filler = _fill(small)
        code, out, err = cli("flash", "--rollback", f"device1:{root}", "-F", str(sshd.config))
        assert code == 1, (out, err)
        [line] = errors(err)
        assert f"cannot switch {root}/current to releases/{id1}" in line
        assert f"current was not changed (still releases/{id2})" in line, line
        assert current_of(root) == id2 and (root / "history").read_text() == history
        assert _leftovers(root) == []

        # The same during a flash: the disk fills up after the transfer, before the switch.
        v3 = retokenized(tiny_bundle, tmp_path / "v3", "3")
        filler.unlink()
        filled = []

        def fill_at_switch(event):
            if event.stage == "switch" and not filled:
                filled.append(_fill(small))

        with pytest.raises(DeployFailed, match=rf"current was not changed \(still releases/{id2}\)"):
            flash(v3, dev, progress=fill_at_switch)
        assert current_of(root) == id2 and (root / "history").read_text() == history
        assert _leftovers(root) == []

        filled[0].unlink()                  # with space again both work, and history follows current
        assert rollback(dev).to_release == id1 and current_of(root) == id1
        assert (root / "history").read_text().split() == [id1]
        r = flash(v3, dev)
        assert current_of(root) == r.bundle_id and (root / "history").read_text().split() == [id1, r.bundle_id]
    finally:
        subprocess.run(["umount", str(small)], check=True)


def _holder_text(pid: int, since: str = "2026-01-01T00:00:00Z") -> str:
    return f"someone@otherhost pid {pid} since {since}"


@needs_sshd
def test_a_second_flash_to_the_same_folder_stops_at_once_naming_the_first(sshd, tiny_bundle, tmp_path):
    import socket

    root = tmp_path / "device"
    other = retokenized(tiny_bundle, tmp_path / "other")
    second = []

    def flash_again_meanwhile(event):
        if event.stage == "send" and event.message == "start" and not second:
            started = time.monotonic()
            second.append(cli("flash", str(other), f"device1:{root}", "-F", str(sshd.config)))
            second.append(time.monotonic() - started)

    first = flash(tiny_bundle, device(sshd, root), progress=flash_again_meanwhile)
    (code, out, err), seconds = second
    assert code == 1, (out, err)
    [line] = errors(err)
    assert line.startswith(f"error: device1: {root} is locked by another flash or rollback (")
    assert f"@{socket.gethostname()} pid {os.getpid()} since 20" in line and "wait for it to finish" in line
    assert "FAILED" in out
    # the first one was not disturbed, and released the lock when it finished
    assert current_of(root) == first.bundle_id and (root / "history").read_text().split() == [first.bundle_id]
    assert not (root / "releases" / read_manifest(other).id).exists()
    assert not os.path.lexists(root / ".lock")
    assert flash(other, device(sshd, root)).switched

    # released on a failure too (refused before copying)
    orin = variant(tiny_bundle, tmp_path / "orin", _as_orin)
    with pytest.raises(DeviceMismatch):
        flash(orin, device(sshd, root))
    assert not os.path.lexists(root / ".lock")
    assert rollback(device(sshd, root)).to_release == first.bundle_id   # rollback takes it too, and releases it
    assert not os.path.lexists(root / ".lock")


def _start_time(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]


@needs_sshd
def test_a_lock_whose_holder_is_gone_is_taken_over_and_a_live_one_is_not(sshd, tiny_bundle, tmp_path):
    root = tmp_path / "device"
    root.mkdir()
    # A live process on the device holds it: refused, naming the holder.
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        os.symlink(f"{sleeper.pid} {_start_time(sleeper.pid)} {_holder_text(sleeper.pid)}", root / ".lock")
        with pytest.raises(DeployFailed, match=rf"is locked by another flash or rollback "
                                               rf"\({_holder_text(sleeper.pid)}\)"):
            flash(tiny_bundle, device(sshd, root))
        assert os.readlink(root / ".lock").startswith(f"{sleeper.pid} ") and not (root / "releases").exists()
    finally:
        sleeper.kill()
        sleeper.wait()
    # Its holder is gone (killed, device rebooted): taken over with a warning. The same pid with another start
    # time is a reused pid, not the holder.
    os.unlink(root / ".lock")
    for pid, start in ((sleeper.pid, "1"), (os.getpid(), "1")):
        os.symlink(f"{pid} {start} {_holder_text(pid)}", root / ".lock")
        r = flash(tiny_bundle, device(sshd, root))
        assert r.switched and any(f"took over the lock of a flash that is gone ({_holder_text(pid)})" in w
                                  for w in r.warnings), r.warnings
        assert not os.path.lexists(root / ".lock")


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if text.encode() in Path(f"/proc/{entry}/cmdline").read_bytes():
                    found.append(int(entry))
            except OSError:
                pass
    return found


@needs_sshd
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGHUP"])
def test_sigterm_or_sighup_during_flash_leaves_no_ssh_process_socket_or_lock(sshd, tiny_bundle, tmp_path, sig):
    import signal

    big = variant(tiny_bundle, tmp_path / "big",
                  lambda folder, data: (folder / "extra.bin").write_bytes(os.urandom(128 * 1024 * 1024)))
    root = tmp_path / "device"
    tmp = tmp_path / "tmp"           # where the flash makes its ssh socket folder
    tmp.mkdir()
    log = tmp_path / "flash.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "edgekit", "flash", str(big), f"device1:{root}",
                                 "-F", str(sshd.config)], stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "TMPDIR": str(tmp)})
    try:
        deadline = time.monotonic() + 60
        while "sending extra.bin" not in log.read_text() and time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()
            time.sleep(0.05)
        assert os.path.lexists(root / ".lock") and list(tmp.iterdir())   # mid-flight: locked, socket folder
        proc.send_signal(getattr(signal, sig))
        code = proc.wait(timeout=30)
        text = log.read_text()
        assert code == 128 + getattr(signal, sig), text
        assert f"error: flash stopped by {sig}: the ssh connections were closed" in text.splitlines()[-1]
        assert list(tmp.iterdir()) == [] and _processes_mentioning(str(tmp)) == []
        deadline = time.monotonic() + 15  # the device side ends when sshd sees the connection closed
        while os.path.lexists(root / ".lock") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not os.path.lexists(root / ".lock")
        # Normally the signal lands mid-transfer and nothing was switched. On a fast machine the last steps can
        # finish between the log line and the signal: then `current` is the new release, complete and verified
        # (the switch is one atomic rename), never a partial one.
        current = current_of(root)
        if current is not None:
            assert verify(root / "releases" / current).ok, text
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in _processes_mentioning(str(tmp)):   # only what this test started (its TMPDIR is in them)
            os.kill(pid, 9)
    r = flash(big, device(sshd, root))        # and the next flash continues where it stopped
    assert r.switched and current_of(root) == r.bundle_id and verify(root / "current").ok
