"""TensorRT-dialect bundles against TensorRT 10.3's parser rules (edgekit.export.trt_check) and against a reference.

Every INT4/INT8/fp16 tensorrt graph must (1) pass the checker, (2) have only positive DequantizeLinear scales and
INT8/INT4 tensors that feed only DequantizeLinear, and (3) compute, on onnxruntime CPU, what a dense fp32 graph
of the same dequantized weights computes. Hand-broken graphs are refused with one line naming the rule.
"""

from __future__ import annotations

import shutil

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgekit.build import QuantOptions, build
from edgekit.build.target import load_target
from edgekit.errors import BundleError
from edgekit.export import GraphOptions, export_onnx
from edgekit.export.trt_check import check_tensorrt_graph, require_tensorrt_graph
from edgekit.quant.codec import QuantCodec
from edgekit.quant.encodings import to_qdq_int4, to_qdq_int8
from edgekit.runtime.ort_backend import OrtDecoder
from edgekit.sources import open_weights, resolve

CONTEXT = 64
LINEARS = ("q", "k", "v", "o", "gate", "up", "down")


class DequantizedReader:
    """The source's weights as the tensorrt codec rounds them (independently of the graph): a dense graph of
    these is the reference a quantized tensorrt graph must reproduce. Rounding is per output row (INT8) or per
    row and block of 32 along K (INT4), so packing q/k/v or gate/up first changes nothing."""

    def __init__(self, reader, precision: str):
        self.reader, self.precision = reader, precision

    def has(self, canonical, layer=None):
        return self.reader.has(canonical, layer)

    def tensor(self, canonical, layer=None):
        w = self.reader.tensor(canonical, layer)
        if canonical in ("embed.weight", "lm_head.weight"):
            return to_qdq_int8(w).dequantize().T
        if canonical.endswith(".weight") and canonical.split(".")[-2] in LINEARS:
            q = to_qdq_int4(w, 32) if self.precision == "int4" else to_qdq_int8(w)
            return q.dequantize().T
        return w

    def __getattr__(self, name):
        return getattr(self.reader, name)


def _logits(folder, spec, ids, follow=(5, 17, 3, 11)):
    """The prompt's last logits, then one decode step per token of ``follow`` (the same tokens for every graph)."""
    dec = OrtDecoder(str(folder / "model.onnx"), dialect="tensorrt", spec=spec, capacity=CONTEXT,
                     kv_dtype="float32")
    return np.stack([dec.step(ids).copy()] + [dec.step(np.array([t])).copy() for t in follow])


def _scales_and_quantized_consumers(model_path):
    """(smallest DequantizeLinear scale, ops that read an INT8/INT4 initializer) of a saved graph."""
    model = onnx.load(str(model_path))                                   # with its weights
    inits = {t.name: t for t in model.graph.initializer}
    smallest, readers = np.inf, set()
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear":
            smallest = min(smallest, float(numpy_helper.to_array(inits[node.input[1]]).min()))
        for i, name in enumerate(node.input):
            if name in inits and inits[name].data_type in (TensorProto.INT8, TensorProto.INT4):
                readers.add(node.op_type if i == 0 else f"{node.op_type}[{i}]")
    return smallest, readers


@pytest.fixture(scope="module", params=["tiny_qwen2_dir", "smollm2_gguf"])
def source(request):
    return resolve(request.getfixturevalue(request.param))


@pytest.fixture
def exact_ort(monkeypatch):
    """onnxruntime fuses DequantizeLinear(INT4) + MatMul into MatMulNBits with int8 activations (accuracy level
    4, ~1% of a layer's output): ask for fp32 compute, so the comparison can be tight."""
    import onnxruntime as ort

    class Options(ort.SessionOptions):
        def __init__(self):
            super().__init__()
            self.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")

    monkeypatch.setattr(ort, "SessionOptions", Options)


@pytest.mark.parametrize("precision", ["int4", "int8"])
def test_quantized_tensorrt_graph_is_its_dequantized_weights(source, tmp_path, precision, exact_ort):
    spec = source.spec
    ids = np.random.default_rng(3).integers(0, spec.vocab_size, 9)
    graphs = {}
    for tag, reader, codec in (
            ("quant", open_weights(source), QuantCodec("tensorrt", precision, np.float32)),
            ("reference", DequantizedReader(open_weights(source), precision), None)):
        folder = tmp_path / tag
        folder.mkdir()
        export_onnx(reader, spec, folder, GraphOptions("tensorrt", "fp32", CONTEXT), codec=codec)
        graphs[tag] = folder
    report = check_tensorrt_graph(graphs["quant"] / "model.onnx", spec)
    assert report.ok, report.problems
    smallest, readers = _scales_and_quantized_consumers(graphs["quant"] / "model.onnx")
    assert smallest > 0 and readers == {"DequantizeLinear"}
    got, want = _logits(graphs["quant"], spec, ids), _logits(graphs["reference"], spec, ids)
    assert np.abs(got - want).max() < 1e-3 * np.abs(want).max()
    assert (got.argmax(-1) == want.argmax(-1)).all()
    shutil.rmtree(tmp_path)


@pytest.mark.parametrize("precision", ["int4", "int8", "fp16"])
def test_orin_nano_bundles_pass_the_checker(tiny_qwen2_dir, tmp_path, precision):
    """What `edgekit build --target orin-nano` writes (fp16 compute): checked inside build, and again here."""
    spec = resolve(tiny_qwen2_dir).spec
    result = build(tiny_qwen2_dir, load_target("orin-nano"), output=tmp_path / "b", precision=precision,
                   context=CONTEXT, quant=QuantOptions(method="rtn"))
    model = tmp_path / "b" / "model.onnx"
    onnx.checker.check_model(str(model), full_check=True)
    report = require_tensorrt_graph(model, spec, tensorrt="10.3")
    if precision == "fp16":
        assert report.quantized == {}
        return
    smallest, readers = _scales_and_quantized_consumers(model)
    assert smallest > 0 and readers == {"DequantizeLinear"}
    per_layer = 4 * spec.num_layers
    # + the INT8 embedding and the (untied) INT8 LM head
    assert report.quantized == ({"int4": per_layer, "int8": 2} if precision == "int4" else {"int8": per_layer + 2})
    assert result.manifest["memory"]["weights_bytes"] > 0


# ----- hand-broken graphs: one line each, naming the node and the rule ---------------------------------------
@pytest.fixture(scope="module")
def int4_graph(tiny_qwen2_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("int4")
    build(tiny_qwen2_dir, load_target("orin-nano"), output=folder / "b", precision="int4", context=CONTEXT,
          quant=QuantOptions(method="rtn"))
    return folder / "b"


def _broken(int4_graph, tmp_path, edit):
    folder = tmp_path / "broken"
    shutil.copytree(int4_graph, folder)
    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    edit(model)
    onnx.save(model, str(folder / "model.onnx"))
    return folder / "model.onnx"


def _one_line_refusal(path, spec):
    with pytest.raises(BundleError) as e:
        require_tensorrt_graph(path, spec)
    text = str(e.value)
    assert "\n" not in text and text.startswith("model.onnx would not build with TensorRT 10.3: ")
    return text


def test_negative_scale_is_refused(int4_graph, tmp_path, tiny_qwen2_dir):
    def edit(model):
        scale = next(t for t in model.graph.initializer if t.name == "layers.0.o.scales")
        values = numpy_helper.to_array(scale, str(int4_graph)).copy()
        values.flat[5] = -values.flat[5]
        scale.CopyFrom(numpy_helper.from_array(values, scale.name))
    text = _one_line_refusal(_broken(int4_graph, tmp_path, edit), resolve(tiny_qwen2_dir).spec)
    assert ("node layers.0.o/Dequantize (DequantizeLinear): scale layers.0.o.scales has 1 of " in text and
            "coefficients <= 0" in text and "TensorRT requires every DequantizeLinear scale > 0 "
            "(onnxOpImporters.cpp QuantDequantLinearHelper: \"Scale coefficients must all be positive\")" in text)


def test_int8_into_gather_is_refused(int4_graph, tmp_path, tiny_qwen2_dir):
    def edit(model):                       # the old form: Gather the INT8 rows, then Cast
        gather = next(n for n in model.graph.node if n.name == "embed/Gather")
        gather.input[0] = "embed.qweight"
    text = _one_line_refusal(_broken(int4_graph, tmp_path, edit), resolve(tiny_qwen2_dir).spec)
    assert ("node embed/Gather (Gather) reads INT8 tensor embed.qweight: in TensorRT INT8/INT4 tensors may only "
            "feed DequantizeLinear" in text and "Int8 constant is only allowed before DQ node" in text)


def test_unknown_op_is_refused(int4_graph, tmp_path, tiny_qwen2_dir):
    def edit(model):
        node = next(n for n in model.graph.node if n.name == "layers.0.mlp/Sigmoid")
        node.op_type = "HardSwish"
        node.name = "layers.0.mlp/HardSwish"
    text = _one_line_refusal(_broken(int4_graph, tmp_path, edit), resolve(tiny_qwen2_dir).spec)
    assert ("node layers.0.mlp/HardSwish (HardSwish): TensorRT 10.3's ONNX parser has no importer for HardSwish "
            "(onnxOpImporters.cpp; parseNode falls back to a plugin, none is registered)") in text


@pytest.mark.parametrize("edit, expected", [
    (lambda m, dq: [a for a in dq.attribute if a.name == "block_size"][0].__setattr__("i", 16),
     "block_size 16 does not match input"),
    (lambda m, dq: dq.attribute.remove([a for a in dq.attribute if a.name == "axis"][0]),
     "need an explicit axis"),
    (lambda m, dq: (m.graph.initializer.append(helper.make_tensor("zp", TensorProto.INT4, [1], [3])),
                    dq.input.append("zp")), "zero point is not all zeros: TensorRT only supports symmetric"),
    (lambda m, dq: (m.graph.initializer.append(helper.make_tensor("zp8", TensorProto.INT8, [1], [0])),
                    dq.input.append("zp8")), "zero point zp8 must be an initializer of the input's type INT4"),
    (lambda m, dq: m.opset_import[0].__setattr__("version", 20), "the graph uses opset 20"),
    (lambda m, dq: m.graph.node.append(helper.make_node("GroupQueryAttention", ["input_ids"], ["g"], name="gqa",
                                                        domain="com.microsoft")), "domain 'com.microsoft'"),
])
def test_other_dequantize_and_graph_rules(int4_graph, tmp_path, tiny_qwen2_dir, edit, expected):
    def apply(model):
        dq = next(n for n in model.graph.node if n.name == "layers.0.qkv/Dequantize")
        edit(model, dq)
    report = check_tensorrt_graph(_broken(int4_graph, tmp_path, apply), resolve(tiny_qwen2_dir).spec)
    assert any(expected in p for p in report.problems), report.problems
