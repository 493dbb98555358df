"""Quantizing codecs: the DecoderWriter asks them to turn each weight into graph nodes.

``ort`` dialect (onnxruntime CPU/CUDA)::

    x ─MatMulNBits(B uint8 (N, nb, bs*bits/8), scales, [zeros])─> y          linears, LM head
    ids ─Gather(B)─> (B,S,nb,bs) ─Cast─ -zero ─ *Gather(scales) ─Reshape─> (B,S,hidden)   embedding

  The embedding and a tied LM head share one initializer: a MatMulNBits weight is stored row by row
  (token by token), which is exactly what Gather needs.

``tensorrt`` dialect (standard ONNX)::

    W int4 (K, N) ─DequantizeLinear(axis 0, block_size)─> (K, N) ─MatMul─> y    INT4 linears
    W int8 (K, N) ─DequantizeLinear(axis 1)─> (K, N) ─MatMul─> y                 INT8 linears
    E int8 (V, H) ─DequantizeLinear(axis 0)─> (V, H) float ─┬─Gather(ids)─> (B,S,H)    embedding
                                                              └─Gemm(transB)─> logits  LM head (tied: the same DQ)

  Every scale is > 0 and INT4/INT8 initializers feed only DequantizeLinear: TensorRT refuses anything else
  ("Int8 constant is only allowed before DQ node"; onnx-tensorrt docs/operators.md lists no INT8 for Gather or
  Cast). DequantizeLinear -> Gather is the form NVIDIA's ModelOpt writes for quantized embeddings; the bundle
  stores the same bytes as a Gather of INT8 rows would.

The embedding and the LM head are INT8 at both INT4 and INT8 precision (see :mod:`edgekit.precision`).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
from onnx import TensorProto

from .encodings import NBits, QDQ, to_nbits, to_qdq_int4, to_qdq_int8
from .gguf_blocks import nbits_from_gguf, qdq_int4_from_q4_0

# INT8 LM head (MatMulNBits) block: 8-bit codes need few scales, and fp32 scales per 32 values would add 12%
# to the largest tensor; the largest of these that divides K (no padding).
HEAD_BLOCKS = (128, 64, 32)
# MatMulNBits accuracy_level: 4 = activations quantized to int8 for the dot products (much faster on CPUs with
# VNNI/AVX-512, ~0.5% relative error on a layer's output); 0 = fp32 compute (exact dequantized weights).
DEFAULT_ACCURACY_LEVEL = 4


@dataclass
class QuantStats:
    """What the codec did, for the manifest and the build report."""

    lossless: Counter = field(default_factory=Counter)        # GGUF type -> tensors carried over exactly
    requantized: Counter = field(default_factory=Counter)     # reason -> tensors quantized from floats
    bytes: int = 0
    trt_q4_0_blocks: Counter = field(default_factory=Counter)  # tensorrt: Q4_0 blocks exact / negated / requantized

    def to_dict(self) -> dict:
        out = {"lossless": dict(self.lossless), "requantized": dict(self.requantized)}
        if self.trt_q4_0_blocks:
            out["tensorrt_q4_0_blocks"] = dict(self.trt_q4_0_blocks)
        return out


class QuantCodec:
    def __init__(self, dialect: str, precision: str, float_dtype, *, block_size: int = 32,
                 accuracy_level: int = DEFAULT_ACCURACY_LEVEL, head_accuracy_level: int | None = None,
                 head_bits: int = 8, reader=None, lossless: bool = True):
        if precision not in ("int4", "int8"):
            raise ValueError(precision)
        self.dialect, self.precision, self.dtype = dialect, precision, np.dtype(float_dtype)
        self.onnx_float = TensorProto.FLOAT if self.dtype == np.float32 else TensorProto.FLOAT16
        self.bits = 4 if precision == "int4" else 8
        self.block_size = block_size
        self.accuracy_level = accuracy_level
        # The INT8 LM head: onnxruntime's CPU kernel for 8-bit weights is only fast with int8 compute (level 4).
        self.head_accuracy_level = DEFAULT_ACCURACY_LEVEL if head_accuracy_level is None else head_accuracy_level
        self.raw_reader = reader if lossless and reader is not None and hasattr(reader, "raw") else None
        self.stats = QuantStats()
        # The LM head: INT8 by default (it picks every token); INT4 (blocks of 32) trades some fidelity for speed.
        self.head_bits = head_bits
        self._embed: dict | None = None

    # ----- source encodings --------------------------------------------------------------------
    def _raw(self, canonical: str, layer: int | None):
        if self.raw_reader is None:
            return None
        try:
            return self.raw_reader.raw(canonical, layer)
        except Exception:  # a tensor the reader cannot give raw (e.g. the LM head of a tied model)
            return None

    def _lossless_nbits(self, parts) -> list[NBits] | None:
        encs = []
        for canonical, layer in parts:
            raw = self._raw(canonical, layer)
            if raw is None:
                return None
            qtype, blocks, _ = raw
            enc = nbits_from_gguf(qtype, blocks, self.raw_reader.tensor(canonical, layer))
            if enc is None:
                self.stats.requantized[f"{qtype} has no exact {self.dialect} encoding"] += 1
                return None
            encs.append((qtype, enc))
        for qtype, _ in encs:
            self.stats.lossless[qtype] += 1
        return [e for _, e in encs]

    # ----- emit ---------------------------------------------------------------------------------
    def _nbits_node(self, b, x: str, name: str, enc: NBits) -> str:
        #   x ─MatMulNBits─> y ─(+)─> out            the (+) branch only for offsets (asymmetric GGUF blocks):
        #   x ─Reshape (B,S,nb,bs)─ReduceSum─> (B,S,nb) ─MatMul(offsets^T (nb, N))─┘
        dt = self.dtype
        inputs = [x, b.weight(f"{name}.qweight", enc.blob), b.weight(f"{name}.scales", enc.scales.reshape(-1).astype(dt))]
        if enc.zero_point is not None:
            inputs.append(b.weight(f"{name}.zero_points", enc.packed_zero_points()))
        y = b.op("MatMulNBits", *inputs, domain="com.microsoft", K=enc.k, N=enc.n, bits=enc.bits,
                 block_size=enc.block_size, accuracy_level=self.accuracy_level, name=f"{name}/MatMulNBits")
        if enc.offsets is None:
            return y
        if enc.k % enc.block_size:
            raise ValueError("offsets need K to be a multiple of the block size")
        blocks = b.op("Reshape", x, b.const([0, 0, enc.n_blocks, enc.block_size]), name=f"{name}/Blocks")
        sums = b.op("ReduceSum", blocks, b.const([-1]), keepdims=0, name=f"{name}/BlockSums")    # (B, S, nb)
        shift = b.op("MatMul", sums, b.weight(f"{name}.offsets_t", enc.offsets.T.astype(dt)), name=f"{name}/Offsets")
        return b.op("Add", y, shift, name=f"{name}/AddOffsets")

    def _qdq_node(self, b, x: str, name: str, enc: QDQ) -> str:
        k, n = enc.values.shape
        elem = TensorProto.INT4 if enc.bits == 4 else TensorProto.INT8
        w = b.raw_weight(f"{name}.qweight", elem, (k, n), enc.packed())
        s = b.weight(f"{name}.scales", enc.scales.astype(self.dtype))
        attrs = {"axis": 0, "block_size": enc.block_size} if enc.block_size else {"axis": 1}
        deq = b.op("DequantizeLinear", w, s, name=f"{name}/Dequantize", **attrs)     # (K, N) float
        return b.op("MatMul", x, deq, name=f"{name}/MatMul")

    def linear(self, b, x: str, name: str, weight: np.ndarray, bias: np.ndarray | None, parts=()) -> str:
        if self.dialect == "ort":
            encs = self._lossless_nbits(parts) if parts else None
            if encs is not None and len({(e.bits, e.block_size, e.zero_point, e.offsets is None) for e in encs}) > 1:
                # parts stored in different GGUF types (Q4_K_M mixes Q4_K and Q6_K): one MatMulNBits each
                outs = [self._nbits_node(b, x, f"{name}.{i}", e) for i, e in enumerate(encs)]
                y = b.op("Concat", *outs, axis=-1, name=f"{name}/Concat")
            else:
                if encs is not None:
                    enc = _stack(encs)
                else:
                    enc = to_nbits(weight, self.bits, self.block_size)
                    self.stats.requantized["round-to-nearest from floats"] += len(parts) or 1
                y = self._nbits_node(b, x, name, enc)
        else:
            enc = self._lossless_qdq(parts) if self.bits == 4 and parts else None
            if enc is None:
                enc = to_qdq_int4(weight, self.block_size) if self.bits == 4 else to_qdq_int8(weight)
                self.stats.requantized["symmetric round-to-nearest for TensorRT"] += len(parts) or 1
            y = self._qdq_node(b, x, name, enc)
        if bias is not None:
            y = b.op("Add", y, b.weight(f"{name}.bias", bias.astype(self.dtype)), name=f"{name}/BiasAdd")
        return y

    def _lossless_qdq(self, parts) -> QDQ | None:
        encs, blocks = [], {"exact": 0, "negated": 0, "requantized": 0}
        for canonical, layer in parts:
            raw = self._raw(canonical, layer)
            if raw is None or raw[0] != "Q4_0" or self.block_size != 32:
                return None
            found = qdq_int4_from_q4_0(raw[1], self.raw_reader.tensor(canonical, layer))
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

    # ----- embedding and LM head: INT8 ----------------------------------------------------------
    def _table(self, b, weight: np.ndarray, name: str, canonical: str, *, per_row: bool = False) -> dict:
        """Store a (V, H) table once in INT8: MatMulNBits blocks (ort LM head, or an embedding it shares),
        or per row (tensorrt; an ort embedding that only Gather reads)."""
        if self.dialect == "ort":
            encs = self._lossless_nbits([(canonical, None)])
            enc = encs[0] if encs and encs[0].bits == 8 and encs[0].zero_point is None else None
            if enc is None and not per_row:
                block = next((bs for bs in HEAD_BLOCKS if weight.shape[1] % bs == 0), HEAD_BLOCKS[-1])
                enc = to_nbits(weight, 8, block)
                self.stats.requantized["round-to-nearest from floats"] += 1
            if enc is not None:
                return {"enc": enc, "blob": b.weight(f"{name}.qweight", enc.blob),
                        "scales": b.weight(f"{name}.scales", enc.scales.reshape(-1).astype(self.dtype))}
        enc = to_qdq_int8(weight)                                    # (H, V) codes, (V,) scales, all > 0
        self.stats.requantized["symmetric round-to-nearest for TensorRT" if self.dialect == "tensorrt" else
                               "round-to-nearest from floats"] += 1
        codes = np.ascontiguousarray(enc.values.T)                   # (V, H): rows are tokens
        t = {"codes": b.weight(f"{name}.qweight", codes), "scales": b.weight(f"{name}.scales",
                                                                               enc.scales.astype(self.dtype))}
        if self.dialect == "tensorrt":
            # INT8 may only feed DequantizeLinear in TensorRT (module docstring): dequantize the whole table
            # once, and let Gather (embedding) and Gemm (LM head) read the float result.
            t["table"] = b.op("DequantizeLinear", t["codes"], t["scales"], axis=0, name=f"{name}/Dequantize")
        return t

    def embedding(self, b, ids: str, weight: np.ndarray, tied: bool = False) -> str:
        shared = tied and self.head_bits == 8       # the head can read the embedding's own INT8 table
        t = self._embed = self._table(b, weight, "embed", "embed.weight", per_row=not shared)
        if "enc" in t:
            enc: NBits = t["enc"]
            codes = b.op("Gather", t["blob"], ids, axis=0, name="embed/GatherCodes")        # (B, S, nb, bs) uint8
            vals = b.op("Sub", b.op("Cast", codes, to=self.onnx_float, name="embed/Cast"),
                        b.const(128.0, self.dtype), name="embed/Center")
            scales = b.op("Reshape", t["scales"], b.const([enc.n, enc.n_blocks, 1]), name="embed/ScaleShape")
            scale = b.op("Gather", scales, ids, axis=0, name="embed/GatherScales")          # (B, S, nb, 1)
            rows = b.op("Mul", vals, scale, name="embed/Scale")
            flat = b.op("Reshape", rows, b.const([0, 0, -1]), name="embed/Flatten")         # (B, S, nb*bs)
            if enc.n_blocks * enc.block_size != enc.k:
                flat = b.op("Slice", flat, b.const([0]), b.const([enc.k]), b.const([2]), name="embed/Unpad")
            return flat
        if "table" in t:                                                                     # tensorrt
            return b.op("Gather", t["table"], ids, axis=0, name="embed/Gather")              # (B, S, H) float
        codes = b.op("Gather", t["codes"], ids, axis=0, name="embed/GatherCodes")            # (B, S, H) int8
        scales = b.op("Unsqueeze", t["scales"], b.const([1]), name="embed/ScaleCol")         # (V, 1)
        scale = b.op("Gather", scales, ids, axis=0, name="embed/GatherScales")               # (B, S, 1)
        return b.op("Mul", b.op("Cast", codes, to=self.onnx_float, name="embed/Cast"), scale, name="embed/Scale")

    def lm_head(self, b, flat: str, weight: np.ndarray, tied: bool = False) -> str:
        if self.head_bits == 4:
            return self._int4_head(b, flat, weight)
        t = self._embed if tied else self._table(b, weight, "lm_head", "lm_head.weight")
        if "enc" in t:
            enc: NBits = t["enc"]
            return b.op("MatMulNBits", flat, t["blob"], t["scales"], domain="com.microsoft", K=enc.k, N=enc.n,
                        bits=8, block_size=enc.block_size, accuracy_level=self.head_accuracy_level,
                        name="lm_head/MatMulNBits")
        deq = t.get("table") or b.op("DequantizeLinear", t["codes"], t["scales"], axis=0,
                                     name="lm_head/Dequantize")                                     # (V, H)
        return b.op("Gemm", flat, deq, transB=1, name="lm_head/Gemm")


    def _int4_head(self, b, flat: str, weight: np.ndarray) -> str:
        self.stats.requantized["round-to-nearest from floats"] += 1
        if self.dialect == "ort":
            enc = to_nbits(weight, 4, self.block_size)
            return self._nbits_node(b, flat, "lm_head", enc)
        enc = to_qdq_int4(weight, self.block_size)                      # (H, V) blocked along H
        return self._qdq_node(b, flat, "lm_head", enc)


def _stack(encs: list[NBits]) -> NBits:
    """Several MatMulNBits weights with the same K, encoding and block size, stacked along N."""
    first = encs[0]
    if len(encs) == 1:
        return first
    offsets = None if first.offsets is None else np.concatenate([e.offsets for e in encs])
    return NBits(first.bits, first.block_size, sum(e.n for e in encs), first.k,
                 np.concatenate([e.blob for e in encs]), np.concatenate([e.scales for e in encs]),
                 first.zero_point, offsets)
