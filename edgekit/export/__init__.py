"""Export stage: a checkpoint -> an ONNX decoder with a static KV cache (:mod:`.onnx_export`)."""

from .decoder import DenseCodec, GraphOptions
from .dialect import DIALECTS
from .onnx_export import MODEL_FILE, ExportResult, export_onnx

__all__ = ["DIALECTS", "DenseCodec", "ExportResult", "GraphOptions", "MODEL_FILE", "export_onnx"]
