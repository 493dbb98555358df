"""Element types and their sizes: the one table behind the planner, the model description, both backends and
the memory check. Standard library only (the names are numpy's; the backends turn them into numpy dtypes).
"""

from __future__ import annotations

# Bytes per element of edgekit's dtype names (precisions, compute dtypes). int4 packs two values per byte.
DTYPE_BYTES: dict[str, float] = {"fp32": 4, "fp16": 2, "bf16": 2, "fp8": 1, "int8": 1, "int4": 0.5}

# A manifest's graph.kv_dtype -> the numpy dtype of the KV cache buffers ("float" is what older bundles say;
# int8 is the ort dialect's --kv-cache int8, export/kv_int8.py).
KV_DTYPES: dict[str, str] = {"float": "float32", "float32": "float32", "float16": "float16", "int8": "int8"}

# ONNX TensorProto element types (onnx.proto) of a KV cache, and their sizes in bytes.
ONNX_ELEM_TYPES: dict[str, int] = {"float32": 1, "float16": 10, "bfloat16": 16, "int8": 3}
ONNX_ELEM_BYTES: dict[int, int] = {1: 4, 10: 2, 16: 2, 3: 1}
