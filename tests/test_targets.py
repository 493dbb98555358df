"""Device targets: the TOML files load, agree with the hardware facts, and reject bad names and bad files."""

from __future__ import annotations

import json
from importlib.resources import files
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgekit.build.target import BACKENDS, Target, check_combination, list_targets, load_target
from edgekit.build.target_file import parse_target
from edgekit.cli import cli
from edgekit.errors import UnknownTarget, UnsupportedPrecision, UserInputError
from edgekit.units import GiB, MiB

NAMES = ["orin-nano-4gb", "orin-nano-8gb", "orin-nano-super", "orin-nx-8gb", "orin-nx-16gb", "agx-orin-32gb",
         "agx-orin-64gb", "rtx-3060-12gb", "rtx-4090", "rtx-6000-ada", "rtx-5090", "cpu"]
JETSONS = [n for n in NAMES if "orin" in n]
ORIN_NANO_TOML = Path(__file__).parents[1] / "targets" / "orin-nano-8gb.toml"


def test_every_target_loads_and_is_packaged():
    assert sorted(t.name for t in list_targets()) == sorted(NAMES)
    packaged = sorted(e.name for e in files("edgekit.targets").iterdir() if e.name.endswith(".toml"))
    assert packaged == sorted(f"{n}.toml" for n in NAMES)
    for name in NAMES:
        assert load_target(name).name == name


def test_aliases_and_spelling():
    assert load_target("orin-nano") is load_target("orin-nano-8gb")
    assert load_target("ORIN_NANO").name == "orin-nano-8gb"
    assert load_target(" rtx-3060 ").name == "rtx-3060-12gb"


@pytest.mark.parametrize("name, sm", [("orin-nano-8gb", "8.7"), ("agx-orin-64gb", "8.7"), ("rtx-3060-12gb", "8.6"),
                                      ("rtx-4090", "8.9"), ("rtx-6000-ada", "8.9"), ("rtx-5090", "12.0"),
                                      ("cpu", None)])
def test_compute_capability(name, sm):
    assert load_target(name).sm == sm


def test_orin_nano_facts():
    nano, sup = load_target("orin-nano-8gb"), load_target("orin-nano-super")
    assert nano.total_memory_bytes == sup.total_memory_bytes == 8 * GiB
    assert nano.budget_bytes == sup.budget_bytes == 5_200_000_000
    assert (nano.bandwidth_gbs, sup.bandwidth_gbs) == (68, 102)
    assert nano.unified_memory and nano.kind == "jetson" and nano.default_backend == "tensorrt"
    assert load_target("orin-nano-4gb").total_memory_bytes == 4 * GiB


@pytest.mark.parametrize("name", JETSONS)
def test_jetson_software_and_cma(name):
    t = load_target(name)
    sw = dict(t.software)
    assert (sw["cuda"], sw["tensorrt"], sw["python"]) == ("12.6", "10.3", "3.10")
    assert sw["jetpack"].startswith("6.")
    assert t.cma_bytes == 256 * MiB and "CMA" in t.cma_source
    assert t.unified_memory


@pytest.mark.parametrize("name", NAMES)
def test_numbers_are_sane_and_sourced(name):
    t = load_target(name)
    assert 0 < t.budget_bytes < t.total_memory_bytes
    assert t.kind != "desktop-gpu" or not t.unified_memory
    assert t.prefill_chunk > 0 and t.prefill_chunk_source
    assert t.budget_source and t.bandwidth_source and t.total_memory_source and t.description
    assert t.default_backend in t.backend_names
    for b in t.backends:
        assert b.overhead_source and 50 * MiB < b.overhead_bytes < 2 * GiB
        assert b.precisions


@pytest.mark.parametrize("name", NAMES)
def test_precisions_agree_with_hardware(name):
    t = load_target(name)
    for b in t.backends:
        if "fp8" in b.precisions:
            assert t.compute_capability >= (8, 9)
        if t.kind == "jetson" and b.name == "tensorrt":
            assert "bf16" not in b.precisions and "fp8" not in b.precisions
        if b.name == "onnxruntime-cpu":
            assert set(b.precisions) <= {"fp32", "int8", "int4"}
        assert "int4" in b.precisions          # every target can run the default precision
    if t.kind == "desktop-gpu":
        assert ("fp8" in t.backend("tensorrt").precisions) == (t.compute_capability >= (8, 9))


def test_cpu_target_reads_this_machine():
    t = load_target("cpu")
    assert t.backend_names == ("onnxruntime-cpu", "ggml-cpu") and t.compute_capability is None
    assert t.default_backend == "onnxruntime-cpu"     # ggml-cpu is opt-in until parity is measured (issue 20)
    assert t.budget_bytes == int(t.total_memory_bytes * 0.75)


# ----- unknown names --------------------------------------------------------------------------------
def test_unknown_target_did_you_mean():
    with pytest.raises(UnknownTarget) as e:
        load_target("orin-nan")
    text = str(e.value)
    assert "\n" not in text
    assert "did you mean orin-nano" in text
    for name in NAMES:
        assert name in text


def test_unknown_target_without_close_match_lists_all():
    with pytest.raises(UnknownTarget) as e:
        load_target("raspberry-pi")
    assert "did you mean" not in str(e.value) and "rtx-4090" in str(e.value)


# ----- the capability table --------------------------------------------------------------------------
def test_fp8_on_orin_nano():
    with pytest.raises(UnsupportedPrecision) as e:
        check_combination(load_target("orin-nano"), None, "fp8")
    assert str(e.value).startswith("fp8 is not supported on orin-nano-8gb (SM 8.7): use one of int4, int8, fp16")
    assert "SM 8.9" in str(e.value)


def test_bf16_on_orin_names_the_reason():
    with pytest.raises(UnsupportedPrecision, match=r"bf16 is not supported on orin-nano-8gb .*TensorRT"):
        check_combination(load_target("orin-nano"), "tensorrt", "bf16")


@pytest.mark.parametrize("name, backend, precision, expected", [
    ("orin-nano", None, "int4", "tensorrt"),
    ("orin-nano", "onnxruntime-cpu", "int8", "onnxruntime-cpu"),
    ("rtx-4090", None, "fp8", "tensorrt"),
    ("rtx-3060-12gb", None, "bf16", "tensorrt"),
    ("cpu", None, "fp32", "onnxruntime-cpu"),
])
def test_valid_combinations(name, backend, precision, expected):
    assert check_combination(load_target(name), backend, precision).name == expected


@pytest.mark.parametrize("name, backend, precision, error, message", [
    ("rtx-3060-12gb", None, "fp8", UnsupportedPrecision,
     "fp8 is not supported on rtx-3060-12gb (SM 8.6): use one of int4, int8, fp16, bf16, fp32"),
    ("cpu", None, "fp16", UnsupportedPrecision,
     "fp16 is not supported on cpu (no GPU): use one of int4, int8, fp32 (onnxruntime's CPU kernels"),
    ("orin-nano", "onnxruntime-cpu", "fp16", UnsupportedPrecision,
     "fp16 is not supported by onnxruntime-cpu on orin-nano-8gb: use one of int4, int8, fp32 with "
     "onnxruntime-cpu, or backend tensorrt"),
    ("rtx-4090", "onnxruntime-cuda", "fp8", UnsupportedPrecision,
     "fp8 is not supported by onnxruntime-cuda on rtx-4090"),
    ("rtx-4090", "onnxruntime-cpu", "int4", UserInputError,
     "backend 'onnxruntime-cpu' is not available on rtx-4090: use one of tensorrt, onnxruntime-cuda"),
    ("rtx-4090", "vulkan", "int4", UserInputError, "unknown backend 'vulkan'"),
    ("rtx-4090", None, "int3", UnsupportedPrecision,
     "unknown precision 'int3': use one of int4, int8, fp8, fp16, bf16, fp32"),
])
def test_impossible_combinations(name, backend, precision, error, message):
    with pytest.raises(error) as e:
        check_combination(load_target(name), backend, precision)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_every_listed_combination_is_accepted():
    for t in list_targets():
        for b in t.backends:
            for p in b.precisions:
                assert check_combination(t, b.name, p) == b
        assert set(b.name for b in t.backends) <= set(BACKENDS)


# ----- malformed and custom target files ------------------------------------------------------------
def _edit(text: str, old: str, new: str) -> str:
    assert old in text
    return text.replace(old, new, 1)


BASE = ORIN_NANO_TOML.read_text()


@pytest.mark.parametrize("content, match", [
    ("name = \n", "not valid TOML"),
    (_edit(BASE, 'kind = "jetson"', 'kind = "phone"'), "kind 'phone' is not one of"),
    (_edit(BASE, 'total = "8GiB"', 'total = "eight"'), "memory.total 'eight' is not a size"),
    (_edit(BASE, 'budget = "5.2GB"', 'budget = "9GiB"'), "at most memory.total"),
    (_edit(BASE, 'bandwidth_gbs = 68', 'bandwith_gbs = 68'), "unknown key memory.bandwith_gbs"),
    (_edit(BASE, 'default_backend = "tensorrt"', 'default_backend = "cuda"'), "default_backend 'cuda'"),
    (_edit(BASE, 'precisions = ["fp32", "fp16", "int8", "int4"]', 'precisions = ["fp32", "fp8"]'),
     "lists fp8 but FP8 needs SM 8.9"),
    (_edit(BASE, 'precisions = ["fp32", "fp16", "int8", "int4"]', 'precisions = ["fp32", "bf16"]'),
     "lists bf16 but"),
    (_edit(BASE, '[backends.onnxruntime-cpu]\nprecisions = ["fp32", "int8", "int4"]',
           '[backends.onnxruntime-cpu]\nprecisions = ["fp16"]'), "onnxruntime-cpu cannot run 'fp16'"),
    (_edit(BASE, 'compute_capability = "8.7"', 'compute_capability = "eight"'), "is not like \"8.7\""),
    (_edit(BASE, 'unified = true', 'unified = "yes"'), "memory.unified has the wrong type"),
    (_edit(BASE, 'prefill_chunk = 256', 'prefill_chunk = 0'), "prefill_chunk must be a positive"),
    (BASE.replace('name = "orin-nano-8gb"\n', ''), "missing name"),
])
def test_malformed_target_file(tmp_path, content, match):
    path = tmp_path / "mine.toml"
    path.write_text(content)
    with pytest.raises(UserInputError) as e:
        load_target(str(path))
    text = str(e.value)
    assert "\n" not in text and "malformed" in text and match in text, text


def test_custom_target_file(tmp_path):
    text = _edit(BASE, 'name = "orin-nano-8gb"', 'name = "my-board"')
    text = _edit(text, 'budget = "5.2GB"', 'budget = "3GiB"')
    path = tmp_path / "my-board.toml"
    path.write_text(text)
    t = load_target(str(path))
    assert t.name == "my-board" and t.budget_bytes == 3 * GiB and t.sm == "8.7"


def test_missing_target_file():
    with pytest.raises(UnknownTarget, match="no such target file"):
        load_target("/nonexistent/board.toml")


def test_parse_target_rejects_gpu_backend_on_cpu_kind():
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib

    doc = tomllib.loads(BASE)
    doc["kind"] = "cpu"
    del doc["compute_capability"]
    del doc["memory"]["cma"]
    with pytest.raises(UserInputError, match="needs a GPU"):
        parse_target(doc, "test.toml")


# ----- serialisation and the CLI ------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_to_dict_round_trip(name):
    t = load_target(name)
    assert Target.from_dict(json.loads(json.dumps(t.to_dict()))) == t


def test_cli_targets_json_round_trips():
    result = CliRunner().invoke(cli, ["targets", "--json"])
    assert result.exit_code == 0, result.output
    listed = [Target.from_dict(d) for d in json.loads(result.stdout)]
    assert listed == list_targets()


def test_cli_targets_table():
    result = CliRunner().invoke(cli, ["targets"])
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    for name in NAMES:
        assert any(line.startswith(name + " ") for line in lines), name
    nano = next(line for line in lines if line.startswith("orin-nano-8gb "))
    for cell in ("orin-nano", "jetson", "8.00 GiB", "4.84 GiB", "68 GB/s", "8.7", "tensorrt*"):
        assert cell in nano
