"""Quantized bundles end to end: both dialects agree, TensorRT rules hold, GGUF blocks carried over exactly."""

from __future__ import annotations

import numpy as np
import pytest

from edgekit.build import QuantOptions, build
from edgekit.build.target import load_target
from edgekit.export import GraphOptions, export_onnx
from edgekit.quant.codec import QuantCodec
from edgekit.runtime.ort_backend import OrtDecoder
from edgekit.sources import open_weights, resolve

CONTEXT = 64


def _decode(folder, dialect, spec, ids, steps=8):
    dec = OrtDecoder(str(folder / "model.onnx"), dialect=dialect, spec=spec, capacity=CONTEXT, kv_dtype="float32")
    rows, tokens = [dec.step(ids).copy()], []
    for _ in range(steps):
        tokens.append(int(np.argmax(rows[-1])))
        rows.append(dec.step(np.array(tokens[-1:])).copy())
    return np.stack(rows), tokens


@pytest.mark.parametrize("precision", ["int4", "int8"])
def test_both_dialects_stay_close_to_fp32_at_low_precision(tiny_qwen2_dir, tmp_path, precision):
    """Symmetric RTN in both graphs, with different rounding: MatMulNBits maps a block's signed peak to -8 (any
    scale sign); DequantizeLinear for TensorRT needs scales > 0 (a per-block least-squares scale) and INT8 per
    channel instead of blocks of 32. Over six prompts each graph's logits stay as close to the fp32 graph's as
    the other's (the tiny random model is far more sensitive to INT4 than a trained one). Exactness of the
    tensorrt graph against its own dequantized weights: tests/test_trt_rules.py."""
    source = resolve(tiny_qwen2_dir)
    rng = np.random.default_rng(2)
    prompts = [rng.integers(0, source.spec.vocab_size, 10) for _ in range(6)]
    out = {}
    for dialect, codec in (("ort", None), ("ort", QuantCodec("ort", precision, np.float32, accuracy_level=0)),
                           ("tensorrt", QuantCodec("tensorrt", precision, np.float32))):
        folder = tmp_path / f"{dialect}-{codec is None}"
        folder.mkdir()
        export_onnx(open_weights(source), source.spec, folder, GraphOptions(dialect, "fp32", CONTEXT), codec=codec)
        out["fp32" if codec is None else dialect] = np.stack(
            [_decode(folder, dialect, source.spec, ids, steps=0)[0][0] for ids in prompts])
    error = {d: np.linalg.norm(out[d] - out["fp32"]) / np.linalg.norm(out["fp32"]) for d in ("ort", "tensorrt")}
    # measured: int4 0.479 (ort) / 0.486 (tensorrt), int8 0.042 / 0.057 (per channel vs blocks of 32)
    bound, ratio = (0.6, 1.25) if precision == "int4" else (0.08, 1.6)
    assert max(error.values()) < bound and error["tensorrt"] < ratio * error["ort"], error


@pytest.mark.parametrize("precision", ["int4", "int8"])
def test_tensorrt_bundle_passes_the_checker(tiny_llama_dir, tmp_path, precision):
    import onnx

    from edgekit.export.trt_check import check_tensorrt_graph

    result = build(tiny_llama_dir, load_target("orin-nano"), output=tmp_path / "b", precision=precision,
                   context=CONTEXT, quant=QuantOptions(method="rtn"))
    assert result.manifest["dialect"] == "tensorrt"
    model = tmp_path / "b" / "model.onnx"
    onnx.checker.check_model(str(model), full_check=True)
    spec = resolve(tiny_llama_dir).spec
    report = check_tensorrt_graph(model, spec)
    assert report.ok, report.problems
    # 4 quantized linears per layer (qkv, o, gate_up, down) + the INT8 LM head (tied: shares the embedding)
    if precision == "int4":
        assert report.quantized == {"int4": 4 * spec.num_layers, "int8": 1}
    else:
        assert report.quantized == {"int8": 4 * spec.num_layers + 1}


def test_tensorrt_checker_catches_asymmetric_and_unblocked_int4(tiny_llama_dir, tmp_path):
    import onnx
    from onnx import TensorProto, helper

    from edgekit.export.trt_check import check_tensorrt_graph

    build(tiny_llama_dir, load_target("orin-nano"), output=tmp_path / "b", precision="int4", context=CONTEXT,
          quant=QuantOptions(method="rtn"))
    model = onnx.load(str(tmp_path / "b" / "model.onnx"), load_external_data=False)
    dq = next(n for n in model.graph.node if n.op_type == "DequantizeLinear" and "layers.0.qkv" in n.name)
    for a in dq.attribute:
        if a.name == "block_size":
            a.i = 0
    zp = helper.make_tensor("zp_bad", TensorProto.INT4, [1], [3])
    model.graph.initializer.append(zp)
    other = next(n for n in model.graph.node if n.op_type == "DequantizeLinear" and "layers.0.o" in n.name)
    other.input.append("zp_bad")
    bad = tmp_path / "b" / "bad.onnx"
    onnx.save(model, str(bad))
    problems = check_tensorrt_graph(bad).problems
    assert any("layers.0.qkv" in p and "block_size 0 does not match" in p for p in problems)
    assert any("layers.0.o/" in p and "zero point is not all zeros" in p for p in problems)


def test_block_size_that_does_not_divide_k_is_refused_before_work(tiny_qwen2_dir, tmp_path):
    from click.testing import CliRunner

    from edgekit.cli import cli

    r = CliRunner().invoke(cli, ["build", str(tiny_qwen2_dir), "-t", "orin-nano", "-p", "int4", "-c", "64",
                                 "--block-size", "64", "-o", str(tmp_path / "out")])
    assert r.exit_code == 2 and r.output.count("\n") == 1
    assert "block size 64 does not divide the input size 96" in r.output and "use --block-size 32" in r.output
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []


def test_awq_beats_round_to_nearest(tiny_qwen2_dir, tmp_path):
    from edgekit.build.evaluate import evaluate

    scores = {}
    for method in ("rtn", "awq"):
        build(tiny_qwen2_dir, load_target("cpu"), output=tmp_path / method, precision="int4", context=128,
              quant=QuantOptions(method=method, accuracy_level=0))
        scores[method] = evaluate(tmp_path / method, str(tiny_qwen2_dir), max_tokens=256)
    assert scores["awq"].mean_kl < scores["rtn"].mean_kl
    manifest = (tmp_path / "awq" / "manifest.json").read_text()
    assert '"method": "awq"' in manifest and '"calibration_tokens"' in manifest


@pytest.mark.slow
def test_smollm2_q4_1_imported_losslessly(smollm2_gguf, tmp_path):
    """INT4 bundle from the Q4_1 GGUF, fp32 compute: logits within 1e-3 of transformers, same greedy tokens."""
    import torch
    from refs import hf_gguf_model

    from edgekit.runtime.model import load

    result = build(smollm2_gguf, load_target("cpu"), output=tmp_path / "b", precision="int4", context=256,
                   quant=QuantOptions(accuracy_level=0))
    q = result.manifest["quantization"]
    assert q["lossless"] == {"Q4_1": 210, "Q8_0": 1} and q["requantized"] == {}
    model = load(tmp_path / "b")
    ref = hf_gguf_model(smollm2_gguf)
    ids = model.codec.encode(model.codec.render(model.chat_prompt("Why is the sky blue?")), add_special_tokens=False)
    with torch.no_grad():
        expected = ref.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False)[0].tolist()
        ref_logits = ref(torch.tensor([expected])).logits[0].numpy()          # every position, full precision
    dec = model.decoder
    dec.reset()
    got = [dec.step(np.array(ids)).copy()]
    for t in expected[len(ids):-1]:
        got.append(dec.step(np.array([t])).copy())
    diff = np.abs(np.stack(got) - ref_logits[len(ids) - 1:len(expected) - 1]).max()
    assert diff < 1e-3, f"max logit difference {diff}"
    assert model.generate(prompt=None, messages=model.chat_prompt("Why is the sky blue?"), max_new_tokens=32,
                          temperature=0).tokens == expected[len(ids):]


def test_int4_lm_head_option(tiny_llama_dir, tmp_path):
    from edgekit.export.trt_check import check_tensorrt_graph
    from edgekit.runtime.model import load

    spec = resolve(tiny_llama_dir).spec
    build(tiny_llama_dir, load_target("orin-nano"), output=tmp_path / "trt", precision="int4", context=CONTEXT,
          quant=QuantOptions(method="rtn", head_bits=4))
    report = check_tensorrt_graph(tmp_path / "trt" / "model.onnx", spec)
    assert report.ok, report.problems
    # the LM head INT4; the embedding's INT8 table is dequantized, then gathered
    assert report.quantized == {"int4": 4 * spec.num_layers + 1, "int8": 1}
    result = build(tiny_llama_dir, load_target("cpu"), output=tmp_path / "cpu", precision="int4", context=CONTEXT,
                   quant=QuantOptions(method="rtn", head_bits=4))
    assert "LM head int4" in result.manifest["quantization"]["embedding_and_lm_head"]
    out = load(tmp_path / "cpu").generate(prompt="hello", max_new_tokens=5, temperature=0)
    assert out.completion_tokens == 5


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_mixed_gguf_types_are_carried_over_exactly(tmp_path, arch):
    """Q4_K_M-style files mix block types inside a packed matmul (q/k Q4_1, v Q8_0, gate Q4_0, up Q5_0):
    each part keeps its own exact encoding; fp32 compute reproduces the fp32 export of the same file."""
    from refs import write_tiny_gguf

    types = {f"blk.{i}.{t}.weight": q for i in range(2) for t, q in
             (("attn_q", "Q4_1"), ("attn_k", "Q4_1"), ("attn_v", "Q8_0"), ("ffn_gate", "Q4_0"), ("ffn_up", "Q5_0"))}
    types.update({"token_embd.weight": "Q8_0", "output.weight": "Q8_0"})       # INT8 tables, carried over too
    gguf = write_tiny_gguf(tmp_path / "m.gguf", arch=arch, hidden=64, heads=4, kv_heads=2, intermediate=128,
                           weight_type="Q4_0", types=types).path
    source = resolve(gguf)
    ids = np.arange(3, 12)
    logits = {}
    codecs = {tag: QuantCodec("ort", "int4", np.float32, accuracy_level=0, head_accuracy_level=0,
                              reader=open_weights(source), **kw)
              for tag, kw in (("exact", {}), ("compact", {"exact": False}), ("rtn", {"lossless": False}))}
    for tag, codec in (("fp32", None), *codecs.items()):
        folder = tmp_path / tag
        folder.mkdir()
        export_onnx(open_weights(source), source.spec, folder, GraphOptions("ort", "fp32", CONTEXT), codec=codec)
        logits[tag] = _decode(folder, "ort", source.spec, ids, steps=4)[0]
    exact, compact = codecs["exact"].stats, codecs["compact"].stats
    assert exact.requantized == {} and exact.lossless["Q4_1"] == 4
    assert exact.lossless["Q8_0"] == 4 and exact.lossless["Q5_0"] == 2
    assert np.abs(logits["exact"] - logits["fp32"]).max() < 1e-3
    # compact (--compact-blocks): the 4-bit types and the Q8_0 LM head/embedding stay exact, the 8-bit-coded
    # linears (v Q8_0, up Q5_0) become 4-bit: the logits move by 4-bit rounding, no more than re-quantizing
    # every weight (this random model amplifies rounding: both move by ~70% of the logit range)
    assert compact.lossless["Q4_1"] == 4 and compact.lossless["Q4_0"] == 6 and compact.lossless["Q8_0"] == 2
    assert sum(compact.requantized.values()) == 4
    moved = {tag: np.abs(logits[tag] - logits["fp32"]).max() for tag in ("compact", "rtn")}
    assert 1e-3 < moved["compact"] <= 1.05 * moved["rtn"]
