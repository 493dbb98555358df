"""Export stage: a checkpoint (through a WeightReader) -> an ONNX decoder with a static KV cache.

``export_onnx(reader, spec, folder, options)`` writes into ``folder``:

- ``model.onnx``       the graph (contract in :mod:`edgekit.export.decoder`), no weights inside
- ``model.onnx.data``  every initializer, page aligned, written as the layers are emitted

and returns an :class:`ExportResult` with the graph's inputs and outputs (name, dtype, shape), which the
bundle manifest records. Peak memory is about one decoder layer in float32 beyond the memory-mapped source.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import onnx

from .. import __version__
from ..spec import ModelSpec
from .decoder import DecoderWriter, GraphOptions
from .dialect import OP_SETS
from .graph import GraphBuilder

MODEL_FILE = "model.onnx"


@dataclass(frozen=True)
class ExportResult:
    model_file: str
    data_file: str
    weights_bytes: int
    inputs: list[dict]
    outputs: list[dict]


def _io(values) -> list[dict]:
    out = []
    for v in values:
        t = v.type.tensor_type
        shape = [d.dim_param if d.HasField("dim_param") else d.dim_value for d in t.shape.dim]
        out.append({"name": v.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name, "shape": shape})
    return out


def export_onnx(reader, spec: ModelSpec, folder: Path, options: GraphOptions, *,
                codec=None, progress: Callable[[int, int], None] | None = None,
                total_bytes: int | None = None) -> ExportResult:
    """Write ``model.onnx`` + ``model.onnx.data`` for ``spec`` into ``folder`` (which must exist).

    ``codec`` turns weights into nodes: :class:`DenseCodec` (fp32/fp16) by default, or a quantizing one from
    :mod:`edgekit.quant.codec`. ``progress(done, total)`` is called after each layer: weight bytes written of
    ``total_bytes`` when given (the plan's figure), else layers.
    """
    folder = Path(folder)
    builder = GraphBuilder(f"edgekit-{spec.family}-{options.dialect}", folder / MODEL_FILE,
                           OP_SETS[options.dialect].opsets)
    try:
        report = progress
        if progress is not None and total_bytes:
            def report(done, total):
                progress(min(builder.weight_bytes, total_bytes), total_bytes)
        DecoderWriter(builder, spec, options, reader, codec=codec).write(report)
        model = builder.save(producer=f"edgekit {__version__}", metadata={
            "edgekit.dialect": options.dialect, "edgekit.precision": options.precision,
            "edgekit.max_context": str(options.max_context), "edgekit.logits": options.logits})
    finally:
        builder.abort()
    if progress is not None and total_bytes:
        progress(builder.weight_bytes, max(total_bytes, builder.weight_bytes))
    return ExportResult(MODEL_FILE, builder.data_name, builder.weight_bytes, _io(model.graph.input),
                        _io(model.graph.output))
