"""The ``tensorrt`` codec: standard ONNX DequantizeLinear, the only INT4/INT8 form TensorRT parses.

::

    W int4 (K, N) ─DequantizeLinear(axis 0, block_size)─> (K, N) ─MatMul─> y    INT4 linears
    W int8 (K, N) ─DequantizeLinear(axis 1)─> (K, N) ─MatMul─> y                 INT8 linears
    E int8 (V, H) ─DequantizeLinear(axis 0)─> (V, H) float ─┬─Gather(ids)─> (B,S,H)    embedding
                                                              └─Gemm(transB)─> logits  LM head (tied: the same DQ)

  Every scale is > 0 and INT4/INT8 initializers feed only DequantizeLinear: TensorRT refuses anything else
  ("Int8 constant is only allowed before DQ node"; onnx-tensorrt docs/operators.md lists no INT8 for Gather or
  Cast). DequantizeLinear -> Gather is the form NVIDIA's ModelOpt writes for quantized embeddings; the bundle
  stores the same bytes as a Gather of INT8 rows would.
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto

from .codec import QuantCodec, _load
from .encodings import QDQ, to_qdq_int4, to_qdq_int8
from .forms import TensorRTForms
from .gguf_blocks import qdq_int4_from_q4_0


class TensorRTCodec(QuantCodec, TensorRTForms):
    """Writes each weight as DequantizeLinear of INT4/INT8 codes (module docstring); Q4_0 blocks are carried."""

    rows8_reason = "symmetric round-to-nearest for TensorRT"

    def _qdq_node(self, b, x: str, name: str, enc: QDQ) -> str:
        k, n = enc.values.shape
        elem = TensorProto.INT4 if enc.bits == 4 else TensorProto.INT8
        w = b.raw_weight(f"{name}.qweight", elem, (k, n), enc.packed())
        s = b.weight(f"{name}.scales", enc.scales.astype(self.dtype))
        attrs = {"axis": 0, "block_size": enc.block_size} if enc.block_size else {"axis": 1}
        deq = b.op("DequantizeLinear", w, s, name=f"{name}/Dequantize", **attrs)     # (K, N) float
        return b.op("MatMul", x, deq, name=f"{name}/MatMul")

    def _linear(self, b, x: str, name: str, weight, parts) -> str:
        enc = self._lossless_qdq(parts) if self.bits == 4 and parts else None
        if enc is None:
            w = _load(weight)
            enc = to_qdq_int4(w, self.block_size) if self.bits == 4 else to_qdq_int8(w)
            self.stats.requantized["symmetric round-to-nearest for TensorRT"] += len(parts) or 1
        return self._qdq_node(b, x, name, enc)

    def _lossless_qdq(self, parts) -> QDQ | None:
        encs, blocks = [], {"exact": 0, "negated": 0, "requantized": 0}
        for canonical, layer in parts:
            raw = self._raw(canonical, layer)
            if raw is None or not self._trt_carries(raw[0]):
                return None
            found = qdq_int4_from_q4_0(raw[1])
            if found is None:
                return None
            encs.append(found[0])
            for key, count in found[1].items():
                blocks[key] += count
        # TensorRT needs positive scales: a Q4_0 block with d < 0 is carried negated, or re-quantized when its
        # -8 code cannot be negated (see qdq_int4_from_q4_0); the manifest counts both.
        for key, count in blocks.items():
            self.stats.trt_q4_0_blocks[key] += count
        if blocks["requantized"]:
            self.stats.requantized["Q4_0 with d < 0 and code -8: those blocks re-quantized for TensorRT"] += len(encs)
        else:
            self.stats.lossless["Q4_0"] += len(encs)
        return QDQ(4, 32, np.concatenate([e.values for e in encs], axis=1),
                   np.concatenate([e.scales for e in encs], axis=1))

    # ----- embedding and LM head -----------------------------------------------------------------
    def _table(self, b, weight, name: str, canonical: str) -> str:
        """A (V, H) table stored INT8 per row and dequantized once: INT8 may only feed DequantizeLinear in
        TensorRT (module docstring), so Gather (embedding) and Gemm (LM head) read the float result."""
        rows = self._int8_rows(b, weight, name, canonical)
        return b.op("DequantizeLinear", rows.codes, rows.scales, axis=0, name=f"{name}/Dequantize")

    def embedding(self, b, ids: str, weight, tied: bool = False) -> str:
        self._embed = self._table(b, weight, "embed", "embed.weight")
        return b.op("Gather", self._embed, ids, axis=0, name="embed/Gather")                 # (B, S, H) float

    def lm_head(self, b, flat: str, weight, tied: bool = False) -> str:
        if self.head_bits == 4:
            self.stats.requantized["round-to-nearest from floats"] += 1
            enc = to_qdq_int4(_load(weight), self.block_size)                 # (H, V) blocked along H
            return self._qdq_node(b, flat, "lm_head", enc)
        table = self._embed if tied else self._table(b, weight, "lm_head", "lm_head.weight")    # (V, H)
        return b.op("Gemm", flat, table, transB=1, name="lm_head/Gemm")
