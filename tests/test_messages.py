"""Wrong or unhelpful messages (issue 13): each one is checked by its exact text, and where a message
suggests a command, the suggestion is checked to work."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgekit.cli import cli

CONFIGS = Path(__file__).parent / "fixtures" / "configs"
QWEN_1_5B = CONFIGS / "DeepSeek-R1-Distill-Qwen-1.5B"


def _error_line(result) -> str:
    """The one line of stderr (``result`` is a click Result, or the stderr text)."""
    stderr = result if isinstance(result, str) else result.stderr
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    return lines[0]


def test_a_400_digit_memory_budget_is_one_line(tiny_bundle):
    r = CliRunner().invoke(cli, ["run", str(tiny_bundle), "hi", "--memory-budget", "9" * 400])
    assert r.exit_code == 2
    assert _error_line(r) == (f"error: invalid size '{'9' * 40}'... (400 characters): more than any machine has "
                              "(at most 1 EiB), e.g. 3.5GiB")


@pytest.mark.parametrize("text, value", [("3.3GB", 3_300_000_000), ("3.5GiB", 3_758_096_384), (".5KiB", 512),
                                         ("0" * 500 + "2KiB", 2048), ("0." + "0" * 500 + "5GiB", 0)])
def test_sizes_are_parsed_exactly(text, value):
    from edgekit.errors import UserInputError
    from edgekit.units import parse_size

    if value:
        assert parse_size(text) == value
    else:
        with pytest.raises(UserInputError, match="it must be positive"):
            parse_size(text)


def test_engine_on_a_cpu_bundle_suggests_a_build_that_exists(tiny_bundle):
    from edgekit.build.target import check_combination, load_target

    r = CliRunner().invoke(cli, ["engine", str(tiny_bundle)])
    assert r.exit_code == 2
    assert _error_line(r) == (
        f"error: bundle {tiny_bundle} holds the 'ort' graph dialect (built for onnxruntime-cpu on cpu), which "
        "TensorRT cannot build: rebuild it for TensorRT with edgekit build MODEL --target orin-nano, or another "
        "GPU target from edgekit targets")
    check_combination(load_target("orin-nano"), "tensorrt", "fp32")     # the suggestion is valid


def test_plan_names_every_backend_and_precision_that_fits():
    # (at 4096 nothing fits since onnxruntime CPU's repacked int4 weights are counted; at 2048 the CPU does)
    r = CliRunner().invoke(cli, ["plan", str(QWEN_1_5B), "-t", "orin-nano-4gb", "-c", "2048"])
    assert r.exit_code == 3
    assert next(x for x in r.stdout.splitlines() if x.startswith("does not fit")) == (
        "does not fit: needs 2.08 GiB, budget 1.86 GiB (111%); no context fits at int4; fits at context 2048 as "
        "onnxruntime-cpu int4 (choose with --backend and --precision)")
    ok = CliRunner().invoke(cli, ["plan", str(QWEN_1_5B), "-t", "orin-nano-4gb", "--backend", "onnxruntime-cpu",
                                  "--precision", "int4", "-c", "2048"])
    assert ok.exit_code == 0 and "fits: " in ok.stdout
    d = json.loads(CliRunner().invoke(cli, ["plan", str(QWEN_1_5B), "-t", "orin-nano-4gb", "-c", "2048",
                                            "--json"]).stdout)
    assert d["fits_with"] == [{"backend": "onnxruntime-cpu", "precision": "int4"}]


def test_build_that_does_not_fit_suggests_the_backend_that_does(tmp_path):
    r = CliRunner().invoke(cli, ["build", str(QWEN_1_5B), "-t", "orin-nano-4gb", "-c", "2048", "-o",
                                 str(tmp_path / "b")])
    assert r.exit_code == 3
    assert "use --backend onnxruntime-cpu --precision int4, or pass --force" in _error_line(r)


def test_backend_messages_name_the_flag(tiny_bundle):
    r = CliRunner().invoke(cli, ["run", str(tiny_bundle), "hi", "--backend", "onnxruntime-cuda"])
    assert r.exit_code == 2
    assert _error_line(r) == (
        "error: onnxruntime-cuda was requested but this onnxruntime has no CUDA provider: install onnxruntime-gpu "
        "(on Jetson, from NVIDIA's Jetson wheels) or use the onnxruntime-cpu backend (--backend onnxruntime-cpu)")
    import edgekit

    sources = "".join(p.read_text() for p in Path(edgekit.__file__).parent.rglob("*.py"))
    assert "backend='onnxruntime" not in sources


def test_run_with_tensorrt_on_a_cpu_bundle_says_what_it_is_built_for(tiny_bundle):
    r = CliRunner().invoke(cli, ["run", str(tiny_bundle), "hi", "--backend", "tensorrt"])
    assert r.exit_code == 2
    assert _error_line(r) == (
        f"error: bundle {tiny_bundle} is built for onnxruntime-cpu (target cpu), not TensorRT: run it with the "
        "onnxruntime-cpu backend (--backend onnxruntime-cpu, or auto), or build a TensorRT bundle for a GPU target "
        "(edgekit build MODEL --target orin-nano)")


def test_head_dim_error_suggests_a_flag_that_exists(tmp_path):
    from tiny_models import make_tiny

    make_tiny("qwen2", tmp_path / "m", num_attention_heads=8, num_key_value_heads=2)     # head_dim 8
    r = CliRunner().invoke(cli, ["build", str(tmp_path / "m"), "-t", "cpu", "-p", "fp32", "--no-cache",
                                 "-o", str(tmp_path / "b")])
    assert r.exit_code == 2 and r.stderr.startswith("building m ")       # the one progress line, then the error
    assert _error_line(r.stderr.split("\n", 1)[1]) == (
        "error: head_dim 8 is not a multiple of 16, which onnxruntime's fused attention (the graph of "
        "onnxruntime-cpu and onnxruntime-cuda bundles) needs: build this model for TensorRT (--backend tensorrt "
        "on a GPU target, whose graph uses standard ONNX ops)")
    build_flags = {o for p in cli.commands["build"].params for o in p.opts}
    assert "--backend" in build_flags and "--dialect" not in build_flags


def test_build_reports_the_lm_head_precision_it_used(tiny_qwen2_dir, tmp_path):
    r = CliRunner().invoke(cli, ["build", str(tiny_qwen2_dir), "-t", "cpu", "-p", "int4", "--method", "rtn",
                                 "--block-size", "16", "--lm-head", "int4", "--no-cache", "-o", str(tmp_path / "b")])
    assert r.exit_code == 0, r.output
    line = next(x for x in r.stderr.splitlines() if x.startswith("quantization:"))
    assert line.startswith("quantization: rtn, int4 block 16, embedding int8, LM head int4"), line
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["quantization"]["embedding_and_lm_head"] == "embedding int8, LM head int4"


def test_chat_answers_unknown_commands_with_the_list(tiny_bundle, monkeypatch):
    from edgekit.runtime.model import Model

    sent = []
    real_stream = Model.stream

    def stream(self, prompt=None, **kw):
        sent.append([dict(m) for m in kw["messages"]])       # (the CLI appends the reply to its list later)
        return real_stream(self, prompt, **kw)

    monkeypatch.setattr(Model, "stream", stream)
    r = CliRunner().invoke(cli, ["chat", str(tiny_bundle), "-n", "2"],
                           input="/help\n/exti\n//tmp is a folder\n/exit\n")
    assert r.exit_code == 0, r.output
    commands = ("commands: /reset clears the conversation, /exit (or /quit, /bye, Ctrl-D) quits, /help shows this; "
                "start a message with // to send a line that begins with /")
    assert commands in r.stderr.splitlines()
    assert f"unknown command /exti: {commands}" in r.stderr.splitlines()
    assert [m[-1]["content"] for m in sent] == ["/tmp is a folder"]        # only the escaped line reached the model


def _fake_distribution(site: Path, name: str, version: str) -> None:
    info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    (info / "RECORD").write_text(f"onnxruntime/__init__.py,,\n{info.name}/METADATA,,\n")


def test_doctor_names_the_onnxruntime_clash_and_the_fix(tmp_path):
    """onnxruntime and onnxruntime-gpu both installed: a real `edgekit doctor` process sees both distributions."""
    from importlib.metadata import version

    _fake_distribution(tmp_path / "site", "onnxruntime-gpu", "1.31.0")
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "site"))
    out = subprocess.run([sys.executable, "-m", "edgekit.cli", "doctor"], capture_output=True, text=True, env=env,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    rows = {line.split("  ")[0]: line.split("  ", 1)[1].strip() for line in out.stdout.splitlines()}
    cpu = version("onnxruntime")
    fix = (f"onnxruntime {cpu} and onnxruntime-gpu 1.31.0 are both installed and overwrite each other's files in "
           "the one onnxruntime module: uninstall both (pip uninstall -y onnxruntime onnxruntime-gpu), then install "
           "one (pip install onnxruntime-gpu for the GPU, or onnxruntime for the CPU only)")
    assert rows["onnxruntime clash"] == fix
    assert rows["onnxruntime"].startswith(f"{cpu}, providers of this build")     # the module that imports, not 1.31
    assert rows["backend onnxruntime-cuda"] == f"no: the onnxruntime module has no CUDA provider because {fix}"
    plain = subprocess.run([sys.executable, "-m", "edgekit.cli", "doctor", "--json"], capture_output=True,
                           text=True, timeout=120)
    assert json.loads(plain.stdout)["onnxruntime_clash"] is None


def test_no_extra_installs_two_onnxruntime_packages():
    """An extra cannot remove the base onnxruntime: one that adds onnxruntime-gpu would install both."""
    try:
        import tomllib
    except ImportError:
        import tomli as tomllib
    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]

    def runtimes(deps):
        names = {d.split(";")[0].split("[")[0].strip().split(">")[0].split("=")[0].split("<")[0].strip().lower()
                 for d in deps}
        return {n for n in names if n == "onnxruntime" or n.startswith("onnxruntime-") and n != "onnxruntime-genai"}

    base = runtimes(project["dependencies"])
    assert base == {"onnxruntime"}
    for extra, deps in project["optional-dependencies"].items():
        assert len(base | runtimes(deps)) == 1, extra
