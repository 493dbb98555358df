"""Probing a device in one round trip, and deciding before anything is copied whether the bundle belongs there.

The probe is a POSIX sh script (uname, /etc/os-release, /etc/nv_tegra_release, dpkg-query, nvidia-smi,
/proc/meminfo, df, and the remote python only to print its version and edgekit's). It prints ``key=value``
lines, then the manifests of the releases already on the device (what the transfer plan reuses) and the
files of a half-copied release (what it resumes). Everything it prints comes from the device and is
parsed defensively: unknown lines are ignored and release names must look like bundle ids.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from ..errors import DeployFailed
from ..units import fmt_bytes
from .ssh import Session

# An id made by edgekit.runtime.bundle.bundle_id: anything else in DIR/releases is not ours and is left alone.
RELEASE_ID = re.compile(r"^[0-9a-f]{12}$")
# Disk the device must keep free beyond the bundle: logs, the OS and a TensorRT engine build need room too.
SPACE_MARGIN = 32 * 1024 * 1024
# JetPack major release of each L4T major (NVIDIA's JetPack archive): engines are tied to it via TensorRT.
JETPACK_OF_L4T = {32: 4, 34: 5, 35: 5, 36: 6, 38: 7}

# The device folder as given (``~/x``, ``x`` or ``/abs``) made absolute on the device.
HOME_PATH = r"""
home_path() {
  case $1 in
    "~") printf '%s\n' "$HOME" ;;
    "~/"*) printf '%s/%s\n' "$HOME" "${1#??}" ;;
    /*) printf '%s\n' "$1" ;;
    *) printf '%s/%s\n' "$HOME" "$1" ;;
  esac
}
"""

PROBE_SCRIPT = HOME_PATH + r"""
dir=$(home_path "$1"); id=$2
case $3 in */*) py=$(home_path "$3") ;; *) py=$(command -v "$3" 2>/dev/null) ;; esac
echo "probe=1"
echo "dir=$dir"
echo "arch=$(uname -m)"
echo "kernel=$(uname -r)"
if [ -r /etc/os-release ]; then (. /etc/os-release && echo "os=${PRETTY_NAME:-$NAME}"); else echo "os=$(uname -s)"; fi
[ -r /etc/nv_tegra_release ] && echo "l4t=$(head -n 1 /etc/nv_tegra_release)"
[ -r /proc/device-tree/model ] && echo "model=$(tr -d '\000' < /proc/device-tree/model)"
trt=$(dpkg-query -W -f='${Version}\n' tensorrt libnvinfer10 libnvinfer8 2>/dev/null | grep -v '^$' | head -n 1)
[ -n "$trt" ] && echo "tensorrt=$trt"
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,compute_cap --format=csv,noheader 2>/dev/null | head -n 1 | sed 's/^/gpu=/'
fi
awk '/^MemTotal:/ {print "mem_total_kb=" $2} /^MemAvailable:/ {print "mem_available_kb=" $2}' /proc/meminfo 2>/dev/null
d=$dir
while [ ! -d "$d" ]; do d=$(dirname "$d"); done
df -Pk "$d" 2>/dev/null | awk 'NR == 2 {print "disk_free_kb=" $4; print "disk_mount=" $6}'
[ -w "$d" ] && echo "writable=1"
command -v sha256sum >/dev/null 2>&1 && echo "sha256sum=1"
if [ -n "$py" ] && [ -x "$py" ]; then
  echo "python_path=$py"
  # From / so that nothing in the login folder (such as ~/edgekit, the default DIR) shadows a module.
  (cd / && "$py" -c 'import sys; print("python=%d.%d.%d" % sys.version_info[:3])') 2>/dev/null
  (cd / && "$py" -c 'import edgekit; print("edgekit=" + edgekit.__version__)') 2>/dev/null
fi
if [ -L "$dir/current" ]; then echo "current=$(readlink "$dir/current")"
elif [ -e "$dir/current" ]; then echo "current_not_link=1"; fi
[ -f "$dir/history" ] && sed 's/^/history=/' "$dir/history"
if [ -d "$dir/releases" ]; then
  for r in "$dir"/releases/*; do
    [ -d "$r" ] && [ ! -L "$r" ] || continue
    if [ -f "$r/manifest.json" ]; then
      echo "@@manifest ${r##*/}"; cat "$r/manifest.json"; echo; echo "@@end"
    else
      echo "incomplete=${r##*/}"
    fi
  done
  if [ -n "$id" ] && [ -d "$dir/releases/$id" ]; then
    (cd "$dir/releases/$id" && find . -type f -exec stat -c 'file=%s %n' {} +)
  fi
fi
echo "probe_end=1"
"""


@dataclass(frozen=True)
class DeviceInfo:
    """What the probe found. Sizes are bytes; fields the device did not report are None."""

    path: str                          # absolute DIR on the device
    arch: str
    os: str
    kernel: str
    l4t: str | None = None             # e.g. "36.4.0" (Jetson Linux), None off Jetson
    jetpack: int | None = None         # JetPack major derived from the L4T major
    model: str | None = None           # /proc/device-tree/model, e.g. "NVIDIA Jetson Orin Nano Developer Kit"
    tensorrt: str | None = None        # package version, e.g. "10.3.0.30-1+cuda12.5"
    gpu: str | None = None             # nvidia-smi name (desktop GPUs)
    gpu_sm: str | None = None          # nvidia-smi compute capability, e.g. "8.9"
    mem_total: int | None = None
    mem_available: int | None = None
    disk_free: int | None = None       # at DIR (or its nearest existing parent)
    disk_mount: str | None = None
    writable: bool = False
    sha256sum: bool = False
    python_path: str | None = None
    python: str | None = None          # e.g. "3.10.12"
    edgekit: str | None = None         # version importable by that python, None if not installed

    def summary(self) -> str:
        parts = [self.arch, self.os]
        if self.l4t:
            parts.append(f"JetPack {self.jetpack or '?'} (L4T {self.l4t})")
        if self.tensorrt:
            parts.append(f"TensorRT {self.tensorrt.split('-')[0]}")
        if self.gpu:
            parts.append(f"{self.gpu} (SM {self.gpu_sm})" if self.gpu_sm else self.gpu)
        if self.mem_available is not None:
            parts.append(f"{fmt_bytes(self.mem_available)} memory free")
        if self.disk_free is not None:
            parts.append(f"{fmt_bytes(self.disk_free)} disk free")
        parts.append(f"python {self.python}" if self.python else "no python")
        parts.append(f"edgekit {self.edgekit}" if self.edgekit else "no edgekit")
        return ", ".join(parts)


@dataclass(frozen=True)
class RemoteRelease:
    id: str
    complete: bool                       # manifest.json present: verified and finished
    manifest: dict[str, Any] | None      # parsed manifest.json, None if incomplete or unreadable

    @property
    def files(self) -> dict[str, dict[str, Any]]:
        files = (self.manifest or {}).get("files")
        return files if isinstance(files, dict) else {}

    @property
    def size(self) -> int:
        return sum(e.get("size", 0) for e in self.files.values() if isinstance(e, dict)
                   and isinstance(e.get("size"), int))


@dataclass(frozen=True)
class DeviceState:
    """The releases on the device: what ``current`` points to, the activation history, what is half-copied."""

    current: str | None                     # release id DIR/current points to
    current_foreign: str | None             # where current points when that is not DIR/releases/<id>
    current_not_link: bool                  # DIR/current exists and is not a symlink (not ours: never replaced)
    history: tuple[str, ...]                # activation order, oldest first (DIR/history)
    releases: dict[str, RemoteRelease]
    target_files: dict[str, int] = field(default_factory=dict)   # files in DIR/releases/<flashed id>: size


def _l4t(line: str) -> tuple[str | None, int | None]:
    """("36.4.0", 6) from '# R36 (release), REVISION: 4.0, GCID: ...'."""
    m = re.search(r"R(\d+)\s*\(release\),\s*REVISION:\s*([0-9.]+)", line)
    if not m:
        return None, None
    major = int(m.group(1))
    rev = m.group(2)
    return f"{major}.{rev}" if rev.count(".") >= 1 else f"{major}.{rev}.0", JETPACK_OF_L4T.get(major)


def _kb(value: str | None) -> int | None:
    return int(value) * 1024 if value and value.isdigit() else None


def _release_of(link: str) -> str | None:
    """The release id a ``current`` link target names (``releases/<id>``, absolute or relative)."""
    parts = link.rstrip("/").split("/")
    if len(parts) >= 2 and parts[-2] == "releases" and RELEASE_ID.match(parts[-1]):
        return parts[-1]
    return None


def parse_probe(text: str, device: str) -> tuple[DeviceInfo, DeviceState]:
    """DeviceInfo and DeviceState from the probe's output. DeployFailed if it did not run to the end."""
    keys, history, releases, target_files = _read_probe(text)
    if keys.get("probe") != "1" or keys.get("probe_end") != "1" or "dir" not in keys:
        raise DeployFailed(f"{device}: the device probe did not complete (is its login shell able to run sh, with "
                           "coreutils installed?): run `ssh <device> uname -a` to check", device=device)
    link = keys.get("current")
    current = _release_of(link) if link else None
    state = DeviceState(current=current, current_foreign=link if link and not current else None,
                        current_not_link="current_not_link" in keys,
                        history=tuple(history), releases=releases, target_files=target_files)
    return _device_info(keys), state


def _read_probe(text: str) -> tuple[dict[str, str], list[str], dict[str, RemoteRelease], dict[str, int]]:
    """The probe's lines sorted out: (KEY=VALUE pairs, history, releases, the target folder's file sizes)."""
    keys: dict[str, str] = {}
    history: list[str] = []
    releases: dict[str, RemoteRelease] = {}
    target_files: dict[str, int] = {}
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        i += 1
        if line.startswith("@@manifest "):
            rid = line[len("@@manifest "):].strip()
            body = []
            while i < len(lines) and lines[i] != "@@end":
                body.append(lines[i])
                i += 1
            i += 1
            if RELEASE_ID.match(rid):
                releases[rid] = RemoteRelease(rid, True, _json_object("\n".join(body)))
            continue
        key, sep, value = line.partition("=")
        if not sep:
            continue
        if key == "history":
            if RELEASE_ID.match(value.strip()):
                history.append(value.strip())
        elif key == "incomplete":
            if RELEASE_ID.match(value):
                releases[value] = RemoteRelease(value, False, None)
        elif key == "file":
            size, _, name = value.partition(" ")
            if size.isdigit() and name.startswith("./"):
                target_files[name[2:]] = int(size)
        else:
            keys[key] = value
    return keys, history, releases, target_files


def _json_object(text: str) -> dict | None:
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    return data if isinstance(data, dict) else None


def _device_info(keys: dict[str, str]) -> DeviceInfo:
    l4t, jetpack = _l4t(keys["l4t"]) if "l4t" in keys else (None, None)
    gpu, gpu_sm = None, None
    if keys.get("gpu"):
        name, _, sm = keys["gpu"].rpartition(",")
        gpu, gpu_sm = (name.strip(), sm.strip()) if name else (keys["gpu"].strip(), None)
    return DeviceInfo(
        path=keys["dir"], arch=keys.get("arch", "unknown"), os=keys.get("os", "unknown"),
        kernel=keys.get("kernel", ""), l4t=l4t, jetpack=jetpack, model=keys.get("model") or None,
        tensorrt=keys.get("tensorrt") or None, gpu=gpu, gpu_sm=gpu_sm,
        mem_total=_kb(keys.get("mem_total_kb")), mem_available=_kb(keys.get("mem_available_kb")),
        disk_free=_kb(keys.get("disk_free_kb")), disk_mount=keys.get("disk_mount"),
        writable=keys.get("writable") == "1", sha256sum=keys.get("sha256sum") == "1",
        python_path=keys.get("python_path"), python=keys.get("python"), edgekit=keys.get("edgekit"))


def run_probe(session: Session, release_id: str = "") -> tuple[DeviceInfo, DeviceState]:
    """Run PROBE_SCRIPT on the session's device (``release_id``: the release about to be flashed, if any)."""
    d = session.device
    done = session.run(PROBE_SCRIPT, [d.path, release_id, d.python], what="probing the device")
    return parse_probe(done.stdout, d.name)


# ----- does the bundle belong on this device? ---------------------------------------------------------------
def _major(version: str | None) -> int | None:
    m = re.match(r"\s*(\d+)", version or "")
    return int(m.group(1)) if m else None


def _target_software(name: str) -> dict[str, str] | None:
    """The packaged target's software versions (jetpack, tensorrt, ...), None for a target this edgekit lacks."""
    from ..build.target import load_target
    from ..errors import EdgekitError

    try:
        return dict(load_target(name).software)
    except EdgekitError:
        return None


def check_device(manifest, info: DeviceInfo, *, needs_edgekit: str | None = None) -> tuple[list[str], list[str]]:
    """(problems, warnings) for flashing ``manifest`` (a runtime.bundle.Manifest) to the probed device.

    A problem refuses the flash before anything is copied: another architecture, a Jetson bundle off
    Jetson or on another JetPack, a GPU bundle without that GPU, no sha256sum, a folder that cannot be
    written, or (with ``needs_edgekit`` naming the option) no edgekit on the device.
    """
    problems: list[str] = []
    warnings: list[str] = []
    software = _target_software(str(manifest.target.get("name"))) or {}
    _check_target(manifest, info, software, problems, warnings)
    _check_software(manifest, info, software, problems, warnings)
    _check_tools(info, needs_edgekit, problems)
    return problems, warnings


def _check_target(manifest, info: DeviceInfo, software: dict[str, str], problems: list[str],
                  warnings: list[str]) -> None:
    """The device is the kind of machine the bundle's target is: Jetson and JetPack, desktop GPU and its SM."""
    target = manifest.target
    tname, kind, sm = target.get("name"), target.get("kind"), target.get("compute_capability")
    backend = manifest.backend
    what = f"bundle {manifest.id} is for {tname}"
    if kind == "jetson":
        want_jp = _major(software.get("jetpack"))
        if info.l4t is None or info.arch not in ("aarch64", "arm64"):
            problems.append(f"{what} (a Jetson{f', JetPack {want_jp}' if want_jp else ''}) but the device is an "
                            f"{info.arch} machine without Jetson Linux (no /etc/nv_tegra_release): flash a bundle "
                            "built for this device's target (e.g. edgekit build --target cpu)")
        elif want_jp and info.jetpack and want_jp != info.jetpack and backend != "onnxruntime-cpu":
            problems.append(f"{what} on JetPack {want_jp} but the device runs JetPack {info.jetpack} (L4T {info.l4t}): "
                            f"TensorRT and CUDA differ between them; rebuild for a JetPack {info.jetpack} target or "
                            f"upgrade the device to JetPack {want_jp}")
        elif want_jp and info.jetpack is None:
            warnings.append(f"cannot tell the device's JetPack from L4T {info.l4t}; the bundle expects "
                            f"JetPack {want_jp}")
    elif kind == "desktop-gpu":
        if info.l4t is not None:
            problems.append(f"{what} (a desktop GPU, SM {sm}) but the device is a Jetson "
                            f"({info.model or 'L4T ' + info.l4t}): rebuild with the Jetson's --target")
        elif info.gpu is None:
            problems.append(f"{what} (an NVIDIA GPU, SM {sm}) but the device has no NVIDIA GPU (nvidia-smi is missing "
                            "or lists none): install the NVIDIA driver, or rebuild with --target cpu")
        elif backend == "tensorrt" and info.gpu_sm and sm is not None and str(sm) != info.gpu_sm:
            problems.append(f"{what} (SM {sm}) but the device's GPU is {info.gpu} (SM {info.gpu_sm}): TensorRT runs "
                            "only on the GPU architecture it was built for; rebuild with that GPU's --target")
    elif kind != "cpu":
        warnings.append(f"unknown target kind {kind!r} in the bundle: not checked against the device")


def _check_software(manifest, info: DeviceInfo, software: dict[str, str], problems: list[str],
                    warnings: list[str]) -> None:
    """TensorRT's version for a bundle with an engine, and the memory the bundle plans."""
    kind = manifest.target.get("kind")
    what = f"bundle {manifest.id} is for {manifest.target.get('name')}"
    want_trt = software.get("tensorrt")
    if manifest.engine is not None and want_trt and info.tensorrt:
        have = ".".join(info.tensorrt.split("-")[0].split(".")[:2])
        if have != want_trt:
            problems.append(f"{what} with an engine for TensorRT {want_trt} but the device has TensorRT {have}: "
                            "engines only load in the TensorRT version that built them; flash with --build-engine "
                            "to build it on the device")
    elif manifest.backend == "tensorrt" and info.tensorrt is None and kind in ("jetson", "desktop-gpu") \
            and not problems:
        warnings.append("TensorRT was not found on the device (dpkg); the bundle's backend is tensorrt")
    need_mem = manifest.memory.get("total_bytes")
    if isinstance(need_mem, int) and info.mem_total and need_mem > info.mem_total and not problems:
        warnings.append(f"the bundle plans {fmt_bytes(need_mem)} of memory but the device has "
                        f"{fmt_bytes(info.mem_total)} in total")


def _check_tools(info: DeviceInfo, needs_edgekit: str | None, problems: list[str]) -> None:
    """What flash itself needs on the device: sha256sum, a writable folder, and edgekit for ``needs_edgekit``."""
    if not info.sha256sum:
        problems.append("the device has no sha256sum, which flash needs to verify files on the device: install "
                        "coreutils there")
    if not info.writable:
        problems.append(f"{info.path} cannot be created or written on the device by this user: pass a --path the "
                        "user can write (e.g. ~/edgekit), or fix its permissions")
    if needs_edgekit:
        if not info.python_path:
            problems.append(f"{needs_edgekit} runs edgekit on the device, but no python was found there: install "
                            "python3 and edgekit on the device, or pass --remote-python")
        elif not info.edgekit:
            problems.append(f"{needs_edgekit} runs edgekit on the device, but {info.python_path} cannot import it: "
                            "pip install edgekit on the device, or point --remote-python at a python that has it")


def check_space(info: DeviceInfo, need: int, *, device: str) -> str | None:
    """Why ``need`` more bytes do not fit at DIR (with SPACE_MARGIN to spare), or None."""
    if info.disk_free is None:
        return None
    if need + SPACE_MARGIN > info.disk_free:
        return (f"{device}: not enough disk space at {info.path} ({info.disk_mount or 'its filesystem'}): the bundle "
                f"needs {fmt_bytes(need)} more plus {fmt_bytes(SPACE_MARGIN)} to spare, the device has "
                f"{fmt_bytes(info.disk_free)} free; free some space (edgekit releases shows old releases) or pass "
                "--path on a bigger disk")
    return None
