"""Which external data files an ONNX model refers to, read from the protobuf bytes without the onnx package.

A bundle is untrusted: ``model.onnx`` itself names the files its weights live in, and an old onnxruntime
(as some JetPack wheels are) would follow ``../../`` out of the bundle. The runtime checks every location
against the manifest's file list before onnxruntime opens the model.

Protobuf wire format, just enough of it: ModelProto.graph = 7; GraphProto.initializer = 5,
sparse_initializer = 15 (values = 1, indices = 2); TensorProto.external_data = 13; an entry's key = 1,
value = 2.
"""

from __future__ import annotations


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


def _tensor_locations(tensor: bytes) -> list[str]:
    out = []
    for number, wire, value in _fields(tensor):
        if number == 13 and wire == 2:
            entry = dict((n, v) for n, w, v in _fields(value) if w == 2)
            if entry.get(1) == b"location":
                out.append(entry.get(2, b"").decode("utf-8", "replace"))
    return out


def external_locations(model_bytes: bytes) -> list[str]:
    """Every external-data ``location`` of the main graph's initializers. Raises ValueError if malformed."""
    locations = []
    for number, wire, graph in _fields(model_bytes):
        if number != 7 or wire != 2:
            continue
        for g_number, g_wire, value in _fields(graph):
            if g_number == 5 and g_wire == 2:
                locations += _tensor_locations(value)
            elif g_number == 15 and g_wire == 2:          # SparseTensorProto: values, indices
                for s_number, s_wire, tensor in _fields(value):
                    if s_number in (1, 2) and s_wire == 2:
                        locations += _tensor_locations(tensor)
    return locations
