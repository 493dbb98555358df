"""Will TensorRT's ONNX parser accept this graph? The rules of a named TensorRT version, checked without it.

TensorRT cannot run here, so the rules its ONNX parser (onnx-tensorrt) and its network definition apply are
written down per version and checked on every ``tensorrt``-dialect export (``edgekit build``) and before any
TensorRT call in ``edgekit engine`` (also ``--dry-run``). Each rule names where it comes from:

- ``ModelImporter.cpp`` (onnx-tensorrt, ``parseNode``): a node is dispatched by its ``op_type`` alone; an op
  with no built-in importer falls to ``FallbackPluginImporter`` and fails without a registered plugin (edgekit
  uses none). So only operators of the parser's table are allowed, and no custom domain (a ``com.microsoft``
  op would either fail or, if it shares a standard name, be imported with the standard semantics).
- ``ModelImporter.cpp`` (``importModel``): opsets are recorded with no upper bound (only a warning below 7);
  ``docs/operators.md`` says "opset 9 to opset 20" were tested. INT4 tensors and ``DequantizeLinear``'s
  ``block_size`` exist only from ONNX opset 21, so edgekit writes 21 and checks that it is exactly 21.
- ``docs/operators.md`` (Supported Types column): INT8/INT4 appear only for ``DequantizeLinear``; Gather,
  Cast, Identity, MatMul... take float/int32/int64/bool. TensorRT's builder says the same at build time:
  "Int8 constant is only allowed before DQ node" (qdqGraphOptimizer ``matchInt8ConstantDQ``). So an INT8/INT4
  tensor may feed ``DequantizeLinear`` (input 0) and nothing else.
- ``onnxOpImporters.cpp`` ``QuantDequantLinearHelper`` (DequantizeLinear): every scale coefficient > 0
  ("Scale coefficients must all be positive"); zero point all zeros ("only supports symmetric
  quantization") with the input's type; the default axis is the input's rank, mapped to 0 (ONNX's default is
  1, so an implicit axis means different things to onnxruntime and TensorRT: edgekit requires it explicit);
  a 1-D scale has one coefficient per channel of ``axis``; a scale of the input's rank is block quantization
  with exactly one blocked dimension and an integer block (the ``block_size`` attribute is not read: the block
  is inferred from the shapes, so it must agree with them); INT4 needs an even last dimension.
- ``NvInfer.h`` ``IDequantizeLayer``: scales must be build-time constants; block quantization only for 2-D
  INT4 inputs rooted at a constant (weights); per-channel only for weights; in a strongly typed network (the
  builder's ``STRONGLY_TYPED`` flag) the output type is the scale's type, so scales have the graph's float type.
- ``docs/operators.md`` Restrictions: the ``axes`` of Squeeze, Unsqueeze, Slice and Reduce* must be
  initializers.
- the static-KV contract of :mod:`edgekit.export.decoder` (names, ranks, dtypes, head counts), and external
  data files that stay inside the model's folder.

The operator table is that of onnx-tensorrt ``docs/operators.md`` at the 10.1-GA tag (the latest the fetched
mirror holds; NVIDIA/TensorRT ``release/10.3`` pins ``parsers/onnx`` at 62bdde2, which the mirror lacks), for
the operators edgekit's exporter can emit. Weights are not loaded, except scales and zero points.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import BundleError

# ONNX element types (onnx.TensorProto values, spelled out so this table reads without onnx imported)
FLOAT, UINT8, INT8, INT32, INT64, BOOL, FLOAT16, BFLOAT16, FP8E4M3, INT4 = 1, 2, 3, 6, 7, 9, 10, 16, 17, 22
TYPE_NAMES = {FLOAT: "FP32", UINT8: "UINT8", INT8: "INT8", INT32: "INT32", INT64: "INT64", BOOL: "BOOL",
              FLOAT16: "FP16", BFLOAT16: "BF16", FP8E4M3: "FP8", INT4: "INT4"}
QUANTIZED = frozenset({INT8, INT4, FP8E4M3})

_F = frozenset({FLOAT, FLOAT16, BFLOAT16})
_FI = _F | {INT32, INT64}
_FIB = _FI | {BOOL}
# docs/operators.md "Supported Types" of the data input, for every operator edgekit's exporter may emit.
OPERATORS_10 = {
    "Add": _FI, "Sub": _FI, "Mul": _FI, "Div": _FI, "Neg": _FI, "Max": _FI, "Min": _FI, "Pow": _F, "Sqrt": _F,
    "Reciprocal": _F, "Exp": _F, "Sigmoid": _F, "Tanh": _F, "Erf": _F, "MatMul": _F, "Gemm": _F,
    "Gather": _FIB, "GatherElements": _FIB, "Reshape": _FIB, "Transpose": _FIB, "Concat": _FIB, "Split": _FIB,
    "Slice": _FIB, "Squeeze": _FIB, "Unsqueeze": _FIB, "Shape": _FIB, "Range": _FI, "Expand": _FIB,
    "Tile": _FIB, "Greater": _FI, "Less": _FI, "Equal": _FI, "Where": _FIB, "Not": frozenset({BOOL}),
    "And": frozenset({BOOL}), "Softmax": _F, "ReduceMean": _FI, "ReduceSum": _FI, "ReduceMax": _FI,
    "Cast": _FIB | {UINT8}, "Identity": _FIB, "Constant": _FIB, "ConstantOfShape": _FIB,
    "LayerNormalization": _F, "Trilu": _FIB, "CumSum": _F, "ScatterND": _FI, "ScatterElements": _FI,
    "DequantizeLinear": frozenset({INT8, INT4, FP8E4M3}), "QuantizeLinear": _F,
}
# Operators whose axes input must be an initializer (docs/operators.md, Restrictions column).
AXES_INPUT = {"Squeeze": 1, "Unsqueeze": 1, "Slice": 3, "ReduceMean": 1, "ReduceSum": 1, "ReduceMax": 1}


@dataclass(frozen=True)
class ParserRules:
    """What one TensorRT version's ONNX parser accepts."""

    version: str
    opsets: tuple[int, int]            # (lowest, highest) default-domain opset edgekit writes for it
    operators: dict                    # op_type -> data-input element types
    source: str                        # where the table was read


RULES = {
    "10.3": ParserRules("10.3", (21, 21), OPERATORS_10,
                        "onnx-tensorrt 10.1-GA docs/operators.md, onnxOpImporters.cpp, ModelImporter.cpp; "
                        "TensorRT release/10.3 NvInfer.h"),
}
DEFAULT_TENSORRT = "10.3"


def rules_for(version: str | None) -> ParserRules:
    """The rules for a TensorRT version (a target's ``software.tensorrt``): the newest known one not newer
    than it (later parsers accept what 10.3's does), or 10.3 when none is named."""
    from ..runtime.trt_compat import version_tuple

    want = version_tuple(version or DEFAULT_TENSORRT)[:2]
    known = sorted(RULES, key=version_tuple)
    fitting = [v for v in known if version_tuple(v)[:2] <= want]
    return RULES[fitting[-1] if fitting else known[0]]


@dataclass
class CheckReport:
    problems: list[str] = field(default_factory=list)
    quantized: dict[str, int] = field(default_factory=dict)   # "int4"/"int8" -> number of DequantizeLinear weights
    tensorrt: str = DEFAULT_TENSORRT

    @property
    def ok(self) -> bool:
        return not self.problems


def _shape(value) -> list:
    return [d.dim_param if d.HasField("dim_param") else d.dim_value for d in value.type.tensor_type.shape.dim]


def _type_name(elem: int) -> str:
    return TYPE_NAMES.get(elem, f"ONNX type {elem}")


def check_tensorrt_graph(model_path: Path, spec=None, *, tensorrt: str | None = None) -> CheckReport:
    """Check ``model_path`` against the parser rules of TensorRT ``tensorrt`` (default 10.3).

    Each problem is one line: the node or tensor, what is wrong, the rule and where it comes from.
    """
    import onnx

    from ..runtime.trt_compat import version_tuple

    rules = rules_for(tensorrt)
    model_path = Path(model_path)
    model = onnx.load(str(model_path), load_external_data=False)
    named = ".".join(map(str, version_tuple(tensorrt)[:2]))
    report = CheckReport(tensorrt=rules.version if not tensorrt or named == rules.version else
                         f"{named} (checked with {rules.version}'s parser rules)")
    bad = report.problems.append
    folder = model_path.parent.resolve()

    lo, hi = rules.opsets
    for opset in model.opset_import:
        if opset.domain not in ("", "ai.onnx"):
            bad(f"the graph imports the custom domain {opset.domain!r}: TensorRT {rules.version}'s parser "
                "dispatches nodes by op_type only and edgekit registers no plugins (ModelImporter.cpp parseNode)")
        elif not lo <= opset.version <= hi:
            bad(f"the graph uses opset {opset.version}: edgekit's TensorRT {rules.version} graphs use opset "
                f"{lo} (INT4 and blocked DequantizeLinear need 21; the parser has no upper bound, ModelImporter.cpp "
                "importModel)")
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    for t in inits.values():
        if t.data_location == onnx.TensorProto.EXTERNAL:
            location = next((e.value for e in t.external_data if e.key == "location"), "")
            if not (folder / location).resolve().is_relative_to(folder):
                bad(f"initializer {t.name} points outside the model folder ({location!r})")
    float_type = next((v.type.tensor_type.elem_type for v in graph.input if v.name == "past_key_0"), None)
    types = _tensor_types(graph, inits)
    _check_nodes(graph, inits, types, rules, bad)
    if spec is not None:
        _check_contract(graph, spec, bad)
    _check_dequantize(graph, inits, folder, float_type, report)
    return report


def require_tensorrt_graph(model_path: Path, spec=None, *, tensorrt: str | None = None,
                           fix: str = "rebuild the bundle with this edgekit") -> CheckReport:
    """:func:`check_tensorrt_graph`, raising BundleError with the first problem (one line) when any is found."""
    report = check_tensorrt_graph(model_path, spec, tensorrt=tensorrt)
    if report.problems:
        more = f" (and {len(report.problems) - 1} more problems)" if len(report.problems) > 1 else ""
        raise BundleError(f"{Path(model_path).name} would not build with TensorRT {report.tensorrt}: "
                          f"{report.problems[0]}{more}; {fix}")
    return report


# ----- types ------------------------------------------------------------------------------------------
_BOOL_OUT = {"Greater", "Less", "Equal", "Not", "And"}


def _tensor_types(graph, inits) -> dict[str, int]:
    """Element types of the tensors that can be known without shape inference (in node order)."""
    types = {name: t.data_type for name, t in inits.items()}
    types.update((v.name, v.type.tensor_type.elem_type) for v in graph.input)
    for node in graph.node:
        attrs = {a.name: a for a in node.attribute}
        if node.op_type == "Constant" and "value" in attrs:
            out = attrs["value"].t.data_type
        elif node.op_type == "Cast" and "to" in attrs:
            out = attrs["to"].i
        elif node.op_type == "DequantizeLinear" and len(node.input) > 1:
            out = types.get(node.input[1])                      # the output has the scale's type
        elif node.op_type == "Shape":
            out = INT64
        elif node.op_type in _BOOL_OUT:
            out = BOOL
        elif node.op_type == "Where" and len(node.input) > 1:
            out = types.get(node.input[1])
        elif node.op_type == "ConstantOfShape":
            out = attrs["value"].t.data_type if "value" in attrs else FLOAT
        else:                                                   # elementwise and data movement keep the type
            out = types.get(node.input[0]) if node.input else None
        if out is not None:
            for name in node.output:
                if name:
                    types[name] = out
    return types


def _check_nodes(graph, inits, types: dict[str, int], rules: ParserRules, bad) -> None:
    constants = set(inits) | {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    for node in graph.node:
        where = f"node {node.name or node.output[0]} ({node.op_type})"
        if node.domain not in ("", "ai.onnx"):
            bad(f"{where} is in domain {node.domain!r}: TensorRT {rules.version}'s parser has no importer for it "
                "and edgekit registers no plugins (ModelImporter.cpp parseNode falls back to a plugin)")
            continue
        allowed = rules.operators.get(node.op_type)
        if allowed is None:
            bad(f"{where}: TensorRT {rules.version}'s ONNX parser has no importer for {node.op_type} "
                "(onnxOpImporters.cpp; parseNode falls back to a plugin, none is registered)")
            continue
        for i, name in enumerate(node.input):
            elem = types.get(name)
            if elem in QUANTIZED and not (node.op_type == "DequantizeLinear" and i in (0, 2)):   # data, zero point
                bad(f"{where} reads {_type_name(elem)} tensor {name}: in TensorRT INT8/INT4 tensors may only "
                    "feed DequantizeLinear (docs/operators.md types; builder: \"Int8 constant is only "
                    "allowed before DQ node\")")
        data = types.get(node.input[0]) if node.input else None
        if data is not None and data not in allowed and data not in QUANTIZED:
            bad(f"{where}: input {node.input[0]} is {_type_name(data)}, which TensorRT {rules.version}'s "
                f"{node.op_type} does not take ({', '.join(sorted(_type_name(t) for t in allowed))}; "
                "docs/operators.md)")
        axes = AXES_INPUT.get(node.op_type)
        if axes is not None and len(node.input) > axes and node.input[axes] and node.input[axes] not in constants:
            bad(f"{where}: its axes input {node.input[axes]} must be an initializer for TensorRT "
                "(docs/operators.md restrictions)")


# ----- the static-KV contract -----------------------------------------------------------------------------
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


# ----- DequantizeLinear -------------------------------------------------------------------------------------
_NP = {FLOAT: np.float32, FLOAT16: np.float16, INT8: np.int8, UINT8: np.uint8, INT32: np.int32, INT64: np.int64}


def _values(t, folder: Path) -> np.ndarray | None:
    """An initializer's values (small ones: scales, zero points), reading external data with bounds checks
    (not through onnx's loader, which refuses a data file with several hard links, as the export cache makes)."""
    from onnx import TensorProto, numpy_helper

    if t.data_location != TensorProto.EXTERNAL:
        return numpy_helper.to_array(t)
    dtype = _NP.get(t.data_type)
    if dtype is None:
        return None
    meta = {e.key: e.value for e in t.external_data}
    path = (folder / meta.get("location", "")).resolve()
    if not path.is_relative_to(folder) or not path.is_file():
        return None
    count = int(np.prod(t.dims)) if len(t.dims) else 1
    with open(path, "rb") as f:
        f.seek(int(meta.get("offset", 0)))
        raw = f.read(count * np.dtype(dtype).itemsize)
    if len(raw) != count * np.dtype(dtype).itemsize:
        return None
    return np.frombuffer(raw, dtype).reshape(tuple(t.dims))


def _check_dequantize(graph, inits, folder: Path, float_type: int | None, report: CheckReport) -> None:
    for node in graph.node:
        if node.op_type != "DequantizeLinear":
            continue
        problem = _dequantize_problem(node, inits, folder, float_type, report)
        if problem:
            report.problems.append(f"node {node.name} (DequantizeLinear): {problem}")


def _dequantize_problem(node, inits, folder: Path, float_type: int | None, report: CheckReport) -> str | None:
    """What TensorRT refuses in one DequantizeLinear: its scale, its input and zero point, then its layout."""
    if len(node.input) < 2 or not node.input[1]:
        return "needs a scale input (QuantDequantLinearHelper: at least 2 inputs)"
    scale = inits.get(node.input[1])
    problem, values = _scale_problem(node, scale, folder, float_type)
    if problem is not None:
        return problem
    x = inits.get(node.input[0])
    if x is None:
        if values.size != 1:
            return (f"input {node.input[0]} is not an initializer: per-channel and block dequantization are only "
                    "for weights (NvInfer.h IDequantizeLayer)")
        return None
    if x.data_type not in QUANTIZED:
        return f"input {x.name} is {_type_name(x.data_type)}; TensorRT dequantizes INT8, INT4 and FP8"
    problem = _zero_point_problem(node, x, inits, folder)
    if problem is not None:
        return problem
    kind = "int4" if x.data_type == INT4 else "int8" if x.data_type == INT8 else "fp8"
    report.quantized[kind] = report.quantized.get(kind, 0) + 1
    return _layout_problem(node, x, scale, values)


def _scale_problem(node, scale, folder: Path, float_type: int | None) -> tuple[str | None, np.ndarray | None]:
    """(problem, the scale's values): a build-time constant of the graph's float type, every coefficient > 0."""
    if scale is None:
        return (f"scale {node.input[1]} is not an initializer: TensorRT needs build-time constant scales "
                "(NvInfer.h IDequantizeLayer)"), None
    if scale.data_type not in (FLOAT, FLOAT16):
        return f"scale {scale.name} is {_type_name(scale.data_type)}; use FP32 or FP16", None
    if float_type is not None and scale.data_type != float_type:
        return (f"scale {scale.name} is {_type_name(scale.data_type)} but the graph computes in "
                f"{_type_name(float_type)}: in a strongly typed TensorRT network the output takes the scale's "
                "type (NvInfer.h IDequantizeLayer)"), None
    values = _values(scale, folder)
    if values is None:
        return f"scale {scale.name}'s data cannot be read from the model's folder", None
    if values.size == 0:
        return f"scale {scale.name} has no coefficients (QuantDequantLinearHelper)", None
    bad_scales = ~(values.astype(np.float32) > 0)
    if bad_scales.any():
        return (f"scale {scale.name} has {int(bad_scales.sum())} of {values.size} coefficients <= 0 (smallest "
                f"{float(np.nanmin(values)):.4g}): TensorRT requires every DequantizeLinear scale > 0 "
                "(onnxOpImporters.cpp QuantDequantLinearHelper: \"Scale coefficients must all be positive\")"), None
    return None, values


def _zero_point_problem(node, x, inits, folder: Path) -> str | None:
    if len(node.input) > 2 and node.input[2]:
        zp = inits.get(node.input[2])
        if zp is None or zp.data_type != x.data_type:
            return (f"zero point {node.input[2]} must be an initializer of the input's type "
                    f"{_type_name(x.data_type)} (NvInfer.h IDequantizeLayer)")
        zv = _values(zp, folder)
        if zv is None or zv.any():
            return ("zero point is not all zeros: TensorRT only supports symmetric quantization "
                    "(QuantDequantLinearHelper)")
    return None


def _layout_problem(node, x, scale, values: np.ndarray) -> str | None:
    """INT4 packing, the axis, and per-channel or block scales whose shape TensorRT can infer the block from."""
    attrs = {a.name: a for a in node.attribute}
    dims, sdims = list(x.dims), list(scale.dims)
    if x.data_type == INT4 and dims and dims[-1] % 2:
        return (f"INT4 input {x.name} has an odd last dimension {dims[-1]} (QuantDequantLinearHelper: INT4 "
                "packing needs it even)")
    if values.size == 1:
        return None
    if "axis" not in attrs:
        return ("per-channel/block scales need an explicit axis: TensorRT's default is the input's rank "
                "(mapped to 0), ONNX's is 1 (QuantDequantLinearHelper)")
    axis = attrs["axis"].i + (len(dims) if attrs["axis"].i < 0 else 0)
    if not 0 <= axis < len(dims):
        return f"axis {attrs['axis'].i} is outside the input's rank {len(dims)}"
    block = attrs["block_size"].i if "block_size" in attrs else 0
    if len(sdims) == 1:
        if block:
            return "a 1-D scale with block_size: blocks need a scale of the input's rank"
        if sdims[0] != dims[axis]:
            return (f"{sdims[0]} scales for {dims[axis]} channels of axis {axis} (QuantDequantLinearHelper: one "
                    "scale per output channel)")
        return None
    if len(sdims) != len(dims):
        return f"invalid scale rank {len(sdims)} for an input of rank {len(dims)} (QuantDequantLinearHelper)"
    if x.data_type != INT4 or len(dims) != 2:
        return (f"block quantization of a rank-{len(dims)} {_type_name(x.data_type)} input: TensorRT blocks only "
                "2-D INT4 weights (NvInfer.h IDequantizeLayer)")
    blocked = [i for i in range(len(dims)) if sdims[i] != dims[i]]
    if blocked != [axis]:
        return (f"scale shape {sdims} for input {dims}: exactly one dimension, the axis {axis}, may be blocked "
                "(QuantDequantLinearHelper: \"Only a single blocking dimension is allowed\")")
    if not sdims[axis] or dims[axis] % sdims[axis] or dims[axis] // sdims[axis] != block:
        return (f"block_size {block} does not match input {dims} / scale {sdims} along axis {axis}: TensorRT "
                "infers the block from the shapes and ignores the attribute (QuantDequantLinearHelper)")
    return None
