"""Is this ONNX file something TensorRT 10 will build? A checker for the ``tensorrt`` dialect.

TensorRT cannot run here, so what it needs is written down as rules and checked on every export:

- only the default ONNX domain (no com.microsoft contrib ops: TensorRT has no kernels for them and edgekit uses
  no plugins), opset >= 21 (blocked DequantizeLinear for INT4 needs 21);
- only operators on the list TensorRT's ONNX parser supports (the subset this exporter emits, and a few more);
- the static-KV contract of :mod:`edgekit.export.decoder` (names, ranks, dtypes, head counts);
- quantized weights in the only forms TensorRT 10 accepts: INT4 as DequantizeLinear of a rank-2 INT4
  initializer blocked along K (axis 0 of a (K, N) MatMul weight) with a positive block_size dividing K,
  float scales, zero point absent or zero (symmetric); INT8 per-channel (no block_size), zero point zero;
- external data files that stay inside the model's folder.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

SUPPORTED_OPS = frozenset({
    "Add", "Sub", "Mul", "Div", "Neg", "Pow", "Sqrt", "Reciprocal", "Exp", "Sigmoid", "Tanh", "Erf", "Max", "Min",
    "MatMul", "Gemm", "Gather", "GatherElements", "Reshape", "Transpose", "Concat", "Split", "Slice", "Squeeze",
    "Unsqueeze", "Shape", "Range", "Expand", "Tile", "Greater", "Less", "Equal", "Where", "Not", "And",
    "Softmax", "ReduceMean", "ReduceSum", "ReduceMax", "Cast", "Identity", "Constant", "ConstantOfShape",
    "DequantizeLinear", "QuantizeLinear", "LayerNormalization", "Trilu", "CumSum", "ScatterND", "ScatterElements",
})
MIN_OPSET = 21


@dataclass
class CheckReport:
    problems: list[str] = field(default_factory=list)
    quantized: dict[str, int] = field(default_factory=dict)   # "int4"/"int8" -> number of DequantizeLinear weights

    @property
    def ok(self) -> bool:
        return not self.problems


def _shape(value) -> list:
    return [d.dim_param if d.HasField("dim_param") else d.dim_value for d in value.type.tensor_type.shape.dim]


def check_tensorrt_graph(model_path: Path, spec=None) -> CheckReport:
    """Check ``model_path`` (weights not loaded, except zero points) against the rules above."""
    import onnx
    from onnx import TensorProto, numpy_helper

    model_path = Path(model_path)
    model = onnx.load(str(model_path), load_external_data=False)
    report = CheckReport()
    bad = report.problems.append

    for opset in model.opset_import:
        if opset.domain not in ("", "ai.onnx"):
            bad(f"imports the custom domain {opset.domain!r}: TensorRT has no kernels for it (no plugins)")
        elif opset.version < MIN_OPSET:
            bad(f"opset {opset.version} < {MIN_OPSET}: blocked INT4 DequantizeLinear needs opset 21")
    graph = model.graph
    for node in graph.node:
        if node.domain not in ("", "ai.onnx"):
            bad(f"node {node.name} is {node.domain}::{node.op_type}: a contrib op TensorRT cannot run")
        elif node.op_type not in SUPPORTED_OPS:
            bad(f"node {node.name} uses {node.op_type}, which is not on the TensorRT operator list")

    inits = {t.name: t for t in graph.initializer}
    folder = model_path.parent.resolve()
    for t in inits.values():
        if t.data_location == TensorProto.EXTERNAL:
            location = next((e.value for e in t.external_data if e.key == "location"), "")
            if not (folder / location).resolve().is_relative_to(folder):
                bad(f"initializer {t.name} points outside the model folder ({location!r})")

    if spec is not None:
        _check_contract(graph, spec, bad)
    _check_quantization(graph, inits, model_path.parent, report, numpy_helper)
    return report


def _check_contract(graph, spec, bad) -> None:
    from onnx import TensorProto

    inputs = {v.name: v for v in graph.input}
    outputs = {v.name: v for v in graph.output}
    ids = inputs.get("input_ids")
    if ids is None or ids.type.tensor_type.elem_type != TensorProto.INT64 or len(_shape(ids)) != 2:
        bad("input_ids must be an int64 input of shape (batch, seq)")
    logits = outputs.get("logits")
    if logits is None or logits.type.tensor_type.elem_type != TensorProto.FLOAT or \
            _shape(logits)[-1:] != [spec.vocab_size]:
        bad(f"logits must be a float32 output of shape (batch, n, {spec.vocab_size})")
    expected = {"input_ids", *(f"past_{k}_{i}" for i in range(spec.num_layers) for k in ("key", "value"))}
    extra = set(inputs) - expected
    if extra:
        bad(f"unexpected inputs {sorted(extra)}: the tensorrt dialect takes input_ids and past_key/value_i only")
    for i in range(spec.num_layers):
        for kind in ("key", "value"):
            for name, table, seq in ((f"past_{kind}_{i}", inputs, "past_seq"), (f"new_{kind}_{i}", outputs, "seq")):
                v = table.get(name)
                if v is None:
                    bad(f"missing {name}: the static-KV contract needs it for layer {i}")
                    continue
                shape = _shape(v)
                if len(shape) != 4 or shape[2:] != [spec.num_kv_heads, spec.head_dim] or shape[1] != seq:
                    bad(f"{name} has shape {shape}, the contract is (batch, {seq}, {spec.num_kv_heads}, "
                        f"{spec.head_dim})")


def _check_quantization(graph, inits, folder: Path, report: CheckReport, numpy_helper) -> None:
    from onnx import TensorProto

    bad = report.problems.append
    for node in graph.node:
        if node.op_type != "DequantizeLinear":
            continue
        x = inits.get(node.input[0])
        if x is None:
            continue  # activation Q/DQ pairs are not weight encodings
        attrs = {a.name: a for a in node.attribute}
        block = attrs["block_size"].i if "block_size" in attrs else 0
        axis = attrs["axis"].i if "axis" in attrs else 1
        zp = inits.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        scale = inits.get(node.input[1])
        if scale is not None and scale.data_type not in (TensorProto.FLOAT, TensorProto.FLOAT16):
            bad(f"{node.name}: scales must be float32 or float16")
        if zp is not None and numpy_helper.to_array(zp, str(folder)).any():
            bad(f"{node.name}: zero point is not zero; TensorRT's weight-only quantization is symmetric")
        if x.data_type == TensorProto.INT4:
            report.quantized["int4"] = report.quantized.get("int4", 0) + 1
            if len(x.dims) != 2:
                bad(f"{node.name}: INT4 weights must be rank 2, got rank {len(x.dims)}")
            elif block <= 0:
                bad(f"{node.name}: INT4 needs blocked quantization (block_size > 0)")
            elif axis not in (0, -2):
                bad(f"{node.name}: INT4 blocks must run along K (axis 0 of the (K, N) weight), got axis {axis}")
            elif x.dims[0] % block:
                bad(f"{node.name}: block_size {block} does not divide K = {x.dims[0]}")
        elif x.data_type == TensorProto.INT8:
            report.quantized["int8"] = report.quantized.get("int8", 0) + 1
            if block:
                bad(f"{node.name}: INT8 weights must be per-channel, not blocked")
        else:
            bad(f"{node.name}: weights of type {TensorProto.DataType.Name(x.data_type)} are not INT4/INT8")
