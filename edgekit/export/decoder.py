"""The decoder graph, written straight from the weights: one builder, two dialects.

Graph contract (``B`` = batch, ``S`` = new tokens this step, ``P`` = tokens already in the cache,
``C`` = KV capacity (the runtime's max_context), ``L`` = layers, ``Hkv`` = KV heads, ``D`` = head_dim,
``V`` = vocab; ``N`` = 1 when logits are "last" (``ort``: ``logits_rows``, default 1), else S; float = the
precision's float type)

dialect ``ort`` (onnxruntime CPU/CUDA; contrib ops, in-place KV cache)::

  inputs   input_ids              int64  (B, S)
           seqlens_k              int32  (B,)        P + S - 1 (index of the last valid position)
           total_sequence_length  int32  (1,)        P + S
           past_key_{i}           float  (B, Hkv, C, D)   i = 0 .. L-1, likewise past_value_{i}
           logits_rows            int64  (1,)        "last" graphs only, optional: N, 1 <= N <= S; its default
                                                     (an initializer of the same name) is 1. Speculative
                                                     decoding feeds S to verify S tokens in one run.
  outputs  logits                 float32 (B, N, V)
           present_key_{i}        float  (B, Hkv, C, D)   the SAME buffer as past_key_{i}
           present_value_{i}      float  (B, Hkv, C, D)

  GroupQueryAttention writes the S new positions into the buffer it is given, so the runtime binds one
  preallocated OrtValue per layer as both past and present (IO binding): no copy, no allocation per token,
  and the cache memory is exactly B * L * 2 * Hkv * C * D * sizeof(float), known at load time.

dialect ``tensorrt`` (standard ONNX only, opset 21; TensorRT cannot alias an input to an output)::

  inputs   input_ids              int64  (B, S)
           past_key_{i}           float  (B, P, Hkv, D)   the first P rows of the runtime's (B, C, Hkv, D) buffer
           past_value_{i}         float  (B, P, Hkv, D)
  outputs  logits                 float32 (B, N, V)
           new_key_{i}            float  (B, S, Hkv, D)   the runtime copies these to rows P .. P+S-1
           new_value_{i}          float  (B, S, Hkv, D)

  The cache is (B, C, Hkv, D) so that, for B = 1, "the first P rows" is one contiguous prefix: the
  runtime passes a pointer and a shape, never a copy. Positions are P + arange(S), with P read from the
  shape of past_key_0, so there is no position input to get wrong.

Batch: all sequences in a batch share P and S (no padding); the runtime uses B = 1.

Who writes what (dispatch: :mod:`edgekit.export.dialect`)::

    DecoderWriter ── embedding, layer loop, MLP, LM head ──> codec.linear / embedding / lm_head  (WeightCodec)
          └── ops = OP_SETS[dialect] ── inputs, positions, add_norm, attention, last rows   (OrtOps | TensorRTOps)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from onnx import TensorProto

from ..architectures import weight_shapes
from ..errors import ModelFormatError, UserInputError
from ..spec import ModelSpec
from .dialect import DIALECTS, OP_SETS, WeightCodec
from .graph import GraphBuilder
from .rope import rope_tables

FLOAT_TYPES = {"fp32": (np.float32, TensorProto.FLOAT), "fp16": (np.float16, TensorProto.FLOAT16)}
# Changes with the graph contract within one edgekit version (the export cache's key): 2 = ort "last" graphs
# take logits_rows (speculative decoding's verify step)
GRAPH_REVISION = 2


@dataclass(frozen=True)
class GraphOptions:
    dialect: str           # "ort" | "tensorrt"
    precision: str         # "fp32" | "fp16" (weights of linears may be replaced by a quantizer)
    max_context: int       # rows of the rotary tables; the KV capacity cannot exceed it
    logits: str = "last"   # "last": logits of the final position only (what generation needs); "all"

    def __post_init__(self):
        if self.dialect not in DIALECTS:
            raise UserInputError(f"unknown dialect {self.dialect!r}: use one of {', '.join(DIALECTS)}")
        if self.precision not in FLOAT_TYPES:
            raise UserInputError(f"the graph builder writes fp32 or fp16, not {self.precision!r}")
        if self.logits not in ("last", "all"):
            raise UserInputError(f"logits must be 'last' or 'all', not {self.logits!r}")


class LazyWeight:
    """A checkpoint weight whose shape is known from the spec and whose values are read only when called.

    Codecs that carry a source's own blocks over never call it, so a GGUF build does not materialise float
    copies of weights it does not re-quantize.
    """

    def __init__(self, load: Callable[[], np.ndarray], shape: tuple[int, ...]):
        self._load, self.shape = load, tuple(shape)

    def __call__(self) -> np.ndarray:
        return self._load()

    @staticmethod
    def stacked(parts: list[LazyWeight]) -> LazyWeight:
        """Parts concatenated along the output dimension (packed qkv, gate_up)."""
        rows = sum(p.shape[0] for p in parts)
        return LazyWeight(lambda: np.concatenate([p() for p in parts], axis=0), (rows, *parts[0].shape[1:]))


def _array(weight) -> np.ndarray:
    return weight() if callable(weight) else weight


class DenseCodec:
    """How weights become graph nodes, unquantized: the float :class:`~edgekit.export.dialect.WeightCodec`
    (quantizing ones: :mod:`edgekit.quant.codec`).

    ``parts`` names the checkpoint tensors a (possibly packed) weight was made of, as (canonical, layer)
    pairs, so that a codec can go back to the source's own encoding (lossless GGUF import).
    """

    def __init__(self, dtype):
        self.dtype = dtype
        self._embed: str | None = None

    def linear(self, b: GraphBuilder, x: str, name: str, weight: np.ndarray, bias: np.ndarray | None,
               parts: list[tuple[str, int | None]] = ()) -> str:
        w = b.weight(f"{name}.weight_t", _array(weight).T.astype(self.dtype))     # (in, out): MatMul's B
        y = b.op("MatMul", x, w, name=f"{name}/MatMul")
        if bias is not None:
            y = b.op("Add", y, b.weight(f"{name}.bias", bias.astype(self.dtype)), name=f"{name}/BiasAdd")
        return y

    def embedding(self, b: GraphBuilder, ids: str, weight: np.ndarray, tied: bool = False) -> str:
        self._embed = b.weight("embed.weight", _array(weight).astype(self.dtype))    # (V, hidden)
        return b.op("Gather", self._embed, ids, axis=0, name="embed/Gather")          # (B, S, hidden)

    def lm_head(self, b: GraphBuilder, flat: str, weight: np.ndarray, tied: bool = False) -> str:
        """``flat`` (B*N, hidden) -> logits (B*N, V) in the graph's float type."""
        # Gemm with transB reads the (V, hidden) matrix as stored, so a tied head shares the embedding.
        head = self._embed if tied else b.weight("lm_head.weight", _array(weight).astype(self.dtype))
        return b.op("Gemm", flat, head, transB=1, name="lm_head/Gemm")


class DecoderWriter:
    """Emits the decoder into a GraphBuilder, one layer at a time, reading weights as it goes."""

    def __init__(self, b: GraphBuilder, spec: ModelSpec, opts: GraphOptions, reader, codec: WeightCodec | None = None):
        self.b, self.spec, self.opts, self.reader = b, spec, opts, reader
        self.np_dtype, self.onnx_dtype = FLOAT_TYPES[opts.precision]
        self.codec = codec or DenseCodec(self.np_dtype)
        self.ops = OP_SETS[opts.dialect](self)     # the dialect's own parts of the graph (may refuse the model)

    # ----- helpers ----------------------------------------------------------------------------
    def w(self, canonical: str, layer: int | None = None) -> np.ndarray:
        """A weight, checked against the shape the spec implies (a wrong checkpoint fails here, named)."""
        array = self.reader.tensor(canonical, layer)
        expected = weight_shapes(self.spec).get(canonical)
        if expected is not None and tuple(array.shape) != expected:
            shown = canonical.replace("{i}", str(layer))
            raise ModelFormatError(
                f"weight {shown} has shape {tuple(array.shape)} but the model's config implies {expected}: "
                "the weights do not belong to this config (re-download the checkpoint)")
        return array

    def lazy(self, canonical: str, layer: int | None = None) -> LazyWeight:
        """The weight as a :class:`LazyWeight` (read and checked only if a codec needs its values)."""
        shape = weight_shapes(self.spec).get(canonical)
        return LazyWeight(lambda: self.w(canonical, layer), shape)

    def maybe(self, canonical: str, layer: int | None = None) -> np.ndarray | None:
        return self.w(canonical, layer) if self.reader.has(canonical, layer) else None

    def norm_weight(self, name: str, canonical: str, layer: int | None = None) -> str:
        return self.b.weight(name, self.w(canonical, layer).astype(self.np_dtype))

    # ----- the whole graph --------------------------------------------------------------------
    def write(self, progress: Callable[[int, int], None] | None = None) -> None:
        b, spec, opts = self.b, self.spec, self.opts
        ids = b.input("input_ids", TensorProto.INT64, ["batch", "seq"])
        self.ops.declare_inputs()
        freq_factors = self.maybe("rope_freqs.weight")  # Llama-3 GGUFs store their rope scaling as a tensor
        cos, sin = rope_tables(spec, opts.max_context, self.np_dtype, freq_factors)
        self.cos, self.sin = b.weight("rope.cos", cos), b.weight("rope.sin", sin)  # (max_context, D/2)

        hidden = self.codec.embedding(b, ids, self.lazy("embed.weight"), spec.tie_word_embeddings)  # (B, S, hidden)
        self.ops.after_embedding(ids)

        residual, pending = hidden, None
        for i in range(spec.num_layers):
            normed, residual = self.add_norm(pending, residual, f"layers.{i}.attn_norm",
                                             ("layers.{i}.attn_norm.weight", i))
            attn = self.attention(normed, i)
            o = self.codec.linear(b, attn, f"layers.{i}.o", self.lazy("layers.{i}.o.weight", i),
                                  self.maybe("layers.{i}.o.bias", i), [("layers.{i}.o.weight", i)])
            normed, residual = self.add_norm(o, residual, f"layers.{i}.mlp_norm", ("layers.{i}.mlp_norm.weight", i))
            pending = self.mlp(normed, i)
            drop = getattr(self.reader, "drop_pages", None)
            if drop is not None:      # the layer is written: its source pages need not stay resident
                drop()
            if progress:
                progress(i + 1, spec.num_layers)
        normed, _ = self.add_norm(pending, residual, "final_norm", ("final_norm.weight", None))
        self.lm_head(normed, ids)

    # ----- residual + RMSNorm ------------------------------------------------------------------
    #   x ──(+ pending)──> residual ──RMSNorm(w)──> normed         (the op-set decides the ops)
    def add_norm(self, pending: str | None, residual: str, name: str, weight: tuple[str, int | None]):
        return self.ops.add_norm(pending, residual, name, self.norm_weight(f"{name}.weight", *weight))

    # ----- attention ----------------------------------------------------------------------------
    def qkv_weights(self, i: int) -> tuple[LazyWeight, np.ndarray | None]:
        """q, k, v packed along the output dimension: (q_size + 2 * kv_size, hidden)."""
        ws = [self.lazy(f"layers.{{i}}.{n}.weight", i) for n in ("q", "k", "v")]
        bs = [self.maybe(f"layers.{{i}}.{n}.bias", i) for n in ("q", "k", "v")]
        bias = np.concatenate(bs) if all(x is not None for x in bs) else None
        return LazyWeight.stacked(ws), bias

    def attention(self, x: str, i: int) -> str:
        weight, bias = self.qkv_weights(i)
        parts = [(f"layers.{{i}}.{n}.weight", i) for n in ("q", "k", "v")]
        qkv = self.codec.linear(self.b, x, f"layers.{i}.qkv", weight, bias, parts)  # (B, S, q + 2 kv)
        return self.ops.attention(qkv, i)

    # ----- MLP --------------------------------------------------------------------------------
    #   x ─MatMul[gate;up]─> (B,S,2I) ─Split─> gate, up ─> gate*sigmoid(gate)*up ─MatMul(down)─> (B,S,hidden)
    def mlp(self, x: str, i: int) -> str:
        b, inter = self.b, self.spec.intermediate_size
        gate_up = LazyWeight.stacked([self.lazy("layers.{i}.gate.weight", i), self.lazy("layers.{i}.up.weight", i)])
        gu = self.codec.linear(b, x, f"layers.{i}.gate_up", gate_up, None,
                               [("layers.{i}.gate.weight", i), ("layers.{i}.up.weight", i)])
        gate, up = b.op("Split", gu, b.const([inter, inter]), axis=-1, outputs=2, name=f"layers.{i}.mlp/Split")
        act = b.op("Mul", gate, b.op("Sigmoid", gate, name=f"layers.{i}.mlp/Sigmoid"), name=f"layers.{i}.mlp/SiLU")
        act = b.op("Mul", act, up, name=f"layers.{i}.mlp/GateUp")
        return self.codec.linear(b, act, f"layers.{i}.down", self.lazy("layers.{i}.down.weight", i), None,
                                 [("layers.{i}.down.weight", i)])

    # ----- LM head ----------------------------------------------------------------------------
    def lm_head(self, normed: str, ids: str) -> None:
        #   normed (B,S,hidden) ─[Slice last N]─> (B,N,hidden) ─Reshape─> (B*N,hidden) ─head─> (B*N,V) ─> logits
        b, spec = self.b, self.spec
        rows = None
        if self.opts.logits == "last":       # N positions: the dialect's rows input (ort), else 1
            normed, rows = self.ops.last_rows(normed)
        flat = b.op("Reshape", normed, b.const([-1, spec.hidden_size]), name="lm_head/Flatten")
        tied = spec.tie_word_embeddings
        logits = self.codec.lm_head(b, flat, self.lazy("embed.weight" if tied else "lm_head.weight"), tied)
        if self.onnx_dtype != TensorProto.FLOAT:
            logits = b.op("Cast", logits, to=TensorProto.FLOAT, name="lm_head/Cast")
        if rows is not None:
            shape = b.op("Concat", b.const([-1]), rows, b.const([spec.vocab_size]), axis=0, name="lm_head/Shape")
        elif self.opts.logits == "last":
            shape = b.const([-1, 1, spec.vocab_size])
        else:
            shape = b.op("Concat", b.op("Shape", ids, name="lm_head/IdsShape"), b.const([spec.vocab_size]), axis=0,
                         name="lm_head/Shape")
        b.op("Reshape", logits, shape, outputs=["logits"], name="lm_head/Unflatten")
        n = "seq" if self.opts.logits == "all" else "logits_rows" if rows is not None else 1
        b.output("logits", TensorProto.FLOAT, ["batch", n, spec.vocab_size])
