"""The ``ort`` codec (onnxruntime CPU/CUDA): MatMulNBits, with GGUF blocks carried over exactly.

::

    x ─MatMulNBits(B uint8 (N, nb, bs*bits/8), scales, [zeros])─> y ─(+ offsets branch)─> y   linears, LM head
    scales = Reshape(Cast(d fp16 (N, G)) [* Cast(sc uint8 (N, nb))])       folded by onnxruntime at load
    ids ─Gather(B)─> (B,S,nb,bs·bits/8) ─unpack─ -zero ─ * Gather(scales) [+ Gather(offsets)] ─> (B,S,hidden)  embedding

  Scales (and Q4_1/Q4_K offsets) are stored as :class:`~edgekit.quant.encodings.Factor`: fp16, or GGUF's own
  fp16 super-block scale times its integer sub-block scales, and expanded to the compute dtype by
  initializer-only nodes that onnxruntime constant-folds when the session is created. The embedding gathers
  the packed rows of its tokens and decodes only those.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from onnx import TensorProto

from .codec import Int8Rows, QuantCodec, _chunks, _load
from .encodings import NBits, to_nbits
from .forms import Form, OrtForms, form_bytes
from .gguf_blocks import LOSSLESS, decode, nbits_from_gguf


@dataclass(frozen=True)
class PackedRows:
    """A (V, H) table stored as MatMulNBits blocks: its encoding and the name of its packed initializer."""

    enc: NBits
    blob: str


class OrtCodec(QuantCodec, OrtForms):
    """Writes each weight as MatMulNBits blocks (module docstring); decisions from :class:`OrtForms`."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._written: dict[str, tuple[str, str | None]] = {}    # factor name -> its initializers

    # ----- source encodings --------------------------------------------------------------------
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

    # ----- linears ----------------------------------------------------------------------------------
    def _linear(self, b, x: str, name: str, weight, parts) -> str:
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

    # ----- embedding and LM head -----------------------------------------------------------------
    def _table(self, b, weight, name: str, canonical: str, role: str, tied: bool = False) -> PackedRows | Int8Rows:
        """Store a (V, H) table once: MatMulNBits blocks (carried or from floats), or INT8 per row."""
        k = _k_of(weight, self.raw_reader, canonical)
        form = self.form_of(role, self._qtype(canonical, None), k, tied=tied)
        enc = self._carried(canonical, None) if form.kind == "carry" else None
        if form.kind == "carry" and enc is None:        # blocks that do not decode (e.g. non-finite scales)
            form = self.form_of(role, None, k, tied=tied)
        if form.kind not in ("carry", "nbits"):
            return self._int8_rows(b, weight, name, canonical)
        if enc is None:
            enc = NBits.stack([to_nbits(w, form.bits, form.block) for w in self._float_rows(canonical, weight)])
            self.stats.requantized["round-to-nearest from floats"] += 1
        self._check(form, enc.nbytes, enc.n, enc.k)
        return PackedRows(enc, b.weight(f"{name}.qweight", enc.blob))

    def embedding(self, b, ids: str, weight, tied: bool = False) -> str:
        t = self._embed = self._table(b, weight, "embed", "embed.weight", "embedding", tied)
        if isinstance(t, PackedRows):
            return self._gather_rows(b, ids, t.enc, t.blob)
        codes = b.op("Gather", t.codes, ids, axis=0, name="embed/GatherCodes")               # (B, S, H) int8
        scales = b.op("Unsqueeze", t.scales, b.const([1]), name="embed/ScaleCol")            # (V, 1)
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
            self.stats.requantized["round-to-nearest from floats"] += 1
            return self._nbits_node(b, flat, "lm_head", _rtn(_load(weight), 4, self.block_size))
        # An INT8 head is always MatMulNBits blocks here (OrtForms.form_of), so is a tied head's embedding.
        t: PackedRows = self._embed if tied else self._table(b, weight, "lm_head", "lm_head.weight", "lm_head")
        enc, name = t.enc, "embed" if tied else "lm_head"
        scales = self._to_float(b, self._blocks(b, self._factor(b, f"{name}.scales", enc.scale),
                                                "lm_head/ScalesFlat", [-1]), "lm_head/ScalesCast")
        return b.op("MatMulNBits", flat, t.blob, scales, domain="com.microsoft", K=enc.k, N=enc.n,
                    bits=enc.bits, block_size=enc.block_size, accuracy_level=self.head_accuracy_level,
                    name="lm_head/MatMulNBits")


def _rtn(w: np.ndarray, bits: int, block: int) -> NBits:
    """Round-to-nearest MatMulNBits in row chunks (the float temporaries stay small)."""
    return NBits.stack([to_nbits(w[a:c], bits, block) for a, c in _chunks(*w.shape)])


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
