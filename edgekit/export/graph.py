"""A small ONNX graph builder that streams weights straight to the external-data file.

Why not build a ModelProto with the weights inside and save it at the end: that holds the whole model in
memory at least twice (numpy + protobuf), and protobuf refuses anything over 2 GB. Here every weight is
appended to ``<model>.onnx.data`` the moment it is added and only a reference (offset, length) stays in the
graph, so exporting needs about one layer's worth of memory beyond the memory-mapped source.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

# Offsets in the data file are page aligned so that runtimes can memory-map initializers.
_ALIGN = 4096
# Tensors below this many bytes stay inside the .onnx file (shape constants, scalars).
_INLINE_BYTES = 1024

NP_TO_ONNX = {
    np.dtype(np.float32): TensorProto.FLOAT,
    np.dtype(np.float16): TensorProto.FLOAT16,
    np.dtype(np.int64): TensorProto.INT64,
    np.dtype(np.int32): TensorProto.INT32,
    np.dtype(np.int8): TensorProto.INT8,
    np.dtype(np.uint8): TensorProto.UINT8,
    np.dtype(bool): TensorProto.BOOL,
}


class GraphBuilder:
    """Collects nodes, inputs and outputs; writes initializers to ``data_path`` as they come."""

    def __init__(self, name: str, model_path: Path, opsets: dict[str, int]):
        self.name = name
        self.model_path = Path(model_path)
        self.data_name = self.model_path.name + ".data"
        self.opsets = opsets
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self._counter = itertools.count()
        self._consts: dict[tuple, str] = {}
        self._data = open(self.model_path.parent / self.data_name, "wb")
        self._offset = 0
        self.weight_bytes = 0

    # ----- naming -----------------------------------------------------------------------------
    def fresh(self, base: str) -> str:
        return f"{base}_{next(self._counter)}"

    # ----- graph I/O --------------------------------------------------------------------------
    def input(self, name: str, elem_type: int, shape: Sequence[int | str], default: np.ndarray | None = None) -> str:
        """A graph input; with ``default`` also an initializer of that name, which a caller may override by
        feeding the input (ONNX IR >= 4) and which onnxruntime therefore never constant-folds."""
        self.inputs.append(helper.make_tensor_value_info(name, elem_type, list(shape)))
        if default is not None:
            self.initializers.append(numpy_helper.from_array(np.asarray(default), name))
        return name

    def output(self, name: str, elem_type: int, shape: Sequence[int | str]) -> str:
        self.outputs.append(helper.make_tensor_value_info(name, elem_type, list(shape)))
        return name

    # ----- nodes ------------------------------------------------------------------------------
    def op(self, op_type: str, *inputs: str, outputs: int | Sequence[str] = 1, domain: str = "",
           name: str | None = None, **attrs) -> str | list[str]:
        """Add a node; returns its output name (or names when ``outputs`` > 1 or a list)."""
        node_name = name or self.fresh(op_type)
        if isinstance(outputs, int):
            out_names = [f"{node_name}/out{i}" if outputs > 1 else f"{node_name}/out" for i in range(outputs)]
        else:
            out_names = list(outputs)
        self.nodes.append(helper.make_node(op_type, list(inputs), out_names, name=node_name, domain=domain,
                                           **attrs))
        return out_names[0] if len(out_names) == 1 else out_names

    # ----- initializers -----------------------------------------------------------------------
    def weight(self, name: str, array: np.ndarray) -> str:
        """A named initializer; large ones go to the external-data file right away. Every weight counts in
        ``weight_bytes`` (small ones stay inside the .onnx file), constants made by :meth:`const` do not."""
        array = np.ascontiguousarray(array)
        self.initializers.append(self._tensor(name, array))
        if array.nbytes < _INLINE_BYTES:
            self.weight_bytes += array.nbytes
        return name

    def raw_weight(self, name: str, elem_type: int, dims: Sequence[int], raw: bytes | np.ndarray) -> str:
        """An initializer from already-encoded bytes (e.g. packed INT4), written to the data file."""
        tensor = TensorProto()
        tensor.name = name
        tensor.data_type = elem_type
        tensor.dims.extend(int(d) for d in dims)
        self._externalize(tensor, memoryview(raw).cast("B"))
        self.initializers.append(tensor)
        return name

    def const(self, value, dtype=np.int64) -> str:
        """A small constant (shapes, axes, scalars), shared between uses."""
        array = np.asarray(value, dtype=dtype)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._consts:
            name = self.fresh("const")
            self.initializers.append(numpy_helper.from_array(array, name))
            self._consts[key] = name
        return self._consts[key]

    def _tensor(self, name: str, array: np.ndarray) -> TensorProto:
        if array.nbytes < _INLINE_BYTES:
            return numpy_helper.from_array(array, name)
        tensor = TensorProto()
        tensor.name = name
        tensor.data_type = NP_TO_ONNX[array.dtype]
        tensor.dims.extend(array.shape)
        self._externalize(tensor, memoryview(array.reshape(-1)).cast("B"))
        return tensor

    def _externalize(self, tensor: TensorProto, data: memoryview) -> None:
        pad = (-self._offset) % _ALIGN
        if pad:
            self._data.write(b"\0" * pad)
            self._offset += pad
        self._data.write(data)
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.data_name), ("offset", str(self._offset)),
                           ("length", str(data.nbytes))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        self._offset += data.nbytes
        self.weight_bytes += data.nbytes

    # ----- finish -----------------------------------------------------------------------------
    def save(self, *, producer: str, doc: str = "", metadata: dict[str, str] | None = None) -> onnx.ModelProto:
        """Write the .onnx file (the data file is already complete) and return the model (no weights in it)."""
        self._data.flush()
        os.fsync(self._data.fileno())
        self._data.close()
        graph = helper.make_graph(self.nodes, self.name, self.inputs, self.outputs, self.initializers,
                                  doc_string=doc)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in self.opsets.items()],
                                  producer_name=producer)
        model.ir_version = 10  # ONNX 1.16+: understood by onnxruntime >= 1.18 and TensorRT 10
        for key, value in (metadata or {}).items():
            entry = model.metadata_props.add()
            entry.key, entry.value = key, value
        with open(self.model_path, "wb") as f:
            f.write(model.SerializeToString())
            f.flush()
            os.fsync(f.fileno())
        return model

    def abort(self) -> None:
        if not self._data.closed:
            self._data.close()
