"""What an ONNX model refers to and declares, read from the protobuf bytes without the onnx package.

A bundle is untrusted: ``model.onnx`` itself names the files its tensors live in, and an old onnxruntime
(as some JetPack wheels are) would follow ``../../`` out of the bundle. Any tensor can be external, not only
the top-level initializers: a Constant node's ``value``, any node's tensor attribute, sparse tensors, the
nodes of subgraphs (If/Loop/Scan bodies) and of model-local functions. ``read_graph`` walks all of them, and
the bundle check compares every location with the manifest's file list before onnxruntime opens the model.
It also returns what the runtime checks the manifest against: the main graph's inputs (the KV cache
geometry) and the rows of the rotary tables (the longest context the graph can address).

Protobuf wire format, just enough of it (onnx.proto field numbers):
ModelProto.graph = 7, training_info = 20 (initialization = 1, algorithm = 2), functions = 25;
FunctionProto.node = 7; GraphProto.node = 1, initializer = 5, input = 11, sparse_initializer = 15;
NodeProto.input = 1, op_type = 4, attribute = 5, domain = 7; AttributeProto.t = 5, g = 6, tensors = 10,
graphs = 11, sparse_tensor = 22, sparse_tensors = 23; SparseTensorProto.values = 1, indices = 2;
TensorProto.dims = 1, name = 8, external_data = 13 (key = 1, value = 2); ValueInfoProto.name = 1,
type = 2; TypeProto.tensor_type = 1 (elem_type = 1, shape = 2); TensorShapeProto.dim = 1 (dim_value = 1,
dim_param = 2).
"""

from __future__ import annotations

from dataclasses import dataclass, field


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        if i >= len(buf):
            raise ValueError("truncated varint")
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, i
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def _fields(buf: bytes):
    """(field number, wire type, value) for each field; length-delimited values are bytes."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 1:
            value, i = buf[i:i + 8], i + 8
        elif wire == 2:
            n, i = _varint(buf, i)
            value, i = buf[i:i + n], i + n
            if i > len(buf):
                raise ValueError("truncated field")
        elif wire == 5:
            value, i = buf[i:i + 4], i + 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
        yield number, wire, value


MAX_DEPTH = 32    # subgraph nesting; edgekit writes none, real models use a few levels


@dataclass
class GraphInfo:
    locations: list[str] = field(default_factory=list)   # every external-data location, anywhere in the model
    # the main graph's inputs: name -> (element type, dims as ints or symbolic names)
    inputs: dict[str, tuple[int, list]] = field(default_factory=dict)
    initializers: dict[str, tuple[int, ...]] = field(default_factory=dict)   # main graph: name -> dims
    rotary_tables: set[str] = field(default_factory=set)  # cos/sin inputs of GroupQueryAttention nodes


def _ints(wire: int, value) -> list[int]:
    """A repeated int64 field: one varint, or a packed run of them."""
    if wire == 0:
        return [value]
    out, i = [], 0
    while i < len(value):
        v, i = _varint(value, i)
        out.append(v)
    return out


def _tensor(tensor: bytes, info: GraphInfo) -> tuple[str, tuple[int, ...]]:
    """Record the tensor's external location(s); return its (name, dims)."""
    name, dims = "", []
    for number, wire, value in _fields(tensor):
        if number == 13 and wire == 2:
            entry = dict((n, v) for n, w, v in _fields(value) if w == 2)
            if entry.get(1) == b"location":
                info.locations.append(entry.get(2, b"").decode("utf-8", "replace"))
        elif number == 1 and wire in (0, 2):
            dims += _ints(wire, value)
        elif number == 8 and wire == 2:
            name = value.decode("utf-8", "replace")
    return name, tuple(dims)


def _sparse(sparse: bytes, info: GraphInfo) -> None:
    for number, wire, tensor in _fields(sparse):
        if number in (1, 2) and wire == 2:              # values, indices
            _tensor(tensor, info)


def _node(node: bytes, info: GraphInfo, depth: int) -> None:
    inputs, op_type, domain = [], b"", b""
    for number, wire, value in _fields(node):
        if number == 1 and wire == 2:
            inputs.append(value.decode("utf-8", "replace"))
        elif number == 4 and wire == 2:
            op_type = value
        elif number == 7 and wire == 2:
            domain = value
        elif number == 5 and wire == 2:                 # AttributeProto
            for a_number, a_wire, a_value in _fields(value):
                if a_wire != 2:
                    continue
                if a_number in (5, 10):                 # t, tensors
                    _tensor(a_value, info)
                elif a_number in (22, 23):              # sparse_tensor, sparse_tensors
                    _sparse(a_value, info)
                elif a_number in (6, 11):               # g, graphs
                    _graph(a_value, info, depth + 1, main=False)
    if op_type == b"GroupQueryAttention" and domain == b"com.microsoft":
        info.rotary_tables.update(n for n in inputs[7:9] if n)      # cos_cache, sin_cache


def _value_info(value: bytes) -> tuple[str, int, list]:
    name, elem_type, dims = "", 0, []
    for number, wire, v in _fields(value):
        if number == 1 and wire == 2:
            name = v.decode("utf-8", "replace")
        elif number == 2 and wire == 2:
            for t_number, t_wire, tensor_type in _fields(v):
                if t_number != 1 or t_wire != 2:
                    continue
                for n, w, x in _fields(tensor_type):
                    if n == 1 and w == 0:
                        elem_type = x
                    elif n == 2 and w == 2:
                        for d_number, d_wire, dim in _fields(x):
                            if d_number == 1 and d_wire == 2:
                                parts = {dn: dv for dn, dw, dv in _fields(dim)}
                                dims.append(parts[1] if 1 in parts else
                                            parts.get(2, b"?").decode("utf-8", "replace"))
    return name, elem_type, dims


def _graph(graph: bytes, info: GraphInfo, depth: int, *, main: bool) -> None:
    if depth > MAX_DEPTH:
        raise ValueError(f"subgraphs nested more than {MAX_DEPTH} deep")
    for number, wire, value in _fields(graph):
        if wire != 2:
            continue
        if number == 1:
            _node(value, info, depth)
        elif number == 5:
            name, dims = _tensor(value, info)
            if main:
                info.initializers[name] = dims
        elif number == 15:
            _sparse(value, info)
        elif number == 11 and main:
            name, elem_type, dims = _value_info(value)
            info.inputs[name] = (elem_type, dims)


def read_graph(model_bytes: bytes) -> GraphInfo:
    """Every tensor reference of the model and the main graph's facts. Raises ValueError if malformed."""
    info = GraphInfo()
    for number, wire, value in _fields(model_bytes):
        if wire != 2:
            continue
        if number == 7:
            _graph(value, info, 0, main=True)
        elif number == 20:                              # TrainingInfoProto: initialization, algorithm
            for t_number, t_wire, graph in _fields(value):
                if t_number in (1, 2) and t_wire == 2:
                    _graph(graph, info, 1, main=False)
        elif number == 25:                              # FunctionProto: its nodes
            for f_number, f_wire, node in _fields(value):
                if f_number == 7 and f_wire == 2:
                    _node(node, info, 1)
    return info


def external_locations(model_bytes: bytes) -> list[str]:
    """Every external-data ``location`` anywhere in the model. Raises ValueError if malformed."""
    return read_graph(model_bytes).locations


def reference_problems(info: GraphInfo, graph_file: str, files) -> list[str]:
    """What is wrong with the files the graph reads: each location must be a file of the bundle (``files``,
    the manifest's names), given relative to the graph's folder, with no ``..`` and no absolute path."""
    graph_dir = graph_file.rpartition("/")[0]
    problems = []
    for location in sorted(set(info.locations)):
        name = f"{graph_dir}/{location}" if graph_dir else location
        if location.startswith(("/", "\\")) or ".." in location.replace("\\", "/").split("/") or name not in files:
            problems.append(f"reads its weights from {location!r}, which is not a file of the bundle: the bundle "
                            "is corrupt or hostile; do not use it")
    return problems


def graph_problems(manifest) -> list[str]:
    """What is wrong with the files a bundle's graph reads (a :class:`Manifest`'s graph, already size-checked)."""
    name = manifest.graph["file"]
    try:
        info = read_graph(manifest.path(name).read_bytes())
    except (ValueError, RecursionError) as e:
        return [f"is not a readable ONNX model ({e})"]
    return reference_problems(info, name, manifest.files)
