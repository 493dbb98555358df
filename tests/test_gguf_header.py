"""edgekit's own GGUF header parser: the same fields and tensor records as the gguf package's reader (the
reference) on real and written files, arrays left unread until asked for, and a one-line error for every
malformed header, including ones that claim more entries or bytes than the file has."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
from refs import write_tiny_gguf
from test_gguf import _one_line_error

from edgekit.errors import ModelFormatError, UnsupportedQuantType
from edgekit.sources.gguf import GGUFReader, spec_from_gguf
from edgekit.sources.gguf_header import GGUFHeader, LazyArray, read_header


def _same_as_gguf_package(path: Path) -> GGUFHeader:
    import gguf

    ours, ref = read_header(path), gguf.GGUFReader(path)
    assert ours.data_offset == ref.data_offset and ours.alignment == ref.alignment
    keys = [k for k in ref.fields if not k.startswith("GGUF.")]
    assert list(ours.fields) == keys
    for key in keys:
        value = ours.array(key)
        if isinstance(value, list) and value and isinstance(value[0], list):
            value = [x for inner in value for x in inner]   # the gguf package flattens nested arrays
        assert value == ref.fields[key].contents(), key
    assert len(ours.tensors) == len(ref.tensors)
    for t, r in zip(ours.tensors, ref.tensors):
        assert (t.name, t.type_name, t.dims, t.offset, t.n_bytes, t.n_elements) == (
            r.name, r.tensor_type.name, tuple(int(d) for d in r.shape), int(r.data_offset), int(r.n_bytes),
            int(r.n_elements))
        assert t.shape == tuple(reversed(t.dims))
    return ours


def test_smollm2_header_equals_gguf_package(smollm2_gguf):
    header = _same_as_gguf_package(smollm2_gguf)
    tokens = header.value("tokenizer.ggml.tokens")
    assert isinstance(tokens, LazyArray) and len(tokens) == 49152 and tokens.item_type == 8
    assert header.end == smollm2_gguf.stat().st_size


def test_written_files_equal_gguf_package(tmp_path):
    """Nested and string arrays, every scalar type, a custom alignment, F16/F32/Q8_0 tensors."""
    import gguf

    _same_as_gguf_package(write_tiny_gguf(tmp_path / "tiny.gguf").path)
    path = tmp_path / "kinds.gguf"
    w = gguf.GGUFWriter(path, "llama")
    w.add_custom_alignment(64)
    w.add_array("x.nested", [[1, 2], [3, 4, 5]])
    w.add_array("x.strings", ["a", "bé", "", "😀"])
    w.add_array("x.floats", [0.5, -2.0])
    for kind, value in (("uint8", 7), ("int8", -7), ("uint16", 700), ("int16", -700), ("uint32", 70000),
                        ("int32", -70000), ("uint64", 2**40), ("int64", -(2**40)), ("float32", 1.5),
                        ("float64", 2.25), ("bool", True), ("string", "ünï")):
        getattr(w, f"add_{kind}")(f"x.{kind}", value)
    w.add_tensor("a", np.arange(64, dtype=np.float32).reshape(2, 32))
    w.add_tensor("b", np.ones((3, 32), np.float16))
    w.add_tensor("c", gguf.quants.quantize(np.ones((2, 64), np.float32), gguf.GGMLQuantizationType.Q8_0),
                 raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    header = _same_as_gguf_package(path)
    assert header.alignment == 64 and header.data_offset % 64 == 0
    assert header.value("x.uint64") == 2**40 and header.value("x.bool") is True
    assert header.array("x.nested") == [[1, 2], [3, 4, 5]]


def test_opening_a_model_reads_no_array(smollm2_gguf, monkeypatch):
    """spec, plan and weights need no vocabulary; the tokenizer reads each array once."""
    calls = []
    real = GGUFHeader.array

    def counting(self, key):
        calls.append(key)
        return real(self, key)

    monkeypatch.setattr(GGUFHeader, "array", counting)
    spec_from_gguf(smollm2_gguf)
    from click.testing import CliRunner

    from edgekit.cli import cli

    result = CliRunner().invoke(cli, ["plan", str(smollm2_gguf), "--target", "cpu"])
    assert result.exit_code == 0, result.output
    with GGUFReader(smollm2_gguf) as reader:
        reader.tensor("embed.weight")
        assert reader.chat_template()
        assert calls == []
        reader.tokenizer_json()
        reader.special_tokens()
        reader.tokenizer_json()
    arrays = [k for k in calls if k.endswith(("tokens", "merges", "token_type"))]
    assert sorted(arrays) == ["tokenizer.ggml.merges", "tokenizer.ggml.token_type", "tokenizer.ggml.tokens"]


# ----- malformed headers, written byte by byte -----------------------------------------------------
def _str(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw)) + raw


def _kv(key: str | bytes, kind: int, payload: bytes) -> bytes:
    return _str(key) + struct.pack("<I", kind) + payload


def _tensor(name: str, dims: tuple[int, ...], type_id: int = 0, offset: int = 0) -> bytes:
    return _str(name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, type_id, offset)


def _write(path: Path, kvs=(), tensors=(), *, version: int = 3, data: bytes = b"", n_tensors=None,
           n_kv=None) -> Path:
    head = b"GGUF" + struct.pack("<IQQ", version, len(tensors) if n_tensors is None else n_tensors,
                                 len(kvs) if n_kv is None else n_kv)
    head += b"".join(kvs) + b"".join(tensors)
    path.write_bytes(head + b"\0" * (-len(head) % 32) + data)
    return path


def test_a_well_formed_minimal_header(tmp_path):
    path = _write(tmp_path / "ok.gguf", [_kv("a.b", 4, struct.pack("<I", 5)),
                                         _kv("a.empty", 9, struct.pack("<IQ", 8, 0))], [_tensor("t", (32, 2))],
                  data=bytes(256))
    header = read_header(path)
    assert header.fields["a.b"] == 5 and header.array("a.empty") == [] and header.tensors[0].shape == (2, 32)
    assert header.end == header.data_offset + 256


@pytest.mark.parametrize("case", [
    "huge string array", "huge int array", "huge nested array", "huge string", "huge kv count",
    "huge tensor count", "cut in array"])
def test_counts_beyond_the_file_are_refused_at_once(case, tmp_path):
    big = 2**62
    kvs = {
        "huge string array": [_kv("tokenizer.ggml.tokens", 9, struct.pack("<IQ", 8, big) + _str("a"))],
        "huge int array": [_kv("tokenizer.ggml.token_type", 9, struct.pack("<IQ", 5, big) + bytes(8))],
        "huge nested array": [_kv("x", 9, struct.pack("<IQ", 9, 1) + struct.pack("<IQ", 0, big))],
        "huge string": [_kv("x", 8, struct.pack("<Q", big) + b"abc")],
        "cut in array": [_kv("x", 9, struct.pack("<IQ", 8, 3) + _str("a") + _str("b") + struct.pack("<Q", 50))],
    }.get(case, [])
    path = _write(tmp_path / "bad.gguf", kvs, n_kv=big if case == "huge kv count" else None,
                  n_tensors=big if case == "huge tensor count" else None)
    message = _one_line_error(ModelFormatError, lambda: read_header(path), "bad.gguf", "truncated or corrupt",
                              "re-download")
    if case.startswith("huge") and case != "huge string":
        assert f"claims {big:,}" in message


@pytest.mark.parametrize("case, words", [
    ("value type", ("metadata key 'x'", "value type 13")),
    ("array type", ("metadata key 'x'", "array of value type 42")),
    ("duplicate key", ("metadata key 'x'", "same key")),
    ("not utf-8", ("metadata entry 0", "not UTF-8")),
    ("alignment zero", ("general.alignment is 0",)),
    ("alignment three", ("general.alignment is 3",)),
    ("alignment string", ("general.alignment is '32'",)),
    ("no dims", ("tensor 't'", "0 dimensions")),
    ("five dims", ("tensor 't'", "5 dimensions")),
    ("duplicate tensor", ("two tensors named 't'",)),
    ("misaligned", ("tensor 't'", "data offset 4", "alignment 32")),
    ("partial block", ("tensor 't'", "rows of 40 values", "Q8_0")),
    ("version 1", ("GGUF version 1", "versions 2 and 3")),
    ("big-endian", ("big-endian",)),
])
def test_corrupt_headers_are_named(case, words, tmp_path):
    def u32(v):
        return struct.pack("<I", v)
    kvs = {
        "value type": [_kv("x", 13, u32(1))],
        "array type": [_kv("x", 9, struct.pack("<IQ", 42, 1) + u32(1))],
        "duplicate key": [_kv("x", 4, u32(1)), _kv("x", 4, u32(2))],
        "not utf-8": [_kv(b"\xff\xfe", 4, u32(1))],
        "alignment zero": [_kv("general.alignment", 4, u32(0))],
        "alignment three": [_kv("general.alignment", 4, u32(3))],
        "alignment string": [_kv("general.alignment", 8, _str("32"))],
    }.get(case, [])
    tensors = {
        "no dims": [_tensor("t", ())], "five dims": [_tensor("t", (32, 1, 1, 1, 1))],
        "duplicate tensor": [_tensor("t", (32,)), _tensor("t", (32,), offset=128)],
        "misaligned": [_tensor("t", (32,), offset=4)], "partial block": [_tensor("t", (40,), type_id=8)],
    }.get(case, [])
    version = {"version 1": 1, "big-endian": 3 << 24}.get(case, 3)
    path = _write(tmp_path / "bad.gguf", kvs, tensors, version=version, data=bytes(512))
    kind = ModelFormatError
    _one_line_error(kind, lambda: read_header(path), "bad.gguf", *words)


def test_big_endian_file_written_by_gguf_is_refused(tmp_path):
    import gguf

    path = tmp_path / "be.gguf"
    w = gguf.GGUFWriter(path, "llama", endianess=gguf.GGUFEndian.BIG)
    w.add_tensor("t", np.zeros((2, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    _one_line_error(ModelFormatError, lambda: spec_from_gguf(path), "be.gguf", "big-endian", "little-endian")


def test_unknown_type_id_names_the_tensor(tmp_path):
    path = _write(tmp_path / "odd.gguf", [], [_tensor("blk.0.x", (32,), type_id=4)], data=bytes(64))
    _one_line_error(UnsupportedQuantType, lambda: read_header(path), "odd.gguf", "'blk.0.x'", "type id 4", "Q4_K")


def test_huge_token_count_in_a_real_file_is_refused(tmp_path):
    """The tiny model's tokens array claiming 2**62 entries: refused when opened, before any loop."""
    path = write_tiny_gguf(tmp_path / "tiny.gguf").path
    data = bytearray(path.read_bytes())
    at = data.index(_str("tokenizer.ggml.tokens")) + len(_str("tokenizer.ggml.tokens")) + 4 + 4
    assert struct.unpack_from("<Q", data, at)[0] > 100     # the count of the string array
    data[at:at + 8] = struct.pack("<Q", 2**62)
    path.write_bytes(bytes(data))
    _one_line_error(ModelFormatError, lambda: spec_from_gguf(path), "tiny.gguf", "metadata key "
                    "'tokenizer.ggml.tokens'", f"claims {2**62:,} array entries")


def test_check_data_off_reads_a_cut_file(tmp_path):
    full = write_tiny_gguf(tmp_path / "tiny.gguf").path
    cut = tmp_path / "cut.gguf"
    header = read_header(full)
    cut.write_bytes(full.read_bytes()[:header.data_offset + 10])
    _one_line_error(ModelFormatError, lambda: read_header(cut), "cut.gguf", "truncated", "needs bytes up to")
    assert read_header(cut, check_data=False).end == header.end == full.stat().st_size


def test_type_tables_agree_with_the_gguf_package():
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType

    from edgekit.sources.gguf_header import FILE_TYPES, GGML_TYPES, SUPPORTED_QUANT_TYPES

    for type_id, (name, block, size) in GGML_TYPES.items():
        qtype = GGMLQuantizationType(type_id)
        assert (qtype.name, *GGML_QUANT_SIZES[qtype]) == (name, block, size)
    assert set(SUPPORTED_QUANT_TYPES) <= {name for name, _, _ in GGML_TYPES.values()}
    for type_id, name in FILE_TYPES.items():
        theirs = LlamaFileType(type_id).name.removeprefix("MOSTLY_").removeprefix("ALL_").lower()
        assert {"f32": "fp32", "f16": "fp16"}.get(theirs, theirs) == name


def test_plan_of_a_gguf_needs_neither_the_gguf_package_nor_the_vocabulary(smollm2_gguf):
    """Reading hyper-parameters imports no gguf (a build-time dependency, ~0.1 s) and builds no token list."""
    import subprocess
    import sys

    code = ("import sys; from edgekit.cli import cli\n"
            f"try: cli(['plan', {str(smollm2_gguf)!r}, '--target', 'cpu'])\n"
            "except SystemExit as e: assert e.code == 0, e.code\n"
            "assert not [m for m in sys.modules if m == 'gguf' or m.startswith('gguf.')], 'gguf imported'\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "smollm2-135M" in result.stdout
