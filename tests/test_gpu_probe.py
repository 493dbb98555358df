"""The ctypes GPU probe's decisions on each failure mode, Jetson/memory readers, and `edgekit doctor`."""

from __future__ import annotations

import ctypes
import json

import pytest
from click.testing import CliRunner

from edgekit.build.target import list_targets
from edgekit.cli import cli
from edgekit.gpu import probe as gp
from edgekit.runtime import gpu_driver as gd
from edgekit.runtime.memory import read_meminfo


class FakeLibcuda:
    """The libcuda driver-API functions the probe calls, writing results through ctypes.byref like C would."""

    def __init__(self, init=0, count=1, count_rc=0, cc=(8, 7), name=b"Orin", memory=7_620_000_000,
                 version=12060, attr_rc=0):
        self.init, self.count, self.count_rc, self.cc, self.gpu_name = init, count, count_rc, cc, name
        self.memory, self.version, self.attr_rc = memory, version, attr_rc
        self.calls = []

    def cuDriverGetVersion(self, ref):
        self.calls.append("cuDriverGetVersion")
        ref._obj.value = self.version
        return 0

    def cuInit(self, flags):
        self.calls.append("cuInit")
        assert flags == 0
        return self.init

    def cuDeviceGetCount(self, ref):
        self.calls.append("cuDeviceGetCount")
        ref._obj.value = self.count
        return self.count_rc

    def cuDeviceGet(self, ref, index):
        ref._obj.value = 100 + index
        return 0

    def cuDeviceGetAttribute(self, ref, attribute, device):
        assert device.value >= 100
        ref._obj.value = {gd.ATTR_CC_MAJOR: self.cc[0], gd.ATTR_CC_MINOR: self.cc[1]}[attribute]
        return self.attr_rc

    def cuDeviceGetName(self, buf, length, device):
        assert length == 256
        buf.value = self.gpu_name
        return 0

    def cuDeviceTotalMem_v2(self, ref, device):
        ref._obj.value = self.memory
        return 0


def loader(lib):
    def load(name):
        if lib is None:
            raise OSError(f"{name}: cannot open shared object file: No such file or directory")
        return lib
    return load


def test_no_driver_when_libcuda_cannot_be_loaded():
    p = gd.probe_driver(loader(None))
    assert p.status == "no-driver" and not p.ok and p.devices == ()
    assert "libcuda.so.1 not found" in p.detail and "--gpus all" in p.detail and "--runtime nvidia" in p.detail


def test_stub_library_is_told_apart_from_a_driver():
    p = gd.probe_driver(loader(FakeLibcuda(init=gd.CUDA_ERROR_STUB_LIBRARY)))
    assert p.status == "stub-driver" and p.cuda_error == 34
    assert "stub" in p.detail and "CUDA_ERROR_STUB_LIBRARY" in p.detail


@pytest.mark.parametrize("init,count", [(gd.CUDA_ERROR_NO_DEVICE, 0), (0, 0)])
def test_driver_without_device(init, count):
    lib = FakeLibcuda(init=init, count=count)
    p = gd.probe_driver(loader(lib))
    assert p.status == "no-device" and p.library == "libcuda.so.1"
    assert "sees no GPU" in p.detail and "--gpus all" in p.detail
    assert p.driver_version == "12.6"


def test_insufficient_driver_and_other_errors_are_named():
    old = gd.probe_driver(loader(FakeLibcuda(init=gd.CUDA_ERROR_INSUFFICIENT_DRIVER)))
    assert old.status == "error" and "too old" in old.detail and "INSUFFICIENT_DRIVER" in old.detail
    odd = gd.probe_driver(loader(FakeLibcuda(init=999)))
    assert odd.status == "error" and "CUDA_ERROR_UNKNOWN (999)" in odd.detail
    attr = gd.probe_driver(loader(FakeLibcuda(attr_rc=1)))
    assert attr.status == "error" and "compute capability" in attr.detail


def test_a_library_without_the_driver_api_is_an_error_not_a_crash():
    p = gd.probe_driver(loader(object()))
    assert p.status == "error" and "does not behave like the NVIDIA driver" in p.detail


def test_ok_reads_compute_capability_name_memory_and_version():
    lib = FakeLibcuda(count=2, cc=(8, 9), name=b"NVIDIA GeForce RTX 4090", memory=25_300_000_000, version=12080)
    p = gd.probe_driver(loader(lib))
    assert p.ok and p.driver_version == "12.8"
    assert [d.sm for d in p.devices] == ["8.9", "8.9"] and p.devices[1].index == 1
    assert p.devices[0].name == "NVIDIA GeForce RTX 4090" and p.devices[0].total_memory_bytes == 25_300_000_000
    assert p.device_with_sm("8.9") is p.devices[0] and p.device_with_sm("8.7") is None
    assert "compute capability 8.9 (+1 more)" in p.detail
    assert lib.calls[:3] == ["cuDriverGetVersion", "cuInit", "cuDeviceGetCount"]
    json.dumps(p.to_dict())


def test_real_probe_on_this_machine_never_raises():
    p = gp.probe_driver()
    assert p.status in gd.STATUSES
    assert (p.status == "ok") == bool(p.devices)


def test_real_ctypes_calls_match_the_fake_signature():
    # The fake writes through byref(...)._obj; make sure that is what ctypes gives the probe.
    value = ctypes.c_int(0)
    ctypes.byref(value)._obj.value = 5
    assert value.value == 5


# ----- Jetson, memory, packages ----------------------------------------------------------------------------
@pytest.mark.parametrize("text,l4t,jetpack", [
    ("# R36 (release), REVISION: 4.3, GCID: 38968081, BOARD: generic, EABI: aarch64, DATE: Wed Jan  8 2025",
     "36.4.3", "6.2"),
    ("# R36 (release), REVISION: 4.0, GCID: 37537400, BOARD: generic, EABI: aarch64, DATE: Fri Sep 13 2024",
     "36.4.0", "6.1"),
    ("# R36 (release), REVISION: 3.0, GCID: 36191598", "36.3.0", "6.0"),
    ("# R35 (release), REVISION: 5.0, GCID: 35550185", "35.5.0", "5.1"),
])
def test_tegra_release(text, l4t, jetpack):
    assert gp.parse_tegra_release(text) == l4t
    assert gp.jetpack_for_l4t(l4t) == jetpack


def test_read_jetson_and_meminfo_from_a_fake_root(tmp_path):
    assert gp.read_jetson(tmp_path) is None
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/nv_tegra_release").write_text("# R36 (release), REVISION: 4.3, GCID: 1, BOARD: generic\n")
    (tmp_path / "proc/device-tree").mkdir(parents=True)
    (tmp_path / "proc/device-tree/model").write_bytes(b"NVIDIA Jetson Orin Nano Developer Kit\x00")
    (tmp_path / "proc/meminfo").write_text("MemTotal:        7802144 kB\nMemFree:  100 kB\n"
                                          "MemAvailable:    5123456 kB\nCmaTotal:         262144 kB\n"
                                          "CmaFree:          200000 kB\n")
    j = gp.read_jetson(tmp_path)
    assert (j.l4t, j.jetpack, j.model) == ("36.4.3", "6.2", "NVIDIA Jetson Orin Nano Developer Kit")
    mem = read_meminfo(tmp_path)
    assert mem == {"MemTotal": 7802144 * 1024, "MemAvailable": 5123456 * 1024, "CmaTotal": 256 * 2**20,
                   "CmaFree": 200000 * 1024}
    (tmp_path / "etc/nv_tegra_release").write_text("garbage")
    assert gp.read_jetson(tmp_path) is None


def test_versions_come_from_metadata_without_importing(monkeypatch):
    import sys

    assert gd.package_version(["no-such-dist-edgekit", "numpy"])[0] == "numpy"
    assert gd.package_version(["no-such-dist-edgekit"]) is None
    gd.tensorrt_version()
    assert "tensorrt" not in sys.modules
    version, providers = gp.onnxruntime_info()
    assert version and "CPUExecutionProvider" in providers


# ----- decisions ------------------------------------------------------------------------------------------
def report(driver, *, trt="10.3.0", cuda_py="12.6.0", providers=("CPUExecutionProvider",), ort="1.20.0"):
    return gp.MachineReport(driver=driver, jetson=None, tensorrt=trt, tensorrt_module=trt is not None,
                            cuda_python=cuda_py, onnxruntime=ort, ort_providers=tuple(providers),
                            memory={"MemTotal": 8 << 30})


def test_backend_support_decisions():
    none = gd.probe_driver(loader(None))
    orin = gd.probe_driver(loader(FakeLibcuda()))
    def by(r):
        return {b.backend: b for b in gp.backend_support(r)}
    b = by(report(none, trt=None, cuda_py=None))
    assert b["onnxruntime-cpu"].usable and not b["onnxruntime-cuda"].usable and not b["tensorrt"].usable
    assert "no-driver" in b["tensorrt"].reason
    b = by(report(none, providers=("CUDAExecutionProvider", "CPUExecutionProvider")))
    assert not b["onnxruntime-cuda"].usable and "no usable GPU" in b["onnxruntime-cuda"].reason
    b = by(report(orin, providers=("CUDAExecutionProvider", "CPUExecutionProvider")))
    assert b["onnxruntime-cuda"].usable and b["tensorrt"].usable and "SM 8.7" in b["tensorrt"].reason
    assert not by(report(orin, trt=None))["tensorrt"].usable
    assert "cuda-python" in by(report(orin, cuda_py=None))["tensorrt"].reason
    assert not by(report(orin, ort=None))["onnxruntime-cpu"].usable


def test_engine_targets_are_those_with_the_gpus_compute_capability():
    orin = gd.probe_driver(loader(FakeLibcuda(cc=(8, 7))))
    targets = gp.engine_targets(report(orin), list_targets())
    assert "orin-nano-8gb" in targets and "agx-orin-64gb" in targets
    assert all(t.sm == "8.7" for t in list_targets() if t.name in targets)
    assert gp.engine_targets(report(orin, trt=None), list_targets()) == []
    assert gp.engine_targets(report(gd.probe_driver(loader(None))), list_targets()) == []


def test_machine_report_with_fakes_is_json(tmp_path):
    r = gp.machine_report(root=tmp_path, load=loader(None), ort=("1.20.0", ("CPUExecutionProvider",)))
    d = json.loads(json.dumps(r.to_dict()))
    assert d["driver"]["status"] == "no-driver" and d["jetson"] is None and d["memory"]["total_bytes"] is None


# ----- edgekit doctor ----------------------------------------------------------------------------------
def test_doctor_without_gpu(monkeypatch):
    monkeypatch.setattr(gp, "probe_driver", lambda load=None: gp.DriverProbe(
        "no-driver", "no NVIDIA GPU driver (libcuda.so.1 not found): install the driver"))
    result = CliRunner().invoke(cli, ["doctor"])
    assert result.exit_code == 0, result.output
    lines = {line.split("  ")[0]: line for line in result.output.splitlines()}
    assert "none: no NVIDIA GPU driver" in lines["GPU driver"]
    assert "yes" in lines["backend onnxruntime-cpu"]
    assert "no: no usable GPU" in lines["backend tensorrt"]
    assert "onnxruntime-cpu run here" in lines["bundles"]
    assert lines["engines"].split(None, 1)[1].startswith("none")
    assert all(len(line) < 400 for line in result.output.splitlines())


def test_doctor_with_a_jetson_gpu(monkeypatch):
    monkeypatch.setattr(gp, "probe_driver", lambda load=None: _orin())
    monkeypatch.setattr(gp, "tensorrt_version", lambda: "10.3.0")
    monkeypatch.setattr(gp, "package_version", lambda names: ("cuda-python", "12.6.2")
                        if "cuda-python" in names else None)
    result = CliRunner().invoke(cli, ["doctor"])
    assert result.exit_code == 0, result.output
    assert "GPU 0" in result.output and "Orin, compute capability 8.7" in result.output
    assert "backend tensorrt          yes: TensorRT 10.3.0 on Orin (SM 8.7)" in result.output
    assert "orin-nano-8gb" in result.output
    data = json.loads(CliRunner().invoke(cli, ["doctor", "--json"]).output)
    assert data["driver"]["devices"][0]["compute_capability"] == "8.7"
    assert "orin-nano-8gb" in data["engine_targets"] and "rtx-4090" not in data["engine_targets"]
    assert {b["backend"]: b["usable"] for b in data["backends"]}["tensorrt"] is True


_REAL_PROBE = gp.probe_driver


def _orin():
    return _REAL_PROBE(loader(FakeLibcuda()))
