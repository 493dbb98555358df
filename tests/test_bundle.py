"""Bundle format: manifest round trip, tamper detection, hostile manifests, atomic output, inspect/verify CLI."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgekit import __version__
from edgekit.build.staging import staged_output
from edgekit.cli import cli
from edgekit.errors import BundleError, OutputError
from edgekit.runtime import bundle as B
from edgekit.runtime.bundle import verification
from edgekit.spec import spec_from_fields

SPEC = spec_from_fields(
    architecture="LlamaForCausalLM", family="llama", vocab_size=512, hidden_size=64, intermediate_size=128,
    num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-5, rope_theta=100000.0,
    max_position_embeddings=2048, tie_word_embeddings=True, qkv_bias=False, bos_token_id=1,
    eos_token_ids=(2,), name="tiny-llama")

FILES = {  # name -> size in bytes (random content)
    "model.onnx": 3000,
    "model.onnx.data": 70_000,
    "tokenizer.json": 1200,
    "chat_template.jinja": 300,
    "extra/notes.bin": 10,
}


def _manifest_fields() -> dict:
    return {
        "source": {"kind": "gguf", "name": "tiny.gguf", "sha256": "ab" * 32},
        "model": SPEC.to_dict(),
        "target": {"name": "orin-nano-8gb", "kind": "jetson", "compute_capability": "8.7"},
        "backend": "onnxruntime-cpu", "dialect": "ort", "precision": "int4", "max_context": 1024,
        "graph": {"file": "model.onnx",
                  "inputs": [{"name": "input_ids", "dtype": "int64", "shape": [1, "seq"]}],
                  "outputs": [{"name": "logits", "dtype": "float32", "shape": [1, "seq", 512]}],
                  "kv_cache": {"layout": "static"}, "logits": "last"},
        "memory": {"weights_bytes": 70_000, "kv_cache_bytes": 1024 * 256, "kv_bytes_per_token": 256,
                   "workspace_bytes": 4096, "total_bytes": 70_000 + 1024 * 256 + 4096},
        "tokenizer": {"file": "tokenizer.json", "chat_template": "chat_template.jinja", "bos_token_id": 1,
                      "eos_token_ids": [2], "add_bos_token": True},
        "generation": {"temperature": 0.6, "top_p": 0.95, "top_k": 0, "max_new_tokens": 512, "reasoning": True},
        "engine": None,
    }


def make_bundle(folder: Path, seed: int = 0) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    rnd = __import__("random").Random(seed)
    for name, size in FILES.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        data = rnd.randbytes(size)
        if name == "model.onnx":   # verify reads the graph: a ModelProto holding only a doc_string (field 6)
            data = b"\x32\xb5\x17" + data[3:]                  # 0x32 = field 6, bytes; 0x17b5 = 2997 as a varint
        (folder / name).write_bytes(data)
    return B.write_manifest(folder, _manifest_fields())


def rewrite_manifest(folder: Path, edit) -> None:
    """Change the manifest on disk as an attacker would (no validation on the way)."""
    data = json.loads((folder / B.MANIFEST).read_text())
    edit(data)
    (folder / B.MANIFEST).write_text(json.dumps(data))


@pytest.fixture
def bundle(tmp_path) -> Path:
    make_bundle(tmp_path / "b")
    return tmp_path / "b"


def run_cli(*args):
    result = CliRunner().invoke(cli, list(args))
    return result.exit_code, result.stdout, result.stderr


def assert_one_line_error(args, *fragments):
    code, out, err = run_cli(*args)
    assert code == 2, (out, err)
    assert "Traceback" not in err and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    return lines[0]


# ----- round trip ---------------------------------------------------------------------------------------
def test_round_trip(bundle):
    m = B.read_manifest(bundle)
    assert m.schema == B.SCHEMA and m.edgekit_version == __version__ and m.created.endswith("Z")
    # The files table against an independent hash of each file.
    assert set(m.files) == set(FILES)
    for name, size in FILES.items():
        content = (bundle / name).read_bytes()
        assert m.files[name] == {"sha256": hashlib.sha256(content).hexdigest(), "size": size}
        assert B.hash_file(bundle / name) == hashlib.sha256(content).hexdigest()
    assert m.spec() == SPEC and m.model["parameters"] == SPEC.parameters
    assert m.graph["file"] == "model.onnx" and m.path("model.onnx") == (bundle / "model.onnx").resolve()
    assert m.max_context == 1024 and m.engine is None and m.precision == "int4"
    report = B.verify(bundle)
    assert report.ok and report.checked == 5 and report.size_only == ()
    assert report.summary() == "ok: 5 files verified"
    report.raise_for_problems()   # does nothing
    assert not list(bundle.glob(".manifest.json.tmp*"))


def test_bundle_id_depends_on_files_only(tmp_path):
    a = make_bundle(tmp_path / "a", seed=1)
    b = make_bundle(tmp_path / "b", seed=1)
    c = make_bundle(tmp_path / "c", seed=2)
    assert B.bundle_id(a) == B.bundle_id(b) == B.read_manifest(tmp_path / "a").id
    assert len(B.bundle_id(a)) == 12 and int(B.bundle_id(a), 16) >= 0
    assert B.bundle_id(c) != B.bundle_id(a)


def test_model_keys_are_modelspec_keys():
    # The required model keys must be what ModelSpec.to_dict() writes, or every build would be refused.
    assert set(B.REQUIRED_KEYS["model"]) <= set(SPEC.to_dict())


def test_write_manifest_refuses_a_symlink(tmp_path, bundle):
    (tmp_path / "outside").write_text("secret")
    os.symlink(tmp_path / "outside", bundle / "link")
    with pytest.raises(BundleError, match="is a symlink"):
        B.write_manifest(bundle, _manifest_fields())


def test_write_manifest_refuses_an_invalid_manifest(tmp_path):
    (tmp_path / "x").mkdir()
    with pytest.raises(BundleError, match="graph.file 'model.onnx' is not listed in files"):
        B.write_manifest(tmp_path / "x", _manifest_fields())


# ----- damaged bundles ----------------------------------------------------------------------------------
def _only_problem(folder, **kw):
    report = B.verify(folder, **kw)
    assert len(report.problems) == 1, report.problems
    with pytest.raises(BundleError) as e:
        report.raise_for_problems()
    return report.problems[0], str(e.value)


def test_tampered_byte(bundle):
    path = bundle / "model.onnx.data"
    data = bytearray(path.read_bytes())
    data[12345] ^= 0x01
    path.write_bytes(bytes(data))
    problem, msg = _only_problem(bundle)
    assert problem.name == "model.onnx.data" and "sha256" in problem.what
    assert "model.onnx.data: sha256 is" in msg and "\n" not in msg
    assert_one_line_error(["verify", str(bundle)], "model.onnx.data", "sha256")


def test_truncated_file(bundle):
    with open(bundle / "tokenizer.json", "r+b") as f:
        f.truncate(1000)
    problem, msg = _only_problem(bundle)
    assert problem.name == "tokenizer.json"
    assert "size is 1000 bytes, the manifest says 1200 (truncated)" in msg


def test_missing_file(bundle):
    (bundle / "chat_template.jinja").unlink()
    problem, msg = _only_problem(bundle)
    assert str(problem) == "chat_template.jinja: listed in the manifest but missing"
    with pytest.raises(BundleError, match="missing"):
        B.read_manifest(bundle).path("chat_template.jinja")


def test_extra_file(bundle):
    (bundle / "extra" / "payload.sh").write_text("#!/bin/sh\n")
    problem, msg = _only_problem(bundle)
    assert problem.name == "extra/payload.sh" and "not listed in the manifest" in msg
    assert_one_line_error(["verify", str(bundle)], "extra/payload.sh", "not listed")


def test_several_problems_counted(bundle):
    (bundle / "chat_template.jinja").unlink()
    (bundle / "junk").write_text("x")
    report = B.verify(bundle)
    assert [p.name for p in report.problems] == ["chat_template.jinja", "junk"]
    with pytest.raises(BundleError, match=r"\(and 1 more problem\)"):
        report.raise_for_problems()


def test_no_weights_skips_large_hashes_but_checks_sizes(bundle, monkeypatch):
    monkeypatch.setattr(verification, "QUICK_HASH_LIMIT", 5000)     # model.onnx.data (70 kB) counts as weights
    path = bundle / "model.onnx.data"
    data = bytearray(path.read_bytes())
    data[0] ^= 0xFF
    path.write_bytes(bytes(data))
    quick = B.verify(bundle, weights=False)
    assert quick.ok and quick.size_only == ("model.onnx.data",) and len(quick.hashed) == 4
    assert quick.summary() == "ok: 5 files verified (1 by size only, hashes skipped)"
    assert not B.verify(bundle).ok                          # the full check catches it
    code, out, _ = run_cli("verify", str(bundle), "--no-weights")
    assert code == 0 and out.startswith("ok: 5 files verified")
    # Small files are still hashed, and sizes of large ones still checked.
    (bundle / "tokenizer.json").write_bytes(b"x" * 1200)
    with open(path, "ab") as f:
        f.write(b"!")
    names = {p.name: p.what for p in B.verify(bundle, weights=False).problems}
    assert "sha256" in names["tokenizer.json"] and "(grown)" in names["model.onnx.data"]


# ----- hostile manifests --------------------------------------------------------------------------------
@pytest.mark.parametrize("bad, reason", [
    ("../x", "'..' component"),
    ("/etc/passwd", "absolute path"),
    ("a/../../x", "'..' component"),
    ("a\\..\\x", "backslash"),
    ("a\x00b", "NUL"),
    ("a//b", "empty or '.' component"),
    ("./model.onnx", "empty or '.' component"),
    ("x\x1b[2J", "control character"),
])
@pytest.mark.parametrize("where", ["files", "graph.file", "tokenizer.file", "tokenizer.chat_template", "engine.file"])
def test_unsafe_names_are_refused(bundle, bad, reason, where):
    def edit(d):
        entry = d["files"]["model.onnx"]
        d["files"][bad] = entry
        if where == "engine.file":
            d["engine"] = {"file": bad}
        elif where != "files":
            section, key = where.split(".")
            d[section][key] = bad
    rewrite_manifest(bundle, edit)
    with pytest.raises(BundleError) as e:
        B.read_manifest(bundle)
    msg = str(e.value)
    assert reason in msg and "not a safe relative path" in msg and "\n" not in msg
    assert (where if where != "files" else "files entry") in msg
    with pytest.raises(BundleError):
        B.verify(bundle)
    assert_one_line_error(["verify", str(bundle)], reason)
    assert_one_line_error(["inspect", str(bundle)], reason)


def test_symlink_out_of_bundle(tmp_path, bundle):
    # The link points at a copy of the real file: following it would pass every size and hash check.
    outside = tmp_path / "outside.bin"
    shutil.copy(bundle / "model.onnx", outside)
    (bundle / "model.onnx").unlink()
    os.symlink(outside, bundle / "model.onnx")
    problem, msg = _only_problem(bundle)
    assert problem.name == "model.onnx" and "'model.onnx' is a symlink" in msg
    with pytest.raises(BundleError, match="is a symlink"):
        B.read_manifest(bundle).path("model.onnx")
    assert_one_line_error(["verify", str(bundle)], "model.onnx", "symlink")


def test_symlinked_folder_on_the_path(tmp_path, bundle):
    shutil.move(bundle / "extra", tmp_path / "elsewhere")
    os.symlink(tmp_path / "elsewhere", bundle / "extra")
    names = {p.name: p.what for p in B.verify(bundle).problems}
    assert "'extra' is a symlink" in names["extra/notes.bin"]
    with pytest.raises(BundleError, match="'extra' is a symlink"):
        B.read_manifest(bundle).path("extra/notes.bin")


def test_unlisted_symlink_is_reported(tmp_path, bundle):
    os.symlink("/etc/passwd", bundle / "passwd")
    problem, _ = _only_problem(bundle)
    assert problem.name == "passwd" and "symlink" in problem.what


def test_manifest_itself_a_symlink(tmp_path, bundle):
    shutil.move(bundle / B.MANIFEST, tmp_path / "m.json")
    os.symlink(tmp_path / "m.json", bundle / B.MANIFEST)
    with pytest.raises(BundleError, match="not a regular file"):
        B.read_manifest(bundle)


def test_newer_schema(bundle):
    rewrite_manifest(bundle, lambda d: d.update(schema="edgekit.bundle/9"))
    expected = (f"bundle schema 'edgekit.bundle/9' is newer than this edgekit ({__version__}) reads "
                "(edgekit.bundle/1): upgrade edgekit")
    with pytest.raises(BundleError) as e:
        B.read_manifest(bundle)
    assert str(e.value) == expected
    assert assert_one_line_error(["inspect", str(bundle)]) == "error: " + expected


@pytest.mark.parametrize("schema", ["other.tool/1", "edgekit.bundle/0", 1, None])
def test_foreign_schema(bundle, schema):
    rewrite_manifest(bundle, lambda d: d.update(schema=schema))
    with pytest.raises(BundleError, match="not an edgekit bundle this version can read"):
        B.read_manifest(bundle)


def test_malformed_json(bundle):
    text = (bundle / B.MANIFEST).read_text()
    (bundle / B.MANIFEST).write_text(text[: len(text) // 2])
    with pytest.raises(BundleError, match=r"is not valid JSON \(line \d+, column \d+"):
        B.read_manifest(bundle)
    assert_one_line_error(["verify", str(bundle)], "not valid JSON")


@pytest.mark.parametrize("text, match", [
    ('{"schema": "edgekit.bundle/1", "schema": "edgekit.bundle/1"}', "repeats the key 'schema'"),
    ('{"schema": NaN}', "NaN"),
    ("[1, 2]", "not a JSON object"),
    ("\xff\xfe", "not UTF-8"),
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
])
def test_odd_json(bundle, text, match):
    (bundle / B.MANIFEST).write_bytes(text.encode("latin-1"))
    with pytest.raises(BundleError, match=match):
        B.read_manifest(bundle)


@pytest.mark.parametrize("key", B.REQUIRED_KEYS[""])
def test_missing_top_level_section(bundle, key):
    rewrite_manifest(bundle, lambda d: d.pop(key))
    with pytest.raises(BundleError) as e:
        B.read_manifest(bundle)
    assert f"no {key!r}" in str(e.value)
    assert_one_line_error(["inspect", str(bundle)], key)


@pytest.mark.parametrize("section, key", [(s, k) for s in ("source", "graph", "memory", "tokenizer", "generation")
                                          for k in B.REQUIRED_KEYS[s][:2]])
def test_missing_nested_key(bundle, section, key):
    rewrite_manifest(bundle, lambda d: d[section].pop(key))
    with pytest.raises(BundleError, match=f"no '{section}.{key}'"):
        B.read_manifest(bundle)


@pytest.mark.parametrize("edit, match", [
    (lambda d: d.update(max_context="1024"), r"max_context is \"1024\", expected an integer > 0"),
    (lambda d: d.update(max_context=True), "max_context is true"),
    (lambda d: d.update(backend="vulkan"), "expected one of onnxruntime-cpu, onnxruntime-cuda, tensorrt"),
    (lambda d: d.update(created="yesterday"), "expected an ISO-8601 time"),
    (lambda d: d["memory"].update(total_bytes=-1), "memory.total_bytes is -1"),
    (lambda d: d["source"].update(sha256="xyz"), "source.sha256"),
    (lambda d: d["files"]["model.onnx"].update(size="3000"), r"files\['model.onnx'\] is"),
    (lambda d: d["graph"]["inputs"].append({"name": 1}), r"graph.inputs\[1\]"),
    (lambda d: d["tokenizer"].update(eos_token_ids=["</s>"]), "eos_token_ids"),
    (lambda d: d.update(engine={"file": "model.engine"}), "engine.file 'model.engine' is not listed"),
    (lambda d: d.update(engine=[]), "engine is \\[\\], expected an object or null"),
    (lambda d: d["files"].update({"manifest.json": d["files"]["model.onnx"]}), "lists itself"),
])
def test_wrong_types(bundle, edit, match):
    rewrite_manifest(bundle, edit)
    with pytest.raises(BundleError, match=match):
        B.read_manifest(bundle)


def test_missing_folder_or_manifest(tmp_path):
    with pytest.raises(BundleError, match="does not exist"):
        B.read_manifest(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BundleError, match="has no manifest.json: it is not an edgekit bundle"):
        B.read_manifest(tmp_path / "empty")
    (tmp_path / "file").write_text("x")
    with pytest.raises(BundleError, match="is not a folder"):
        B.read_manifest(tmp_path / "file")
    assert_one_line_error(["verify", str(tmp_path / "nope")], "does not exist")
    assert_one_line_error(["inspect", str(tmp_path / "empty")], "has no manifest.json")


# ----- CLI ----------------------------------------------------------------------------------------------
def test_cli_inspect_and_verify(bundle):
    code, out, err = run_cli("verify", str(bundle))
    assert (code, out, err) == (0, "ok: 5 files verified\n", "")
    code, out, _ = run_cli("inspect", str(bundle))
    assert code == 0
    assert "tiny-llama: LlamaForCausalLM" in out and "orin-nano-8gb (jetson, compute capability 8.7)" in out
    assert "backend     onnxruntime-cpu (graph dialect ort), precision int4" in out
    assert "context     1024 tokens" in out and "files       5 files" in out
    assert "model.onnx.data" in out and "68.4 KiB" in out and B.read_manifest(bundle).id in out
    code, out, _ = run_cli("inspect", str(bundle), "--json")
    assert code == 0 and json.loads(out) == json.loads((bundle / B.MANIFEST).read_text())


def test_cli_inspect_escapes_terminal_controls(bundle):
    rewrite_manifest(bundle, lambda d: d["target"].update(name="evil\x1b]0;pwned\x07"))
    code, out, _ = run_cli("inspect", str(bundle))
    assert code == 0 and "\x1b" not in out and "evil\\x1b]0;pwned\\x07" in out


# ----- staged output ------------------------------------------------------------------------------------
def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_staged_output_success(tmp_path):
    dest = tmp_path / "out" / "bundle"
    with staged_output(dest, force=False) as tmp:
        assert tmp.parent == dest.parent and tmp.name.startswith(".bundle.tmp-") and not dest.exists()
        make_bundle(tmp)
    assert B.verify(dest).ok and _leftovers(dest.parent) == []
    # The folder gets the user's usual permissions, not mkdtemp's 0700.
    umask = os.umask(0)
    os.umask(umask)
    assert (dest.stat().st_mode & 0o777) == (0o777 & ~umask)


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt()])
def test_staged_output_failure_leaves_nothing(tmp_path, exc):
    dest = tmp_path / "bundle"
    with pytest.raises(type(exc)):
        with staged_output(dest, force=False) as tmp:
            make_bundle(tmp)
            raise exc
    assert not dest.exists() and list(tmp_path.iterdir()) == []


def test_staged_output_existing_dest(tmp_path):
    dest = tmp_path / "bundle"
    make_bundle(dest, seed=1)
    old_id = B.read_manifest(dest).id
    with pytest.raises(OutputError) as e:
        with staged_output(dest, force=False):
            pytest.fail("must not start")
    assert str(e.value) == f"{dest} exists: pass --force to replace it, or choose another -o"
    # force: a failing build keeps the old bundle intact.
    with pytest.raises(RuntimeError):
        with staged_output(dest, force=True) as tmp:
            make_bundle(tmp, seed=2)
            raise RuntimeError("build failed")
    assert B.read_manifest(dest).id == old_id and B.verify(dest).ok and _leftovers(tmp_path) == []
    # force: the old one stays until the new one is complete, then is replaced.
    with staged_output(dest, force=True) as tmp:
        make_bundle(tmp, seed=2)
        assert B.read_manifest(dest).id == old_id
    assert B.read_manifest(dest).id != old_id and B.verify(dest).ok and _leftovers(tmp_path) == []


def test_staged_output_dest_appears_meanwhile(tmp_path):
    dest = tmp_path / "bundle"
    with pytest.raises(OutputError, match="exists: pass --force"):
        with staged_output(dest, force=False) as tmp:
            make_bundle(tmp)
            make_bundle(dest, seed=3)          # another build finished first
    assert B.verify(dest).ok and _leftovers(tmp_path) == []


def test_staged_output_enospc_simulated(tmp_path):
    dest = tmp_path / "bundle"

    def writer(folder):
        (folder / "model.onnx.data").write_bytes(b"\0" * 1000)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(OutputError) as e:
        with staged_output(dest, force=False, expected_bytes=10**15) as tmp:
            try:
                writer(tmp)
            except OSError as err:                 # libraries often wrap the OSError: still recognised
                raise ValueError("save failed") from err
    msg = str(e.value)
    assert msg.startswith(f"no space left on device writing {dest}: free ") and "or choose another -o" in msg
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def tiny_fs(tmp_path):
    """A real 1 MiB tmpfs (needs root and permission to mount); skipped otherwise."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a 1 MiB tmpfs needs root")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_staged_output_enospc_real(tiny_fs):
    dest = tiny_fs / "bundle"
    with pytest.raises(OutputError) as e:
        with staged_output(dest, force=False) as tmp:
            (tmp / "weights.bin").write_bytes(os.urandom(2 * 1024 * 1024))
    msg = str(e.value)
    assert msg.startswith(f"no space left on device writing {dest}: the disk filled after")
    assert list(tiny_fs.iterdir()) == []
    with pytest.raises(OutputError) as e:
        with staged_output(dest, force=False, expected_bytes=3 * 1024 * 1024) as tmp:
            (tmp / "weights.bin").write_bytes(os.urandom(3 * 1024 * 1024))
    # 1 MiB free (the tmpfs is empty again), 3 MiB needed: free 2 MiB.
    assert "free 2.0 MiB or choose another -o" in str(e.value)
    assert list(tiny_fs.iterdir()) == []


def test_huge_integer_is_one_clear_error(bundle):
    import sys

    if not hasattr(sys, "get_int_max_str_digits"):
        pytest.skip("this Python converts integers of any length")
    rewrite_manifest(bundle, lambda d: d.update(max_context=0))
    text = (bundle / B.MANIFEST).read_text().replace('"max_context": 0', '"max_context": ' + "9" * 5000)
    (bundle / B.MANIFEST).write_text(text)
    with pytest.raises(BundleError, match="manifest.json cannot be parsed"):
        B.read_manifest(bundle)


def test_messages_name_the_bundle(bundle):
    rewrite_manifest(bundle, lambda d: d.pop("memory"))
    with pytest.raises(BundleError) as e:
        B.read_manifest(bundle)
    assert str(e.value).startswith(f"{bundle / B.MANIFEST} has no 'memory'")


def test_bundle_modules_import_only_the_standard_library():
    # The runtime imports these on devices that have no build dependencies.
    import ast
    import sys

    for path in sorted(Path(B.__file__).parent.glob("*.py")):
        tree = ast.parse(path.read_text())
        absolute = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        absolute |= {n.module.split(".")[0] for n in ast.walk(tree)
                     if isinstance(n, ast.ImportFrom) and n.level == 0 and n.module}
        assert absolute - {"__future__"} <= set(sys.stdlib_module_names), (path.name, absolute)
