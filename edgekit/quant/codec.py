"""Quantizing codecs: the DecoderWriter asks them to turn each weight into graph nodes.

``ort`` dialect (onnxruntime CPU/CUDA)::

    x ─MatMulNBits(B uint8 (N, nb, bs*bits/8), scales, [zeros])─> y ─(+ offsets branch)─> y   linears, LM head
    scales = Reshape(Cast(d fp16 (N, G)) [* Cast(sc uint8 (N, nb))])       folded by onnxruntime at load
    ids ─Gather(B)─> (B,S,nb,bs·bits/8) ─unpack─ -zero ─ * Gather(scales) [+ Gather(offsets)] ─> (B,S,hidden)  embedding

  Scales (and Q4_1/Q4_K offsets) are stored as :class:`~edgekit.quant.encodings.Factor`: fp16, or GGUF's own
  fp16 super-block scale times its integer sub-block scales, and expanded to the compute dtype by
  initializer-only nodes that onnxruntime constant-folds when the session is created. The embedding gathers
  the packed rows of its tokens and decodes only those.

``tensorrt`` dialect (standard ONNX)::

    W int4 (K, N) ─DequantizeLinear(axis 0, block_size)─> (K, N) ─MatMul─> y    INT4 linears
    W int8 (K, N) ─DequantizeLinear(axis 1)─> (K, N) ─MatMul─> y                 INT8 linears
    E int8 (V, H) ─DequantizeLinear(axis 0)─> (V, H) float ─┬─Gather(ids)─> (B,S,H)    embedding
                                                              └─Gemm(transB)─> logits  LM head (tied: the same DQ)

  Every scale is > 0 and INT4/INT8 initializers feed only DequantizeLinear: TensorRT refuses anything else
  ("Int8 constant is only allowed before DQ node"; onnx-tensorrt docs/operators.md lists no INT8 for Gather or
  Cast). DequantizeLinear -> Gather is the form NVIDIA's ModelOpt writes for quantized embeddings; the bundle
  stores the same bytes as a Gather of INT8 rows would.

What each weight becomes is decided from its source type and shape alone (:meth:`QuantCodec.form_of`), and
the bytes of each form are counted by :func:`form_bytes`: the planner (:mod:`edgekit.quant.sizes`) and the
writer use the same two functions, so a bundle is exactly as big as ``edgekit plan`` said.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from onnx import TensorProto

from .encodings import QDQ, NBits, to_nbits, to_qdq_int4, to_qdq_int8
from .forms import Form, FormPolicy, form_bytes
from .gguf_blocks import LOSSLESS, decode, nbits_from_gguf, qdq_int4_from_q4_0

# MatMulNBits accuracy_level: 4 = activations quantized to int8 for the dot products (much faster on CPUs with
# VNNI/AVX-512, ~0.5% relative error on a layer's output); 0 = fp32 compute (exact dequantized weights).
DEFAULT_ACCURACY_LEVEL = 4
# Rows decoded or quantized at a time for large tables (embedding, LM head): bounds the build's memory.
CHUNK_ELEMENTS = 1 << 24

Weight = Callable[[], np.ndarray]     # loads a (N, K) float32 weight when (and only when) called


def _load(weight) -> np.ndarray:
    return weight() if callable(weight) else weight


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


class QuantCodec(FormPolicy):
    """``exact`` (the build's default): keep every GGUF block type the ort dialect can hold exactly, even the
    6-/5-bit ones that then take a byte per weight (Q6_K, Q5_0); otherwise an INT4 build re-quantizes those to
    4 bits so that the bundle is no bigger than the GGUF (at a measured fidelity cost)."""

    def __init__(self, dialect: str, precision: str, float_dtype, *, block_size: int = 32,
                 accuracy_level: int = DEFAULT_ACCURACY_LEVEL, head_accuracy_level: int | None = None,
                 head_bits: int = 8, reader=None, lossless: bool = True, exact: bool = True):
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
        self.lossless, self.exact = lossless, exact
        self.stats = QuantStats()
        # The LM head: INT8 by default (it picks every token); INT4 (blocks of 32) trades some fidelity for speed.
        self.head_bits = head_bits
        self._embed: dict | None = None
        self._written: dict[str, tuple[str, str | None]] = {}    # factor name -> its initializers

    # ----- source encodings --------------------------------------------------------------------
    def _raw(self, canonical: str, layer: int | None):
        if self.raw_reader is None:
            return None
        try:
            return self.raw_reader.raw(canonical, layer)
        except Exception:  # a tensor the reader cannot give raw (e.g. the LM head of a tied model)
            return None

    def _qtype(self, canonical: str, layer: int | None) -> str | None:
        raw = self._raw(canonical, layer)
        return None if raw is None else raw[0]

    def _carried(self, canonical: str, layer: int | None) -> NBits | None:
        """The exact encoding of a source tensor, decoded in row chunks (checked on its first rows)."""
        raw = self._raw(canonical, layer)
        if raw is None:
            return None
        qtype, blocks, shape = raw
        encs = [decode(qtype, blocks[a:b]) for a, b in _chunks(shape[0], shape[1])]
        if not encs or encs[0] is None or nbits_from_gguf(qtype, blocks[:8]) is None:
            self.stats.requantized[f"{qtype} has no exact {self.dialect} encoding"] += 1
            return None
        self.stats.lossless[qtype] += 1
        return NBits.stack(encs)

    def _check(self, form: Form, enc_bytes: int, n: int, k: int) -> None:
        expected = form_bytes(form, n, k, self.dtype.itemsize)
        if enc_bytes != expected:      # the planner counts form_bytes: a mismatch would make plan != build
            raise RuntimeError(f"internal: {form} of ({n}, {k}) wrote {enc_bytes} bytes, planned {expected}")

    # ----- emit: factors, MatMulNBits ----------------------------------------------------------------
    def _factor(self, b, name: str, f, rows: str | None = None) -> str:
        """The fp32 values of a stored Factor in its natural shape: (N, G, per) with sub-block multipliers,
        else (N, nb); for ``rows`` (token ids) only those rows, (B, S, …). The initializers are written once
        per name (a tied head reuses the embedding's).

        Few nodes on purpose: onnxruntime keeps every constant-folded intermediate until folding ends, and
        each is a float per block (R1-7B: ~0.8 GB), so the load peak grows with the length of this chain.
        """
        names = self._written.get(name)
        if names is None:
            if f.mult is None:
                names = (b.weight(f"{name}.base", f.base), None)
            else:                                   # base (N, G, 1) x mult (N, G, per): one Mul, no reshapes
                n, groups = f.base.shape
                names = (b.weight(f"{name}.base", f.base.reshape(n, groups, 1)),
                         b.weight(f"{name}.mult", f.mult.reshape(n, groups, -1)))
            self._written[name] = names
        base, mult = names
        tag = name if rows is None else f"{name}.rows"      # node names (and so output names) stay unique
        if rows is not None:
            base = b.op("Gather", base, rows, axis=0, name=f"{tag}/GatherBase")                # (B, S, G[, 1])
            mult = None if mult is None else b.op("Gather", mult, rows, axis=0, name=f"{tag}/GatherMult")
        base = b.op("Cast", base, to=TensorProto.FLOAT, name=f"{tag}/CastBase")
        if mult is None:
            return base
        return b.op("Mul", b.op("Cast", mult, to=TensorProto.FLOAT, name=f"{tag}/CastMult"), base,
                    name=f"{tag}/Expand")                                                    # (…, G, per)

    def _blocks(self, b, x: str, name: str, lead: list[int]) -> str:
        """A factor's values as (…, nb): ``lead`` is the Reshape prefix, e.g. [N, nb] or [0, 0, nb]."""
        return b.op("Reshape", x, b.const(lead), name=name)

    def _to_float(self, b, x: str, name: str) -> str:
        return x if self.onnx_float == TensorProto.FLOAT else b.op("Cast", x, to=self.onnx_float, name=name)

    def _nbits_node(self, b, x: str, name: str, enc: NBits, level: int | None = None) -> str:
        #   x ─MatMulNBits─> y ─(+)─> out            the (+) branch only for offsets (asymmetric GGUF blocks):
        #   x ─Reshape (B·S, nb, bs)─ReduceSum─> (B·S, nb) ─Gemm(offsets (N, nb), transB)─Reshape like y─┘
        scales32 = self._factor(b, f"{name}.scales", enc.scale)                          # (N, nb) or (N, G, per)
        scales = self._to_float(b, self._blocks(b, scales32, f"{name}/ScalesFlat", [-1]), f"{name}/ScalesCast")
        inputs = [x, b.weight(f"{name}.qweight", enc.blob), scales]
        if enc.zero_point is not None:
            inputs.append(b.weight(f"{name}.zero_points", enc.packed_zero_points()))
        y = b.op("MatMulNBits", *inputs, domain="com.microsoft", K=enc.k, N=enc.n, bits=enc.bits,
                 block_size=enc.block_size, accuracy_level=self.accuracy_level if level is None else level,
                 name=f"{name}/MatMulNBits")
        if enc.offset is None:
            return y
        if enc.k % enc.block_size:
            raise ValueError("offsets need K to be a multiple of the block size")
        offsets = self._offsets(b, name, enc, scales32)                                   # like scales32
        if enc.offset.mult is not None:
            offsets = self._blocks(b, offsets, f"{name}/OffsetBlocks", [enc.n, enc.n_blocks])
        offsets = self._to_float(b, offsets, f"{name}/OffsetsCast")                      # (N, nb)
        blocks = b.op("Reshape", x, b.const([-1, enc.n_blocks, enc.block_size]), name=f"{name}/Blocks")
        sums = b.op("ReduceSum", blocks, b.const([-1]), keepdims=0, name=f"{name}/BlockSums")    # (B·S, nb)
        shift = b.op("Gemm", sums, offsets, transB=1, name=f"{name}/Offsets")                   # (B·S, N)
        shift = b.op("Reshape", shift, b.op("Shape", y, name=f"{name}/OutShape"), name=f"{name}/OffsetsShape")
        return b.op("Add", y, shift, name=f"{name}/AddOffsets")

    def _offsets(self, b, name: str, enc: NBits, scales32: str, rows: str | None = None) -> str:
        """offset_sign * offset + offset_shift * scales, fp32, same shape as ``scales32``."""
        off = self._factor(b, f"{name}.offsets", enc.offset, rows)
        if enc.offset_sign != 1.0:
            off = b.op("Mul", off, b.const(enc.offset_sign, np.float32), name=f"{name}/OffsetSign")
        return b.op("Add", off, b.op("Mul", scales32, b.const(enc.offset_shift, np.float32), name=f"{name}/Shift"),
                    name=f"{name}/OffsetTotal")

    def _qdq_node(self, b, x: str, name: str, enc: QDQ) -> str:
        k, n = enc.values.shape
        elem = TensorProto.INT4 if enc.bits == 4 else TensorProto.INT8
        w = b.raw_weight(f"{name}.qweight", elem, (k, n), enc.packed())
        s = b.weight(f"{name}.scales", enc.scales.astype(self.dtype))
        attrs = {"axis": 0, "block_size": enc.block_size} if enc.block_size else {"axis": 1}
        deq = b.op("DequantizeLinear", w, s, name=f"{name}/Dequantize", **attrs)     # (K, N) float
        return b.op("MatMul", x, deq, name=f"{name}/MatMul")

    # ----- linears ----------------------------------------------------------------------------------
    def linear(self, b, x: str, name: str, weight, bias: np.ndarray | None, parts=()) -> str:
        """``weight`` is the (N, K) float32 array or a callable returning it (loaded only if needed)."""
        if self.dialect == "ort":
            y = self._ort_linear(b, x, name, weight, parts)
        else:
            y = self._trt_linear(b, x, name, weight, parts)
        if bias is not None:
            y = b.op("Add", y, b.weight(f"{name}.bias", bias.astype(self.dtype)), name=f"{name}/BiasAdd")
        return y

    def _ort_linear(self, b, x: str, name: str, weight, parts) -> str:
        parts = list(parts) or [(None, None)]
        forms = [self.form_of("linear", self._qtype(c, n) if c else None, 0) for c, n in parts]
        if all(f.kind == "nbits" for f in forms):           # floats (or re-quantized types): one encoding
            w = _load(weight)
            enc = _rtn(w, self.bits, self.block_size)
            self._check(forms[0], enc.nbytes, *w.shape)
            self.stats.requantized[self._why(parts)] += len(parts)
            return self._nbits_node(b, x, name, enc)
        encs = []
        for (canonical, layer), form in zip(parts, forms):
            enc = self._carried(canonical, layer) if form.kind == "carry" else None
            if enc is None:     # a part stored in a type kept as floats here: its own rows, re-quantized
                w = self._part_floats(canonical, layer)
                enc = _rtn(w, self.bits, self.block_size)
                form = Form("nbits", self.bits, self.block_size)
                self.stats.requantized[self._why([(canonical, layer)])] += 1
            self._check(form, enc.nbytes, enc.n, enc.k)
            encs.append(enc)
        if all(e.same_form(encs[0]) for e in encs):
            return self._nbits_node(b, x, name, NBits.stack(encs))
        # parts stored in different GGUF types (Q4_K_M mixes Q4_K and Q6_K): one MatMulNBits each
        outs = [self._nbits_node(b, x, f"{name}.{i}", e) for i, e in enumerate(encs)]
        return b.op("Concat", *outs, axis=-1, name=f"{name}/Concat")

    def _float_rows(self, canonical: str, weight):
        """The float32 rows of a large table, a chunk at a time: decoded from the file's blocks when the reader
        has them (never the whole table in float32: 2.2 GB for a 152k x 3584 head), else sliced from the
        loaded weight."""
        raw = self._raw(canonical, None)
        if raw is None:
            w = _load(weight)
            for a, c in _chunks(*w.shape):
                yield w[a:c]
            return
        from gguf.constants import GGMLQuantizationType
        from gguf.quants import dequantize

        qtype, blocks, shape = raw
        for a, c in _chunks(*shape):
            enc = decode(qtype, blocks[a:c])
            yield (enc.dequantize() if enc is not None else
                   dequantize(np.ascontiguousarray(blocks[a:c]).reshape(c - a, -1),
                              GGMLQuantizationType[qtype]).reshape(c - a, shape[1]).astype(np.float32))

    def _part_floats(self, canonical: str, layer: int | None) -> np.ndarray:
        raw = self._raw(canonical, layer)
        if raw is not None and raw[0] in LOSSLESS:
            enc = decode(raw[0], raw[1])
            if enc is not None:
                return enc.dequantize()
        return self.raw_reader.tensor(canonical, layer)

    def _why(self, parts) -> str:
        qtypes = {self._qtype(c, n) for c, n in parts if c}
        qtypes.discard(None)
        kept = sorted(q for q in qtypes if q in LOSSLESS)
        if kept and self.lossless:
            return f"{'/'.join(kept)} re-quantized to {self.bits} bits (--compact-blocks)"
        return "round-to-nearest from floats"

    def _trt_linear(self, b, x: str, name: str, weight, parts) -> str:
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
    def _table(self, b, weight, name: str, canonical: str, role: str, tied: bool = False) -> dict:
        """Store a (V, H) table once: MatMulNBits blocks (ort: carried or INT8), or INT8 per row."""
        k = _k_of(weight, self.raw_reader, canonical)
        form = self.form_of(role, self._qtype(canonical, None), k, tied=tied)
        enc = self._carried(canonical, None) if form.kind == "carry" else None
        if form.kind == "carry" and enc is None:        # blocks that do not decode (e.g. non-finite scales)
            form = self.form_of(role, None, k, tied=tied)
        if form.kind in ("carry", "nbits"):
            if enc is None:
                enc = NBits.stack([to_nbits(w, form.bits, form.block) for w in self._float_rows(canonical, weight)])
                self.stats.requantized["round-to-nearest from floats"] += 1
            self._check(form, enc.nbytes, enc.n, enc.k)
            return {"enc": enc, "blob": b.weight(f"{name}.qweight", enc.blob)}
        encs = [to_qdq_int8(w) for w in self._float_rows(canonical, weight)]   # (H, rows) codes, (rows,) scales > 0
        self.stats.requantized["symmetric round-to-nearest for TensorRT" if self.dialect == "tensorrt" else
                               "round-to-nearest from floats"] += 1
        codes = np.concatenate([e.values.T for e in encs])              # (V, H): rows are tokens
        scales = np.concatenate([e.scales for e in encs])
        t = {"codes": b.weight(f"{name}.qweight", codes), "scales": b.weight(f"{name}.scales",
                                                                               scales.astype(self.dtype))}
        if self.dialect == "tensorrt":
            # INT8 may only feed DequantizeLinear in TensorRT (module docstring): dequantize the whole table
            # once, and let Gather (embedding) and Gemm (LM head) read the float result.
            t["table"] = b.op("DequantizeLinear", t["codes"], t["scales"], axis=0, name=f"{name}/Dequantize")
        return t

    def embedding(self, b, ids: str, weight, tied: bool = False) -> str:
        t = self._embed = self._table(b, weight, "embed", "embed.weight", "embedding", tied)
        if "enc" in t:
            return self._gather_rows(b, ids, t["enc"], t["blob"])
        if "table" in t:                                                                     # tensorrt
            return b.op("Gather", t["table"], ids, axis=0, name="embed/Gather")              # (B, S, H) float
        codes = b.op("Gather", t["codes"], ids, axis=0, name="embed/GatherCodes")            # (B, S, H) int8
        scales = b.op("Unsqueeze", t["scales"], b.const([1]), name="embed/ScaleCol")         # (V, 1)
        scale = b.op("Gather", scales, ids, axis=0, name="embed/GatherScales")               # (B, S, 1)
        return b.op("Mul", b.op("Cast", codes, to=self.onnx_float, name="embed/Cast"), scale, name="embed/Scale")

    def _gather_rows(self, b, ids: str, enc: NBits, blob: str) -> str:
        #   ids ─Gather(blob)─> (B,S,nb,bytes) ─[nibbles]─> (B,S,nb,bs) ─Cast - zero─ * scale [+ offset] ─> (B,S,K)
        #   scale, offset: Gather rows of the stored factors, expanded for those rows only
        codes = b.op("Gather", blob, ids, axis=0, name="embed/GatherCodes")                  # (B, S, nb, bytes)
        if enc.bits == 4:
            lo = b.op("BitwiseAnd", codes, b.const(15, np.uint8), name="embed/Low")
            hi = b.op("BitShift", codes, b.const(4, np.uint8), direction="RIGHT", name="embed/High")
            pair = b.op("Concat", b.op("Unsqueeze", lo, b.const([-1]), name="embed/LowCol"),
                        b.op("Unsqueeze", hi, b.const([-1]), name="embed/HighCol"), axis=-1, name="embed/Pairs")
            codes = b.op("Reshape", pair, b.const([0, 0, enc.n_blocks, enc.block_size]), name="embed/Codes")
        vals = b.op("Sub", b.op("Cast", codes, to=TensorProto.FLOAT, name="embed/Cast"),
                    b.const(float(enc.zero), np.float32), name="embed/Center")            # (B, S, nb, bs)
        scale = self._factor(b, "embed.scales", enc.scale, ids)                        # (B, S, nb | G, per)
        col = [0, 0, enc.n_blocks, 1]                                                          # (B, S, nb, 1)
        rows = b.op("Mul", vals, self._blocks(b, scale, "embed/ScaleCol", col), name="embed/Scale")
        if enc.offset is not None:
            off = self._offsets(b, "embed", enc, scale, ids)
            rows = b.op("Add", rows, self._blocks(b, off, "embed/OffsetCol", col), name="embed/Offset")
        flat = b.op("Reshape", rows, b.const([0, 0, -1]), name="embed/Flatten")           # (B, S, nb*bs)
        if enc.n_blocks * enc.block_size != enc.k:
            flat = b.op("Slice", flat, b.const([0]), b.const([enc.k]), b.const([2]), name="embed/Unpad")
        return self._to_float(b, flat, "embed/CastOut")

    def lm_head(self, b, flat: str, weight, tied: bool = False) -> str:
        if self.head_bits == 4:
            return self._int4_head(b, flat, weight)
        if tied:
            t = self._embed
        else:
            t = self._table(b, weight, "lm_head", "lm_head.weight", "lm_head")
        if "enc" in t:
            enc: NBits = t["enc"]
            name = "embed" if tied else "lm_head"
            scales = self._to_float(b, self._blocks(b, self._factor(b, f"{name}.scales", enc.scale),
                                                    "lm_head/ScalesFlat", [-1]), "lm_head/ScalesCast")
            return b.op("MatMulNBits", flat, t["blob"], scales, domain="com.microsoft", K=enc.k, N=enc.n,
                        bits=enc.bits, block_size=enc.block_size, accuracy_level=self.head_accuracy_level,
                        name="lm_head/MatMulNBits")
        deq = t.get("table") or b.op("DequantizeLinear", t["codes"], t["scales"], axis=0,
                                     name="lm_head/Dequantize")                                     # (V, H)
        return b.op("Gemm", flat, deq, transB=1, name="lm_head/Gemm")

    def _int4_head(self, b, flat: str, weight) -> str:
        self.stats.requantized["round-to-nearest from floats"] += 1
        w = _load(weight)
        if self.dialect == "ort":
            return self._nbits_node(b, flat, "lm_head", _rtn(w, 4, self.block_size))
        enc = to_qdq_int4(w, self.block_size)                      # (H, V) blocked along H
        return self._qdq_node(b, flat, "lm_head", enc)


def _rtn(w: np.ndarray, bits: int, block: int) -> NBits:
    """Round-to-nearest MatMulNBits in row chunks (the float temporaries stay small)."""
    return NBits.stack([to_nbits(w[a:c], bits, block) for a, c in _chunks(*w.shape)])


def _chunks(rows: int, cols: int):
    step = max(1, CHUNK_ELEMENTS // max(cols, 1))
    return [(a, min(a + step, rows)) for a in range(0, rows, step)]


def _k_of(weight, reader, canonical: str = "embed.weight") -> int:
    if isinstance(weight, np.ndarray):
        return weight.shape[1]
    shape = getattr(weight, "shape", None)
    if shape is not None:
        return shape[1]
    if reader is not None:
        try:
            return reader.raw(canonical, None)[2][1]
        except Exception:
            pass
    return _load(weight).shape[1]
