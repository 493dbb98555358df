"""The memory planner and `edgekit plan`: byte counts against independent references, verdicts on the real
R1-Distill shapes, and one-line errors with exit 2 for every kind of bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from edgekit.build.memory_plan import plan
from edgekit.build.precision import POLICIES, WeightFormat, policy, weight_bytes
from edgekit.build.target import load_target
from edgekit.cli import cli
from edgekit.errors import UserInputError
from edgekit.spec import ModelSpec, spec_from_config_file
from edgekit.units import GiB, MiB

CONFIGS = Path(__file__).parent / "fixtures" / "configs"
QWEN_1_5B = CONFIGS / "DeepSeek-R1-Distill-Qwen-1.5B"


def spec_of(short: str) -> ModelSpec:
    return spec_from_config_file(CONFIGS / f"DeepSeek-R1-Distill-{short}" / "config.json")


def plan_of(short: str, target: str, precision: str = "int4", context: int = 4096, **kw):
    return plan(spec_of(short), load_target(target), precision=precision, context=context, **kw)


# ----- the precision table against independent references ---------------------------------------------
def _int4_reference_nbytes(w: np.ndarray, block: int) -> int:
    """Quantize like MatMulNBits stores it: symmetric blocks along the input, two nibbles per byte."""
    rows, cols = w.shape
    padded = np.zeros((rows, -(-cols // block) * block), dtype=np.float32)
    padded[:, :cols] = w
    blocks = padded.reshape(rows, -1, block)                               # (rows, n_blocks, block)
    scales = (np.abs(blocks).max(axis=2) / 7).astype(np.float16)           # (rows, n_blocks)
    q = np.clip(np.round(blocks / np.maximum(scales[..., None].astype(np.float32), 1e-8)), -8, 7)
    nibbles = (q.astype(np.int8) & 0x0F).astype(np.uint8).reshape(rows, -1)
    packed = nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)                    # (rows, padded_cols / 2)
    return packed.nbytes + scales.nbytes


@pytest.mark.parametrize("shape", [(64, 96), (3, 70), (151, 1536)])
@pytest.mark.parametrize("block", [32, 128])
def test_int4_bytes_match_a_real_packing(shape, block):
    w = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    assert policy("int4", int4_block_size=block).linear.nbytes(*shape) == _int4_reference_nbytes(w, block)


def test_int8_per_channel_bytes_match_a_real_quantization():
    w = np.random.default_rng(1).standard_normal((40, 72)).astype(np.float32)
    scales = (np.abs(w).max(axis=1) / 127).astype(np.float16)               # (rows,)
    q = np.round(w / scales[:, None].astype(np.float32)).astype(np.int8)
    assert POLICIES["int8"].linear.nbytes(40, 72) == q.nbytes + scales.nbytes


def test_policy_table():
    assert POLICIES["int4"].linear.describe() == "int4 block 32, fp16 scales"
    for p in ("int4", "int8"):
        assert POLICIES[p].embedding.describe() == "int8 per-row, fp16 scales"
        assert POLICIES[p].lm_head.describe() == "int8 per-channel, fp16 scales"
    for p in ("fp32", "fp16", "bf16"):
        pol = POLICIES[p]
        assert pol.linear == pol.embedding == pol.lm_head == WeightFormat(p)
    with pytest.raises(UserInputError, match="invalid INT4 block size 24"):
        policy("int4", int4_block_size=24)


@pytest.mark.parametrize("precision, per_param", [("fp32", 4), ("fp16", 2), ("bf16", 2)])
def test_dense_weights_are_parameters_times_dtype(precision, per_param):
    for short in ("Qwen-1.5B", "Llama-8B"):
        spec = spec_of(short)
        assert weight_bytes(spec, precision, "gpu").total == per_param * spec.parameters


def test_int4_weights_of_qwen_1_5b_by_hand():
    s = spec_of("Qwen-1.5B")
    w = weight_bytes(s, "int4", "gpu")
    per_layer = sum(o * i // 2 + o * (i // 32) * 2 for o, i in
                    [(1536, 1536), (256, 1536), (256, 1536), (1536, 1536), (8960, 1536), (8960, 1536), (1536, 8960)])
    assert w.linears == 28 * per_layer
    assert w.embedding == w.lm_head == 151936 * 1536 + 151936 * 2
    assert w.small == (28 * (2 * 1536 + 1536 + 2 * 256) + 1536) * 2         # norms + q/k/v biases, fp16
    assert w.largest_tensor == ("lm_head", 151936 * 1536)
    # On the CPU the small tensors are fp32.
    assert weight_bytes(s, "int4", "cpu").small == 2 * w.small


# ----- the plan -----------------------------------------------------------------------------------
@pytest.mark.parametrize("short, target, precision, fits", [
    ("Qwen-1.5B", "orin-nano", "int4", True),
    ("Qwen-14B", "orin-nano", "int4", False),
    ("Qwen-32B", "orin-nano", "int4", False),
    ("Qwen-1.5B", "orin-nano-4gb", "fp16", False),
    ("Qwen-32B", "rtx-4090", "int4", True),
    ("Llama-70B", "rtx-6000-ada", "int4", True),
    ("Llama-70B", "rtx-4090", "int4", False),
])
def test_verdicts(short, target, precision, fits):
    p = plan_of(short, target, precision)
    assert p.fits is fits
    assert (p.total_bytes <= p.budget_bytes) is fits


@pytest.mark.parametrize("short, target, kv_dtype, per_token", [
    ("Qwen-1.5B", "orin-nano", "fp16", 2 * 28 * 2 * 128 * 2),
    ("Qwen-7B", "rtx-4090", "fp16", 2 * 28 * 4 * 128 * 2),
    ("Llama-8B", "rtx-4090", "fp16", 2 * 32 * 8 * 128 * 2),
    ("Llama-70B", "rtx-6000-ada", "fp16", 2 * 80 * 8 * 128 * 2),
    ("Qwen-1.5B", "cpu", "fp32", 2 * 28 * 2 * 128 * 4),
])
def test_kv_bytes_exact(short, target, kv_dtype, per_token):
    p = plan_of(short, target, context=3000)
    assert (p.kv_dtype, p.kv_bytes_per_token, p.kv_bytes) == (kv_dtype, per_token, per_token * 3000)


def test_kv_dtype_follows_the_backend():
    assert plan_of("Qwen-1.5B", "orin-nano", backend="onnxruntime-cpu").kv_dtype == "fp32"
    assert plan_of("Qwen-1.5B", "rtx-4090", "fp32").kv_dtype == "fp32"
    assert plan_of("Qwen-1.5B", "rtx-4090", "bf16").kv_dtype == "bf16"


def test_breakdown_adds_up_and_workspace_is_derived():
    p = plan_of("Qwen-1.5B", "orin-nano", context=4096)
    assert p.total_bytes == p.weights_bytes + p.kv_bytes + p.workspace_bytes + p.overhead_bytes
    assert p.weights_bytes == weight_bytes(spec_of("Qwen-1.5B"), "int4", dialect="tensorrt", context=4096).total
    t = load_target("orin-nano")
    assert p.overhead_bytes == t.backend("tensorrt").overhead_bytes and p.budget_bytes == t.budget_bytes
    work = {w.name: w.bytes for w in p.workspace}
    chunk = t.prefill_chunk
    assert p.prefill_chunk == chunk
    assert work["attention scores"] == chunk * 4096 * 12 * 4
    assert work["MLP intermediates"] == chunk * 3 * 8960 * 2
    assert work["hidden states"] == chunk * (2 * 1536 + 2 * 1536 + 2 * 256) * 2
    assert work["logits"] == 151936 * 4
    for line in (*p.weights, p.kv, *p.workspace, p.overhead, p.budget, p.largest_allocation):
        assert line.source, line


def test_chunk_is_capped_by_a_short_context():
    p = plan_of("Qwen-1.5B", "orin-nano", context=100)
    assert p.prefill_chunk == 100


def test_max_context_is_the_boundary():
    spec, t = spec_of("Qwen-1.5B"), load_target("orin-nano")
    p = plan(spec, t, precision="fp16", context=4096)
    assert 4096 < p.max_context < spec.max_position_embeddings
    assert plan(spec, t, precision="fp16", context=p.max_context).fits
    assert not plan(spec, t, precision="fp16", context=p.max_context + 1).fits


def test_max_context_capped_and_zero():
    assert plan_of("Qwen-1.5B", "agx-orin-64gb").max_context == 131072
    p = plan_of("Qwen-14B", "orin-nano")
    assert p.max_context == 0 and p.fitting_precision is None


def test_fitting_precision_is_the_most_faithful_that_fits():
    assert plan_of("Qwen-1.5B", "orin-nano", "fp32").fitting_precision == "fp16"
    assert plan_of("Qwen-32B", "rtx-4090", "fp8").fitting_precision == "int4"
    assert plan_of("Qwen-1.5B", "orin-nano", "int4").fitting_precision is None     # it fits


def test_cma_warning_for_the_lm_head_on_jetson():
    p = plan_of("Qwen-7B", "orin-nano", "int4")
    assert p.largest_allocation.name == "LM head"
    assert p.largest_allocation.bytes == 152064 * 3584 > 256 * MiB
    assert any("CMA pool" in w and "LM head" in w for w in p.warnings)
    fp16 = plan_of("Qwen-1.5B", "orin-nano", "fp16")
    assert any("CMA pool" in w and "use int4/int8" in w for w in fp16.warnings)
    # int8 LM head of the 1.5B: 151936 x 1536 bytes = 222.6 MiB, under the pool.
    assert not any("CMA" in w for w in plan_of("Qwen-1.5B", "orin-nano", "int4").warnings)
    # No CMA pool on desktop GPUs.
    assert not any("CMA" in w for w in plan_of("Qwen-32B", "rtx-4090").warnings)


def test_budget_override_and_bad_context():
    p = plan_of("Qwen-1.5B", "orin-nano", budget=2 * GiB)
    assert p.budget_bytes == 2 * GiB and not p.fits
    with pytest.raises(UserInputError, match="at most 131072"):
        plan_of("Qwen-1.5B", "orin-nano", context=200_000)
    with pytest.raises(UserInputError, match="positive number of tokens"):
        plan_of("Qwen-1.5B", "orin-nano", context=0)


def test_decode_bound_uses_the_bandwidth():
    nano, sup = plan_of("Qwen-1.5B", "orin-nano"), plan_of("Qwen-1.5B", "orin-nano-super")
    assert sup.decode_tokens_per_s == pytest.approx(nano.decode_tokens_per_s * 102 / 68)


# ----- the CLI ------------------------------------------------------------------------------------
def run(*args):
    return CliRunner().invoke(cli, ["plan", *map(str, args)])


def test_cli_fits_exit_0():
    r = run(QWEN_1_5B, "--target", "orin-nano")
    assert r.exit_code == 0, r.output
    assert "fits: " in r.stdout and "largest context that fits at int4" in r.stdout
    for row in ("linear weights", "embedding", "LM head", "KV cache", "attention scores", "runtime overhead",
                "budget", "largest allocation"):
        assert row in r.stdout


def test_cli_does_not_fit_exit_3():
    r = run(CONFIGS / "DeepSeek-R1-Distill-Qwen-1.5B", "-t", "orin-nano", "-p", "fp32")
    assert r.exit_code == 3
    assert "does not fit" in r.stdout and "fits at context 4096 as tensorrt fp16, int8, int4;" in r.stdout
    assert "largest context that fits at fp32" in r.stdout or "no context fits at fp32" in r.stdout


def test_cli_json():
    r = run(QWEN_1_5B, "-t", "rtx-4090", "--context", "8k", "--json")
    assert r.exit_code == 0
    d = json.loads(r.stdout)
    p = plan_of("Qwen-1.5B", "rtx-4090", context=8192)
    expected = {"parameters": 1_777_088_000, "weights_bytes": p.weights_bytes, "kv_bytes": 28672 * 8192,
                "overhead_bytes": p.overhead_bytes, "workspace_bytes": p.workspace_bytes,
                "total_bytes": p.total_bytes, "budget_bytes": p.budget_bytes, "fits": True,
                "max_context": p.max_context, "largest_allocation_bytes": p.largest_allocation.bytes,
                "context": 8192, "precision": "int4", "backend": "tensorrt"}
    assert {k: d[k] for k in expected} == expected
    assert [w["name"] for w in d["breakdown"]["weights"]] == ["linear weights", "embedding", "LM head",
                                                              "norms, biases, rotary"]
    assert d["warnings"] == []


def test_cli_json_does_not_fit_exit_3():
    r = run(CONFIGS / "DeepSeek-R1-Distill-Qwen-32B", "-t", "orin-nano", "--json")
    assert r.exit_code == 3 and json.loads(r.stdout)["fits"] is False


def test_cli_default_context_is_capped(tmp_path):
    config = json.loads((QWEN_1_5B / "config.json").read_text())
    config["max_position_embeddings"] = 2048
    (tmp_path / "config.json").write_text(json.dumps(config))
    r = run(tmp_path, "-t", "orin-nano", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["context"] == 2048


def _bad_inputs(tmp: Path) -> dict[str, tuple[list[str], str]]:
    """name -> (arguments, a substring of the one-line error)."""
    (tmp / "empty").mkdir()
    (tmp / "badjson").mkdir()
    (tmp / "badjson" / "config.json").write_text('{"architectures": ["Qwen2ForCausalLM"], ')
    (tmp / "nofields").mkdir()
    (tmp / "nofields" / "config.json").write_text('{"architectures": ["Qwen2ForCausalLM"], "hidden_size": 64}')
    (tmp / "mistral").mkdir()
    config = json.loads((QWEN_1_5B / "config.json").read_text())
    (tmp / "mistral" / "config.json").write_text(json.dumps(dict(config, architectures=["MistralForCausalLM"])))
    q = str(QWEN_1_5B)
    cases = {
        "missing path": ([str(tmp / "nope"), "-t", "orin-nano"], "no such model"),
        "no config.json": ([str(tmp / "empty"), "-t", "orin-nano"], "has no config.json"),
        "bad json": ([str(tmp / "badjson"), "-t", "orin-nano"], "is not valid JSON"),
        "missing fields": ([str(tmp / "nofields"), "-t", "orin-nano"], "missing or has a malformed field"),
        "unknown architecture": ([str(tmp / "mistral"), "-t", "orin-nano"], "edgekit builds LlamaForCausalLM, "
                                 "Qwen2ForCausalLM"),
        "unknown target": ([q, "-t", "orin-nan"], "did you mean orin-nano"),
        "fp8 on orin-nano": ([q, "-t", "orin-nano", "-p", "fp8"], "fp8 is not supported on orin-nano-8gb (SM 8.7)"),
        "bad context": ([q, "-t", "orin-nano", "-c", "lots"], "invalid context 'lots'"),
        "context too long": ([q, "-t", "orin-nano", "-c", "1000000"], "at most 131072"),
        "bad budget": ([q, "-t", "orin-nano", "--budget", "lots"], "invalid size 'lots'"),
    }
    from edgekit.sources import packaged_model_path

    truncated = tmp / "truncated.gguf"
    truncated.write_bytes(packaged_model_path("smollm2").read_bytes()[:64])
    cases["truncated gguf"] = ([str(truncated), "-t", "orin-nano"], "truncated")
    return cases


BAD_INPUT_NAMES = ["missing path", "no config.json", "bad json", "missing fields", "unknown architecture",
                   "unknown target", "fp8 on orin-nano", "bad context", "context too long", "bad budget",
                   "truncated gguf"]


@pytest.mark.parametrize("case", BAD_INPUT_NAMES)
def test_cli_bad_input_one_line_exit_2(tmp_path, case):
    args, message = _bad_inputs(tmp_path)[case]
    r = run(*args)
    assert r.exit_code == 2, (r.stdout, r.stderr)
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: ") and message in r.stderr, r.stderr
    assert "Traceback" not in r.output and r.stdout == ""


def _console_script() -> str | None:
    local = Path(sys.executable).with_name("edgekit")
    return str(local) if local.is_file() else shutil.which("edgekit")


def test_console_script_exit_codes(tmp_path):
    """The installed `edgekit` script, in a real process: 0 fits, 3 does not fit, 2 bad input (one line)."""
    exe = _console_script()
    if exe is None:
        pytest.skip("the edgekit console script is not installed")
    cases = _bad_inputs(tmp_path)
    runs = [([str(QWEN_1_5B), "-t", "orin-nano"], 0, None),
            ([str(CONFIGS / "DeepSeek-R1-Distill-Qwen-14B"), "-t", "orin-nano", "--json"], 3, None)]
    runs += [(cases[name][0], 2, cases[name][1])
             for name in ("no config.json", "fp8 on orin-nano", "bad json", "truncated gguf")]
    for args, code, message in runs:
        p = subprocess.run([exe, "plan", *args], capture_output=True, text=True, timeout=60)
        assert p.returncode == code, (args, p.stdout, p.stderr)
        assert "Traceback" not in p.stderr
        if message:
            assert p.stderr.count("\n") == 1 and message in p.stderr, p.stderr
    t = subprocess.run([exe, "targets", "--json"], capture_output=True, text=True, timeout=60)
    assert t.returncode == 0 and len(json.loads(t.stdout)) == 12


def test_cli_plan_packaged_smollm2():
    r = run("smollm2", "-t", "cpu", "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["parameters"] == 134_515_008 and d["kv_bytes_per_token"] == 2 * 30 * 3 * 64 * 4
    assert d["breakdown"]["weights"][2]["bytes"] == 0          # tied LM head is stored once
