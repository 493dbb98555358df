"""One storage model: what `edgekit plan` counts is exactly what `edgekit build` writes, for every dialect,
precision and kind of source, and an INT4 bundle of a K-quant GGUF is no bigger than the GGUF."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgekit.build import QuantOptions, build
from edgekit.build.target import load_target

CONTEXT = 128
# (target, backend): the three graph flavours: ort fp32 (CPU), ort fp16 (CUDA), tensorrt fp16
TARGETS = [("cpu", None), ("rtx-4090", "onnxruntime-cuda"), ("orin-nano", None)]
# A Q4_K_M-style mix: Q4_K almost everywhere, Q6_K for v, down and the LM head (K-quants need K % 256 == 0)
KMIX = {"token_embd.weight": "Q4_K", "output.weight": "Q6_K",
        **{f"blk.{i}.{t}.weight": q for i in range(2) for t, q in
           (("attn_q", "Q4_K"), ("attn_k", "Q4_K"), ("attn_v", "Q6_K"), ("attn_output", "Q4_K"),
            ("ffn_gate", "Q4_K"), ("ffn_up", "Q4_K"), ("ffn_down", "Q6_K"))}}


@pytest.fixture(scope="module")
def sources(tiny_qwen2_dir, tmp_path_factory):
    from refs import write_tiny_gguf

    folder = tmp_path_factory.mktemp("plan-sources")
    out = {"hf": tiny_qwen2_dir}
    for kind in ("Q4_0", "Q4_1", "Q8_0"):
        out[kind] = write_tiny_gguf(folder / f"{kind}.gguf", weight_type=kind, hidden=64, intermediate=128,
                                    types={"token_embd.weight": kind, "output.weight": kind}).path
    out["kmix"] = write_tiny_gguf(folder / "kmix.gguf", hidden=256, heads=4, kv_heads=2, intermediate=512,
                                  types=KMIX).path
    return out


def _tensor_bytes(path) -> int:
    import gguf

    return sum(int(t.n_bytes) for t in gguf.GGUFReader(path).tensors)


@pytest.mark.parametrize("target, backend", TARGETS)
@pytest.mark.parametrize("precision", ["int4", "int8"])
@pytest.mark.parametrize("kind", ["hf", "Q4_0", "Q4_1", "Q8_0", "kmix"])
def test_planned_weight_bytes_equal_the_built_bundle(sources, tmp_path, kind, precision, target, backend):
    result = build(sources[kind], load_target(target), output=tmp_path / "b", precision=precision,
                   context=CONTEXT, backend=backend, quant=QuantOptions(method="rtn"))
    manifest = json.loads((result.bundle / "manifest.json").read_text())
    built = manifest["memory"]["weights_bytes"]
    assert result.plan.weights_bytes == built
    # and the manifest's figure is what the graph really holds: every initializer of the ONNX file
    import onnx

    model = onnx.load(result.bundle / "model.onnx", load_external_data=False)
    inputs = {i.name for i in model.graph.input}    # an input's default (logits_rows) is not a weight
    held = sum(_initializer_bytes(t) for t in model.graph.initializer
               if not t.name.startswith("const_") and t.name not in inputs)
    assert held == built


def _initializer_bytes(t) -> int:
    from onnx import TensorProto, helper

    external = {e.key: e.value for e in t.external_data}
    if "length" in external:
        return int(external["length"])
    if t.raw_data:
        return len(t.raw_data)
    n = int(np.prod(t.dims)) if t.dims else 1
    if t.data_type in (TensorProto.INT4, TensorProto.UINT4):
        return (n + 1) // 2
    return n * helper.tensor_dtype_to_np_dtype(t.data_type).itemsize


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_dense_plans_equal_the_build(sources, tmp_path, precision):
    target, backend = ("cpu", None) if precision == "fp32" else ("rtx-4090", "onnxruntime-cuda")
    result = build(sources["kmix"], load_target(target), output=tmp_path / "b", precision=precision,
                   context=CONTEXT, backend=backend)
    assert result.plan.weights_bytes == json.loads((result.bundle / "manifest.json").read_text())["memory"][
        "weights_bytes"]


@pytest.mark.parametrize("exact, ceiling", [(False, 1.05), (True, 1.20)])     # --compact-blocks, the default
def test_k_quant_bundle_size_against_the_gguf(sources, tmp_path, exact, ceiling):
    """Q4_K carried with its own sub-block scales (4.625 bits vs 4.5), Q6_K linears re-quantized to 4 bits
    with --compact-blocks, kept as 8-bit codes by default; the norms and rotary tables are extra (the rotary tables
    grow with the context: this tiny model is 128 positions)."""
    gguf_bytes = _tensor_bytes(sources["kmix"])
    result = build(sources["kmix"], load_target("cpu"), output=tmp_path / "b", precision="int4", context=CONTEXT,
                   quant=QuantOptions(exact=exact))
    manifest = json.loads((result.bundle / "manifest.json").read_text())
    q = manifest["quantization"]
    assert q["gguf_blocks"] == ("exact" if exact else "compact")
    assert q["lossless"]["Q4_K"] == 1 + 2 * 5                     # embedding + q, k, o, gate, up
    if exact:
        assert q["lossless"]["Q6_K"] == 2 * 2 + 1 and not q["requantized"]     # with the LM head
    else:
        assert sum(q["requantized"].values()) == 2 * 2 + 1       # v, down and the LM head
    assert manifest["memory"]["weights_bytes"] <= ceiling * gguf_bytes


def test_plan_warns_when_building_needs_more_memory_than_this_machine_has(tmp_path):
    """A dense build converts the embedding whole: a 1M x 16k vocabulary needs ~134 GB here, more than any
    test machine has; the plan says so (the device plan itself is unaffected)."""
    from pathlib import Path

    from click.testing import CliRunner

    from edgekit.cli import cli

    config = json.loads((Path(__file__).parent / "fixtures/configs/DeepSeek-R1-Distill-Qwen-1.5B/config.json")
                        .read_text())
    config.update(vocab_size=1 << 20, hidden_size=16384, num_attention_heads=128, num_key_value_heads=8)
    folder = tmp_path / "huge-vocab"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    result = CliRunner().invoke(cli, ["plan", str(folder), "--target", "rtx-6000-ada", "-p", "fp16", "--json"])
    warnings = json.loads(result.output)["warnings"]
    assert any(w.startswith("building this model at fp16 needs about ") and "this machine has" in w
               and w.endswith("build on a machine with more memory, or close other programs") for w in warnings)
    small = CliRunner().invoke(cli, ["plan", str(folder), "--target", "rtx-6000-ada", "-p", "int4", "--json"])
    assert not any("building this model" in w for w in json.loads(small.output)["warnings"])


def test_build_progress_counts_bytes_in_plain_lines_when_not_a_terminal(sources, tmp_path):
    from click.testing import CliRunner

    from edgekit.cli import cli

    result = CliRunner().invoke(cli, ["build", str(sources["kmix"]), "--target", "cpu", "-p", "int4", "-c", "128",
                                      "-o", str(tmp_path / "b"), "--no-cache"])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("export: ")]
    planned = json.loads((tmp_path / "b" / "manifest.json").read_text())["memory"]["weights_bytes"]
    from edgekit.units import fmt_bytes

    assert lines and lines[-1].startswith(f"export: {fmt_bytes(planned)} of {fmt_bytes(planned)} (100%)")
