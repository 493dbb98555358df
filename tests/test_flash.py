"""``edgekit flash`` against a real OpenSSH server on 127.0.0.1 (tests/sshd.py): this machine is the device.

The device folder is a temp folder here, so the tests look at the device's side directly: where
``current`` points, which files exist, their inodes (hard links) and hashes.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from sshd import SshServer, sshd_missing_reason

from edgekit.errors import DeployFailed, DeviceMismatch, DeviceUnreachable
from edgekit.flash import Device, flash, flash_many, list_releases, parse_device, rollback
from edgekit.flash.probe import DeviceInfo, DeviceState, RemoteRelease, _l4t, check_device
from edgekit.flash.releases import prune_list
from edgekit.runtime.bundle import read_manifest, verify, write_manifest

SKIP = sshd_missing_reason()
needs_sshd = pytest.mark.skipif(SKIP is not None, reason=SKIP or "")


# ----- fixtures and helpers ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    if SKIP:
        pytest.skip(SKIP)
    server = SshServer(tmp_path_factory.mktemp("sshd")).start()
    yield server
    server.stop()


def device(sshd, path: Path, alias: str = "device1") -> Device:
    # The "device" runs this test's python, which has edgekit: what --remote-python is for on a real device.
    return Device(alias, path=str(path), ssh_config=str(sshd.config), python=sys.executable)


def variant(base: Path, dest: Path, edit) -> Path:
    """A copy of a bundle changed by ``edit(folder, manifest_dict)`` and re-hashed with write_manifest."""
    shutil.copytree(base, dest)
    data = read_manifest(dest).to_dict()
    data.pop("files")
    edit(dest, data)
    write_manifest(dest, data)
    return dest


def retokenized(base: Path, dest: Path, tag: str = "1") -> Path:
    """The bundle with one changed file: tokenizer.json gains a trailing newline(s) (still valid JSON)."""
    def edit(folder, data):
        with open(folder / "tokenizer.json", "a", encoding="utf-8") as f:
            f.write("\n" * int(tag))
    return variant(base, dest, edit)


def current_of(root: Path) -> str | None:
    link = root / "current"
    return os.readlink(link).split("/")[-1] if link.is_symlink() else None


def cli(*args: str):
    from edgekit.cli import cli as group

    result = CliRunner().invoke(group, list(args), prog_name="edgekit")
    return result.exit_code, result.stdout, result.stderr


def errors(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith("error:")]


# ----- transfer: only what changed, resume, verification ------------------------------------------------------
@needs_sshd
def test_second_flash_sends_only_the_changed_file(sshd, tiny_bundle, tmp_path):
    root = tmp_path / "device"
    dev = device(sshd, root)
    files = read_manifest(tiny_bundle).files
    events = []
    r1 = flash(tiny_bundle, dev, progress=events.append)
    id1 = read_manifest(tiny_bundle).id
    assert r1.bundle_id == id1 and r1.switched and r1.previous is None
    assert sorted(r1.sent) == sorted(files) and r1.bytes_sent == sum(e["size"] for e in files.values())
    assert current_of(root) == id1 and verify(root / "current").ok
    stages = [e.stage for e in events]
    assert stages.index("probe") < stages.index("send") < stages.index("verify") < stages.index("switch")
    assert max(e.done for e in events if e.stage == "send") == r1.bytes_sent

    changed = retokenized(tiny_bundle, tmp_path / "changed")
    id2 = read_manifest(changed).id
    new_size = (changed / "tokenizer.json").stat().st_size
    r2 = flash(changed, dev)
    assert r2.sent == ("tokenizer.json",) and r2.bytes_sent == new_size
    assert sorted(r2.linked) == sorted(set(files) - {"tokenizer.json"})
    assert current_of(root) == id2 and r2.previous == id1 and verify(root / "current").ok
    # Reused files are hard links to the first release's copies, not new copies.
    assert (root / "releases" / id2 / "model.onnx.data").stat().st_ino == \
        (root / "releases" / id1 / "model.onnx.data").stat().st_ino
    assert (root / "releases" / id2 / "tokenizer.json").read_bytes() == (changed / "tokenizer.json").read_bytes()

    r3 = flash(changed, dev)   # same bundle again: nothing to send, verified again, still current
    assert r3.bytes_sent == 0 and sorted(r3.present) == sorted(files) and current_of(root) == id2
    assert (root / "history").read_text().split() == [id1, id2]


@needs_sshd
def test_connection_killed_mid_transfer_keeps_current_and_resumes(sshd, tiny_bundle, tmp_path):
    root = tmp_path / "device"
    dev = device(sshd, root)
    id1 = flash(tiny_bundle, dev).bundle_id
    big_size = 64 * 1024 * 1024
    big = variant(tiny_bundle, tmp_path / "big",
                  lambda folder, data: (folder / "extra.bin").write_bytes(os.urandom(big_size)))
    id2 = read_manifest(big).id
    killed = []

    def cut_the_cable(event):
        if event.stage == "send" and event.file == "extra.bin" and event.done >= 8 * 1024 * 1024 and not killed:
            killed.append(sshd.kill_sessions())

    with pytest.raises(DeployFailed, match=r"connection lost while sending extra\.bin .*run the same command again "
                                           r"to resume"):
        flash(big, dev, progress=cut_the_cable)
    assert killed and killed[0] >= 1
    assert current_of(root) == id1 and verify(root / "current").ok
    release = root / "releases" / id2
    assert not (release / "manifest.json").exists() and not (release / "extra.bin").exists()
    part = release / "extra.bin.part"
    # The server side may still be flushing what it received: wait until the partial file stops growing.
    size, deadline = -1, time.monotonic() + 10
    while time.monotonic() < deadline and (size != part.stat().st_size or sshd.session_pids()):
        size = part.stat().st_size
        time.sleep(0.2)
    assert 0 < size < big_size

    r = flash(big, dev)
    assert r.sent == ("extra.bin",) and r.bytes_resumed == size and r.bytes_sent == big_size - size
    assert current_of(root) == id2 and verify(root / "current").ok
    assert not list(release.glob("*.part"))


@needs_sshd
def test_file_corrupted_on_the_device_fails_verification_without_switch(sshd, tiny_bundle, tmp_path):
    root = tmp_path / "device"
    dev = device(sshd, root)
    id1 = flash(tiny_bundle, dev).bundle_id
    changed = retokenized(tiny_bundle, tmp_path / "changed")
    id2 = read_manifest(changed).id

    def corrupt(event):
        # Between the transfer and the on-device sha256: flip one byte of the file that was sent, same size.
        if event.stage == "verify":
            part = root / "releases" / id2 / "tokenizer.json.part"
            data = bytearray(part.read_bytes())
            data[10] ^= 0xFF
            part.write_bytes(bytes(data))

    with pytest.raises(DeployFailed) as info:
        flash(changed, dev, progress=corrupt)
    msg = str(info.value)
    assert "verification failed: tokenizer.json has sha256" in msg and "manifest says" in msg
    assert f"nothing was switched (current is still releases/{id1})" in msg and "\n" not in msg
    assert current_of(root) == id1
    assert not (root / "releases" / id2 / "manifest.json").exists()
    assert not (root / "releases" / id2 / "tokenizer.json.part").exists()   # the bad copy is gone

    r = flash(changed, dev)   # the next run sends it again and completes
    assert r.sent == ("tokenizer.json",) and current_of(root) == id2 and verify(root / "current").ok


@needs_sshd
def test_reused_copy_that_rotted_on_the_device_is_sent_again(sshd, tiny_bundle, tmp_path):
    root = tmp_path / "device"
    dev = device(sshd, root)
    id1 = flash(tiny_bundle, dev).bundle_id
    # Bit rot in the current release: the next bundle would hard-link the bad file; it must notice and re-send.
    graph = root / "releases" / id1 / "model.onnx"
    data = bytearray(graph.read_bytes())
    data[-1] ^= 0x01
    graph.write_bytes(bytes(data))
    changed = retokenized(tiny_bundle, tmp_path / "changed")
    r = flash(changed, dev)
    assert sorted(r.sent) == ["model.onnx", "tokenizer.json"]
    assert any("corrupt" in w and "model.onnx" in w for w in r.warnings)
    assert verify(root / "current").ok and current_of(root) == r.bundle_id


# ----- smoke test, engine -----------------------------------------------------------------------------------------
@needs_sshd
def test_smoke_failure_rolls_back(sshd, tiny_bundle, tmp_path):
    root = tmp_path / "device"
    dev = device(sshd, root)
    good = flash(tiny_bundle, dev, smoke=True)
    assert good.smoke and "tokens in a" in good.smoke
    # Hashes are consistent (the manifest was rewritten) and the graph is a well-formed ModelProto (verify
    # reads its references), but it has no graph: onnxruntime cannot load it.
    broken = variant(tiny_bundle, tmp_path / "broken", lambda folder, data: (folder / "model.onnx").write_bytes(
        b"\x32\x19this is not an ONNX graph"))                 # field 6 (doc_string), 25 bytes
    bad_id = read_manifest(broken).id
    code, out, err = cli("flash", str(broken), f"device1:{root}", "-F", str(sshd.config),
                         "--remote-python", sys.executable, "--smoke")
    assert code == 1, (out, err)
    [line] = errors(err)
    assert line.startswith("error: device1: smoke test failed on the device (")
    assert line.endswith(f"rolled back, current -> releases/{good.bundle_id}")
    assert "FAILED" in out
    assert current_of(root) == good.bundle_id and verify(root / "current").ok
    assert (root / "history").read_text().split() == [good.bundle_id]
    states = {r.id: r.state for r in list_releases(dev)}
    assert states == {good.bundle_id: "current", bad_id: "ready"}


@needs_sshd
def test_build_engine_failure_is_reported_with_its_log(sshd, tiny_bundle, tmp_path):
    root = tmp_path / "device"
    dev = device(sshd, root)
    # A CPU bundle on a machine without a GPU: `edgekit engine` must fail; flash reports it and does not switch.
    with pytest.raises(DeployFailed, match=r"edgekit engine failed on the device .*nothing was switched "
                                           r"\(current is still unset\)") as info:
        flash(tiny_bundle, dev, build_engine=True)
    assert info.value.log.strip()
    assert current_of(root) is None


# ----- refusals: one line each, exit status 1 (device) or 2 (input) ------------------------------------------
def _refused(sshd, *args):
    code, out, err = cli("flash", *args, "-F", str(sshd.config))
    assert code == 1, (out, err)
    lines = errors(err)
    assert len(lines) == 1, err
    return lines[0]


@needs_sshd
def test_wrong_target_is_refused_before_copying(sshd, tiny_bundle, tmp_path):
    orin = variant(tiny_bundle, tmp_path / "orin", _as_orin)
    root = tmp_path / "device"
    line = _refused(sshd, str(orin), f"device1:{root}")
    assert "is for orin-nano-8gb (a Jetson, JetPack 6) but the device is an x86_64 machine without Jetson Linux" \
        in line and "--target" in line
    assert not (root / "releases").exists()
    with pytest.raises(DeviceMismatch, match="without Jetson Linux"):
        flash(orin, device(sshd, root))


def _as_orin(folder, data):
    data["target"] = {"name": "orin-nano-8gb", "kind": "jetson", "compute_capability": "8.7"}
    data["backend"] = "tensorrt"


@needs_sshd
def test_not_enough_disk_is_refused_before_copying(sshd, tiny_bundle, tmp_path):
    small = tmp_path / "small"
    small.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(small)],
                             capture_output=True, text=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a small tmpfs here ({mounted.stderr.strip()}); needs root")
    try:
        line = _refused(sshd, str(tiny_bundle), f"device1:{small}/edgekit")
        assert "not enough disk space at" in line and "256.0 KiB free" in line and "--path" in line
        assert not (small / "edgekit").exists()
    finally:
        subprocess.run(["umount", str(small)], check=True)


@needs_sshd
@pytest.mark.parametrize("alias, expected", [
    ("nosuchhost", "nosuchhost: unknown host (ssh cannot resolve the name)"),
    ("badkey", "badkey: the device refused the login (key not accepted)"),
    ("strangehost", "strangehost: its host key is not in known_hosts and edgekit never accepts unknown keys"),
])
def test_unreachable_devices_give_one_line(sshd, tiny_bundle, tmp_path, alias, expected):
    line = _refused(sshd, str(tiny_bundle), f"{alias}:{tmp_path}/device")
    assert line.startswith(f"error: {expected}")
    with pytest.raises(DeviceUnreachable):
        flash(tiny_bundle, device(sshd, tmp_path / "device", alias))


@needs_sshd
def test_bad_input_exits_2(sshd, tiny_bundle, tmp_path):
    code, _, err = cli("flash", str(tmp_path / "missing"), "device1", "-F", str(sshd.config))
    assert code == 2 and "does not exist" in err
    code, _, err = cli("flash", str(tiny_bundle), "-F", str(sshd.config))
    assert code == 2 and "no device given" in err
    code, _, err = cli("flash", str(tiny_bundle), "-device", "-F", str(sshd.config))
    assert code == 2


# ----- rollback, listing, keep, dry run, several devices ----------------------------------------------------
@needs_sshd
def test_keep_rollback_and_releases(sshd, tiny_bundle, tmp_path):
    root = tmp_path / "device"
    dev = device(sshd, root)
    ids = []
    for n in (1, 2, 3, 4):
        r = flash(retokenized(tiny_bundle, tmp_path / f"v{n}", str(n)), dev, keep=2)
        ids.append(r.bundle_id)
    on_disk = sorted(p.name for p in (root / "releases").iterdir())
    assert on_disk == sorted(ids[2:]) and r.pruned == (ids[1],)
    r = flash(retokenized(tiny_bundle, tmp_path / "v5", "5"), dev, keep=1)   # keep=1 still keeps the previous one
    ids.append(r.bundle_id)
    assert sorted(p.name for p in (root / "releases").iterdir()) == sorted(ids[3:])

    base = ["-F", str(sshd.config)]
    code, out, err = cli("releases", f"device1:{root}", *base)
    assert code == 0, err
    rows = [ln.split() for ln in out.splitlines()[2:]]
    assert [(row[0], row[1]) for row in rows] == [("current", ids[4]), ("previous", ids[3])]
    m = read_manifest(tiny_bundle)
    assert rows[0][3] == m.target["name"] and rows[0][4] == m.backend and rows[0][5] == m.precision

    code, out, err = cli("flash", "--rollback", f"device1:{root}", *base)
    assert code == 0, err
    assert f"current -> releases/{ids[3]} (was releases/{ids[4]})" in out
    assert current_of(root) == ids[3] and verify(root / "current").ok

    code, out, err = cli("flash", "--rollback", f"device1:{root}", *base)   # the one before was pruned
    assert code == 1 and errors(err)[0].startswith("error: device1: no earlier release to roll back to")
    assert current_of(root) == ids[3]
    with pytest.raises(DeployFailed, match="no earlier release to roll back to"):
        rollback(dev)


@needs_sshd
def test_dry_run_changes_nothing(sshd, tiny_bundle, tmp_path):
    root = tmp_path / "device"
    r = flash(tiny_bundle, device(sshd, root), dry_run=True)
    assert r.dry_run and not r.switched and r.bytes_sent == 0 and len(r.sent) == r.files
    assert r.info.arch == os.uname().machine and r.info.path == str(root) and r.info.edgekit
    assert not root.exists()


@needs_sshd
def test_two_devices_in_parallel_one_failing(sshd, tiny_bundle, tmp_path):
    hosts = tmp_path / "hosts"
    hosts.write_text(f"# fleet\ndevice2:{tmp_path}/d2\nbadkey:{tmp_path}/d3   # no key\n")
    code, out, err = cli("flash", str(tiny_bundle), f"device1:{tmp_path}/d1", "--hosts-file", str(hosts),
                         "-F", str(sshd.config))
    assert code == 1, (out, err)
    table = {ln.split()[0]: ln.split()[1] for ln in out.splitlines()[1:]}
    assert table == {"device1": "ok", "device2": "ok", "badkey": "FAILED"}
    assert [ln.split(":")[1].strip() for ln in errors(err)] == ["badkey"]
    bid = read_manifest(tiny_bundle).id
    assert current_of(tmp_path / "d1") == bid and current_of(tmp_path / "d2") == bid
    assert not (tmp_path / "d3").exists()
    assert "device1: sending" in err and "device2: verifying" in err

    outcomes = flash_many(tiny_bundle, [device(sshd, tmp_path / "d1"), device(sshd, tmp_path / "d4", "badkey")])
    assert [o.ok for o in outcomes] == [True, False] and outcomes[0].result.bytes_sent == 0
    assert isinstance(outcomes[1].error, DeviceUnreachable)


# ----- pure logic (no ssh) --------------------------------------------------------------------------------------
def _info(**kw) -> DeviceInfo:
    base = dict(path="/opt/edgekit", arch="aarch64", os="Ubuntu 22.04", kernel="5.15", l4t="36.4.0", jetpack=6,
                writable=True, sha256sum=True, python_path="/usr/bin/python3", python="3.10.12", edgekit="0.1.0")
    base.update(kw)
    return DeviceInfo(**base)


def test_target_checks_against_probed_devices(tiny_bundle, tmp_path):
    orin = read_manifest(variant(tiny_bundle, tmp_path / "orin", _as_orin))
    cpu = read_manifest(tiny_bundle)
    assert check_device(orin, _info())[0] == []
    [jp5] = check_device(orin, _info(l4t="35.4.1", jetpack=5))[0]
    assert "on JetPack 6 but the device runs JetPack 5 (L4T 35.4.1)" in jp5
    assert check_device(orin, _info(arch="x86_64", l4t=None, jetpack=None))[0]
    assert check_device(cpu, _info())[0] == [] and check_device(cpu, _info(arch="x86_64", l4t=None))[0] == []
    [smoke] = check_device(cpu, _info(edgekit=None), needs_edgekit="--smoke")[0]
    assert "--smoke runs edgekit on the device, but /usr/bin/python3 cannot import it" in smoke

    def rtx(folder, data):
        data["target"] = {"name": "rtx-4090", "kind": "desktop-gpu", "compute_capability": "8.9"}
        data["backend"] = "tensorrt"
    gpu = read_manifest(variant(tiny_bundle, tmp_path / "rtx", rtx))
    desk = dict(arch="x86_64", l4t=None, jetpack=None)
    assert check_device(gpu, _info(**desk, gpu="NVIDIA GeForce RTX 4090", gpu_sm="8.9"))[0] == []
    assert "SM 8.6" in check_device(gpu, _info(**desk, gpu="NVIDIA GeForce RTX 3060", gpu_sm="8.6"))[0][0]
    assert "no NVIDIA GPU" in check_device(gpu, _info(**desk))[0][0]
    assert "is a Jetson" in check_device(gpu, _info())[0][0]


def test_parsers():
    assert _l4t("# R36 (release), REVISION: 4.0, GCID: 37537400, BOARD: generic, EABI: aarch64") == ("36.4.0", 6)
    assert _l4t("# R35 (release), REVISION: 4.1, GCID: 33958178, BOARD: t186ref") == ("35.4.1", 5)
    d = parse_device("robot@jetson.local:/opt/edgekit", port=2222)
    assert (d.destination, d.path, d.port) == ("robot@jetson.local", "/opt/edgekit", 2222)
    assert parse_device("jetson").path == "~/edgekit"
    assert (parse_device("me@[fe80::1]:models").destination, parse_device("me@[fe80::1]:models").path) == \
        ("me@fe80::1", "models")
    assert parse_device("fe80::1").destination == "fe80::1"
    with pytest.raises(Exception, match="invalid device"):
        parse_device("-oProxyCommand=evil")


def test_prune_never_drops_current_or_previous():
    rel = {i: RemoteRelease(i, True, {"created": f"2026-01-0{n}T00:00:00Z", "files": {}})
           for n, i in enumerate(["a" * 12, "b" * 12, "c" * 12, "d" * 12], 1)}
    rel["e" * 12] = RemoteRelease("e" * 12, False, None)
    state = DeviceState(current="c" * 12, current_foreign=None, current_not_link=False,
                        history=("a" * 12, "b" * 12, "c" * 12), releases=rel)
    history = ["a" * 12, "b" * 12, "c" * 12, "d" * 12]
    assert prune_list(state, history, 1, flashed="d" * 12) == ["b" * 12, "a" * 12, "e" * 12]
    assert prune_list(state, history, 3, flashed="d" * 12) == ["a" * 12, "e" * 12]
