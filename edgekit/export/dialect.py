"""The ONNX dialects a decoder is written in, each a small class behind one Protocol.

Dispatch (a third dialect adds one module per row and a line in each table, no branches)::

    GraphOptions.dialect ─┬─ OP_SETS[dialect](writer) ─┬─ OrtOps        export/ops_ort.py       contrib ops
                          │   (DialectOps: the graph)  └─ TensorRTOps   export/ops_tensorrt.py  standard ONNX
                          └─ QuantCodec(dialect, …) ───┬─ OrtCodec      quant/codec_ort.py      MatMulNBits
                              (WeightCodec: weights)   └─ TensorRTCodec quant/codec_tensorrt.py DequantizeLinear

The :class:`~edgekit.export.decoder.DecoderWriter` writes everything the dialects share (embedding, layer
loop, MLP, LM head) and asks its op-set for the parts that differ; weights become nodes through a
:class:`WeightCodec` (``DenseCodec`` for float graphs, or a quantizing codec of the same dialect).
"""

from __future__ import annotations

from typing import Protocol

from .ops_ort import OrtOps
from .ops_tensorrt import TensorRTOps


class DialectOps(Protocol):
    """The parts of the decoder graph that differ between dialects. Built with the DecoderWriter (its
    ``b``, ``spec``, ``onnx_dtype``, ``cos``/``sin``); may refuse a model it cannot express."""

    name: str
    opsets: dict[str, int]          # ONNX domain -> opset version the graph declares

    def declare_inputs(self) -> None:
        """Graph inputs besides input_ids and the KV cache, declared before any weight."""

    def after_embedding(self, ids: str) -> None:
        """Set-up after the embedding, before the first layer (positions, masks)."""

    def add_norm(self, pending: str | None, residual: str, name: str, w: str) -> tuple[str, str]:
        """(residual + pending) -> RMSNorm with weight ``w``: (normed, new residual)."""

    def attention(self, qkv: str, i: int) -> str:
        """Layer ``i``'s attention from packed (B, S, q + 2 kv), with its KV cache inputs and outputs."""

    def last_rows(self, normed: str) -> tuple[str, str | None]:
        """The positions whose logits a "last" graph returns, and the input that counts them (or None: one)."""


class WeightCodec(Protocol):
    """How weights become graph nodes. ``weight`` is an array or a callable returning it (read only when the
    codec needs the values); ``parts`` names the checkpoint tensors a packed weight was made of."""

    def linear(self, b, x: str, name: str, weight, bias, parts=()) -> str: ...

    def embedding(self, b, ids: str, weight, tied: bool = False) -> str: ...

    def lm_head(self, b, flat: str, weight, tied: bool = False) -> str: ...


OP_SETS: dict[str, type[DialectOps]] = {ops.name: ops for ops in (OrtOps, TensorRTOps)}
DIALECTS = tuple(OP_SETS)
