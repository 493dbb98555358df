"""The exported graph against transformers (fp32): prompt + decode steps through the static KV cache."""

from __future__ import annotations

import numpy as np
import pytest

from edgekit.export import GraphOptions, export_onnx
from edgekit.runtime.ort_backend import OrtDecoder
from edgekit.sources import open_weights, resolve

CONTEXT = 64


def _reference(folder, ids):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.numpy()[0]          # (seq, vocab)


@pytest.fixture(scope="module", params=["qwen2", "llama"])
def tiny(request, tiny_qwen2_dir, tiny_llama_dir):
    folder = tiny_qwen2_dir if request.param == "qwen2" else tiny_llama_dir
    source = resolve(folder)
    ids = np.random.default_rng(1).integers(0, source.spec.vocab_size, (1, 14))
    return request.param, source, ids, _reference(folder, ids)


@pytest.mark.parametrize("dialect", ["ort", "tensorrt"])
def test_prompt_and_decode_steps_match_transformers(tiny, dialect, tmp_path):
    """All-position logits for a chunked prefill (5 + 3 tokens) and then 6 single-token decode steps."""
    kind, source, ids, ref = tiny
    spec = source.spec
    assert spec.num_kv_heads < spec.num_heads                     # GQA is exercised
    assert spec.qkv_bias == (kind == "qwen2")
    assert (spec.rope_scaling is not None) == (kind == "llama")
    assert spec.tie_word_embeddings == (kind == "llama")
    export_onnx(open_weights(source), spec, tmp_path, GraphOptions(dialect, "fp32", CONTEXT, logits="all"))
    decoder = OrtDecoder(str(tmp_path / "model.onnx"), dialect=dialect, spec=spec, capacity=CONTEXT,
                         kv_dtype="float32")
    # logits="all" still returns the last row from step(); read every row through the session directly
    got = []
    for chunk in (ids[0, :5], ids[0, 5:8], *[ids[0, i:i + 1] for i in range(8, 14)]):
        got.append(decoder.step(chunk).copy())
    last_rows = ref[[4, 7, *range(8, 14)]]
    assert np.abs(np.stack(got) - last_rows).max() < 1e-3, "logits differ from transformers"
    assert decoder.position == 14


@pytest.mark.parametrize("dialect", ["ort", "tensorrt"])
def test_all_logits_output_matches_every_position(tiny, dialect, tmp_path):
    import onnxruntime as ort

    _, source, ids, ref = tiny
    spec = source.spec
    export_onnx(open_weights(source), spec, tmp_path, GraphOptions(dialect, "fp32", CONTEXT, logits="all"))
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    feeds = {"input_ids": ids}
    for i in range(spec.num_layers):
        for kind in ("key", "value"):
            shape = (1, spec.num_kv_heads, CONTEXT, spec.head_dim) if dialect == "ort" else \
                (1, 0, spec.num_kv_heads, spec.head_dim)
            feeds[f"past_{kind}_{i}"] = np.zeros(shape, np.float32)
    if dialect == "ort":
        feeds["seqlens_k"] = np.array([ids.shape[1] - 1], np.int32)
        feeds["total_sequence_length"] = np.array([ids.shape[1]], np.int32)
    logits = session.run(["logits"], feeds)[0][0]
    assert logits.shape == ref.shape
    assert np.abs(logits - ref).max() < 1e-3


def test_dialects_agree_on_greedy_continuation(tiny, tmp_path):
    _, source, ids, _ = tiny
    outs = {}
    for dialect in ("ort", "tensorrt"):
        folder = tmp_path / dialect
        folder.mkdir()
        export_onnx(open_weights(source), source.spec, folder, GraphOptions(dialect, "fp32", CONTEXT))
        dec = OrtDecoder(str(folder / "model.onnx"), dialect=dialect, spec=source.spec, capacity=CONTEXT,
                         kv_dtype="float32")
        logits, tokens = dec.step(ids[0]), []
        for _ in range(20):
            tokens.append(int(np.argmax(logits)))
            logits = dec.step(np.array(tokens[-1:]))
        outs[dialect] = tokens
    assert outs["ort"] == outs["tensorrt"]


def test_graph_passes_onnx_checker_and_tensorrt_rules(tiny, tmp_path):
    import onnx

    from edgekit.export.trt_check import check_tensorrt_graph

    _, source, _, _ = tiny
    export_onnx(open_weights(source), source.spec, tmp_path, GraphOptions("tensorrt", "fp32", CONTEXT))
    onnx.checker.check_model(str(tmp_path / "model.onnx"), full_check=True)
    report = check_tensorrt_graph(tmp_path / "model.onnx", source.spec)
    assert report.ok, report.problems


def test_tensorrt_checker_rejects_the_ort_dialect(tiny, tmp_path):
    from edgekit.export.trt_check import check_tensorrt_graph

    _, source, _, _ = tiny
    export_onnx(open_weights(source), source.spec, tmp_path, GraphOptions("ort", "fp32", CONTEXT))
    report = check_tensorrt_graph(tmp_path / "model.onnx", source.spec)
    assert not report.ok
    assert any("com.microsoft" in p for p in report.problems)


@pytest.mark.parametrize("dialect", ["ort", "tensorrt"])
def test_fp16_graph_runs_close_to_fp32(tiny, dialect, tmp_path):
    """fp16 weights and cache: valid ONNX (the tensorrt dialect passes the full checker; the ort one uses
    contrib ops the checker does not know, so onnxruntime is its checker) and close to the fp32 reference."""
    import onnx

    _, source, ids, ref = tiny
    export_onnx(open_weights(source), source.spec, tmp_path, GraphOptions(dialect, "fp16", CONTEXT))
    if dialect == "tensorrt":
        onnx.checker.check_model(str(tmp_path / "model.onnx"), full_check=True)
    size = (tmp_path / "model.onnx.data").stat().st_size
    assert size < source.spec.parameters * 4 * 0.6          # stored as fp16: about half of fp32
    # onnxruntime's CPU provider runs both fp16 graphs (it inserts casts where it lacks an fp16 kernel): a
    # failure to load or run is a failure of the graph, not a reason to skip
    dec = OrtDecoder(str(tmp_path / "model.onnx"), dialect=dialect, spec=source.spec, capacity=CONTEXT,
                     kv_dtype="float16")
    logits = dec.step(ids[0])
    assert np.abs(logits - ref[-1]).max() < 0.05 * np.abs(ref[-1]).max()


def test_weight_with_the_wrong_shape_is_named(tiny_qwen2_dir, tmp_path):
    import json
    import shutil

    from edgekit.errors import ModelFormatError

    folder = tmp_path / "bad"
    shutil.copytree(tiny_qwen2_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config["intermediate_size"] = 100                      # weights say 96
    (folder / "config.json").write_text(json.dumps(config))
    source = resolve(folder)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ModelFormatError, match=r"weight layers\.0\.gate\.weight has shape \(96, 64\) but the "
                                               r"model's config implies \(100, 64\)"):
        export_onnx(open_weights(source), source.spec, out, GraphOptions("ort", "fp32", CONTEXT))
