"""Quantizing codecs: the DecoderWriter asks them to turn each weight into graph nodes.

One codec class per ONNX dialect, chosen by the dialect the build names (the same table as the decoder's
op-sets, :mod:`edgekit.export.dialect`)::

    QuantCodec("ort", …) ──────> OrtCodec       (codec_ort.py)        MatMulNBits; GGUF blocks carried exactly
    QuantCodec("tensorrt", …) ─> TensorRTCodec  (codec_tensorrt.py)   DequantizeLinear (standard ONNX)
        │ both: QuantCodec (this module: options, source access, INT8 row tables, stats)
        └ and the dialect's FormPolicy (:mod:`edgekit.quant.forms`: what each weight becomes)

Each dialect module draws its graph forms. What each weight becomes is decided from its source type and shape
alone (:meth:`~edgekit.quant.forms.FormPolicy.form_of`), and the bytes of each form are counted by
:func:`~edgekit.quant.forms.form_bytes`: the planner (:mod:`edgekit.quant.sizes`) and the writer use the same
two functions, so a bundle is exactly as big as ``edgekit plan`` said.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from onnx import TensorProto

from .encodings import to_qdq_int8
from .forms import FormPolicy
from .gguf_blocks import decode

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


@dataclass(frozen=True)
class Int8Rows:
    """A (V, H) table stored as INT8 codes per row and one scale per row (initializer names)."""

    codes: str
    scales: str


def codec_class(dialect: str) -> type[QuantCodec]:
    """The codec class of ``dialect`` (imported here: the dialect modules build on this one)."""
    from .codec_ort import OrtCodec
    from .codec_tensorrt import TensorRTCodec

    codecs = {c.dialect: c for c in (OrtCodec, TensorRTCodec)}
    if dialect not in codecs:
        raise ValueError(dialect)
    return codecs[dialect]


class QuantCodec(FormPolicy):
    """``QuantCodec(dialect, …)`` makes the dialect's codec (:func:`codec_class`).

    ``exact`` (the build's default): keep every GGUF block type the ort dialect can hold exactly, even the
    6-/5-bit ones that then take a byte per weight (Q6_K, Q5_0); otherwise an INT4 build re-quantizes those to
    4 bits so that the bundle is no bigger than the GGUF (at a measured fidelity cost)."""

    rows8_reason = "round-to-nearest from floats"     # the stats' reason for an INT8 row table

    def __new__(cls, dialect: str, *args, **kwargs):
        return super().__new__(codec_class(dialect) if cls is QuantCodec else cls)

    def __init__(self, dialect: str, precision: str, float_dtype, *, block_size: int = 32,
                 accuracy_level: int = DEFAULT_ACCURACY_LEVEL, head_accuracy_level: int | None = None,
                 head_bits: int = 8, reader=None, lossless: bool = True, exact: bool = True):
        if precision not in ("int4", "int8"):
            raise ValueError(precision)
        self.precision, self.dtype = precision, np.dtype(float_dtype)
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
        self._embed = None       # the embedding's stored table, which a tied LM head reads

    # ----- what the dialects implement (the decoder's WeightCodec) ---------------------------------
    def _linear(self, b, x: str, name: str, weight, parts) -> str:
        raise NotImplementedError

    def embedding(self, b, ids: str, weight, tied: bool = False) -> str:
        raise NotImplementedError

    def lm_head(self, b, flat: str, weight, tied: bool = False) -> str:
        raise NotImplementedError

    def linear(self, b, x: str, name: str, weight, bias: np.ndarray | None, parts=()) -> str:
        """``weight`` is the (N, K) float32 array or a callable returning it (loaded only if needed)."""
        y = self._linear(b, x, name, weight, parts)
        if bias is not None:
            y = b.op("Add", y, b.weight(f"{name}.bias", bias.astype(self.dtype)), name=f"{name}/BiasAdd")
        return y

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

    def _int8_rows(self, b, weight, name: str, canonical: str) -> Int8Rows:
        """Store a (V, H) table as INT8 per row, quantized a chunk of rows at a time."""
        encs = [to_qdq_int8(w) for w in self._float_rows(canonical, weight)]   # (H, rows) codes, (rows,) scales > 0
        self.stats.requantized[self.rows8_reason] += 1
        codes = np.concatenate([e.values.T for e in encs])              # (V, H): rows are tokens
        scales = np.concatenate([e.scales for e in encs])
        return Int8Rows(b.weight(f"{name}.qweight", codes), b.weight(f"{name}.scales", scales.astype(self.dtype)))


def _chunks(rows: int, cols: int):
    step = max(1, CHUNK_ELEMENTS // max(cols, 1))
    return [(a, min(a + step, rows)) for a in range(0, rows, step)]
