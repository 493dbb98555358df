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
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from onnx import TensorProto

from ..errors import ModelFormatError, UserInputError
from ..spec import ModelSpec
from .graph import GraphBuilder
from .rope import rope_tables

DIALECTS = ("ort", "tensorrt")
FLOAT_TYPES = {"fp32": (np.float32, TensorProto.FLOAT), "fp16": (np.float16, TensorProto.FLOAT16)}
_NEG = -1e9  # masked attention score; finite so that a fully masked row cannot produce NaN
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
    """How weights become graph nodes, unquantized. Quantizers (``edgekit.quant.codec``) have the same methods.

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


def expected_shape(spec: ModelSpec, canonical: str) -> tuple[int, ...] | None:
    """The shape a canonical weight must have (HF orientation), or None when any shape is acceptable."""
    h = spec.hidden_size
    fixed = {"embed.weight": (spec.vocab_size, h), "lm_head.weight": (spec.vocab_size, h),
             "final_norm.weight": (h,), "layers.{i}.attn_norm.weight": (h,), "layers.{i}.mlp_norm.weight": (h,),
             "rope_freqs.weight": (spec.head_dim // 2,)}
    if canonical in fixed:
        return fixed[canonical]
    part, kind = canonical.split(".")[-2:]
    if part in spec.linear_shapes:
        out_features, in_features = spec.linear_shapes[part]
        return (out_features, in_features) if kind == "weight" else (out_features,)
    return None


class DecoderWriter:
    """Emits the decoder into a GraphBuilder, one layer at a time, reading weights as it goes."""

    def __init__(self, b: GraphBuilder, spec: ModelSpec, opts: GraphOptions, reader, codec=None):
        self.b, self.spec, self.opts, self.reader = b, spec, opts, reader
        self.np_dtype, self.onnx_dtype = FLOAT_TYPES[opts.precision]
        self.codec = codec or DenseCodec(self.np_dtype)
        if opts.dialect == "ort" and spec.head_dim % 16:
            raise UserInputError(
                f"head_dim {spec.head_dim} is not a multiple of 16, which onnxruntime's fused attention (the "
                "graph of onnxruntime-cpu and onnxruntime-cuda bundles) needs: build this model for TensorRT "
                "(--backend tensorrt on a GPU target, whose graph uses standard ONNX ops)")

    # ----- helpers ----------------------------------------------------------------------------
    def w(self, canonical: str, layer: int | None = None) -> np.ndarray:
        """A weight, checked against the shape the spec implies (a wrong checkpoint fails here, named)."""
        array = self.reader.tensor(canonical, layer)
        expected = expected_shape(self.spec, canonical)
        if expected is not None and tuple(array.shape) != expected:
            shown = canonical.replace("{i}", str(layer))
            raise ModelFormatError(
                f"weight {shown} has shape {tuple(array.shape)} but the model's config implies {expected}: "
                "the weights do not belong to this config (re-download the checkpoint)")
        return array

    def lazy(self, canonical: str, layer: int | None = None) -> LazyWeight:
        """The weight as a :class:`LazyWeight` (read and checked only if a codec needs its values)."""
        shape = expected_shape(self.spec, canonical)
        return LazyWeight(lambda: self.w(canonical, layer), shape)

    def maybe(self, canonical: str, layer: int | None = None) -> np.ndarray | None:
        return self.w(canonical, layer) if self.reader.has(canonical, layer) else None

    def norm_weight(self, name: str, canonical: str, layer: int | None = None) -> str:
        return self.b.weight(name, self.w(canonical, layer).astype(self.np_dtype))

    # ----- the whole graph --------------------------------------------------------------------
    def write(self, progress: Callable[[int, int], None] | None = None) -> None:
        b, spec, opts = self.b, self.spec, self.opts
        ids = b.input("input_ids", TensorProto.INT64, ["batch", "seq"])
        if opts.dialect == "ort":
            b.input("seqlens_k", TensorProto.INT32, ["batch"])
            b.input("total_sequence_length", TensorProto.INT32, [1])
        freq_factors = self.maybe("rope_freqs.weight")  # Llama-3 GGUFs store their rope scaling as a tensor
        cos, sin = rope_tables(spec, opts.max_context, self.np_dtype, freq_factors)
        self.cos, self.sin = b.weight("rope.cos", cos), b.weight("rope.sin", sin)  # (max_context, D/2)

        hidden = self.codec.embedding(b, ids, self.lazy("embed.weight"), spec.tie_word_embeddings)  # (B, S, hidden)
        if opts.dialect == "tensorrt":
            self._position_setup(ids)

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
    #   x ──(+ pending)──> residual ──RMSNorm(w)──> normed
    # ort: SimplifiedLayerNormalization for the first, SkipSimplifiedLayerNormalization (add fused) after.
    def add_norm(self, pending: str | None, residual: str, name: str, weight: tuple[str, int | None]):
        b, eps = self.b, self.spec.rms_norm_eps
        w = self.norm_weight(f"{name}.weight", *weight)
        if self.opts.dialect == "ort":
            if pending is None:
                return b.op("SimplifiedLayerNormalization", residual, w, axis=-1, epsilon=eps, stash_type=1,
                            name=f"{name}/SLN"), residual
            out, _, _, new_residual = b.op("SkipSimplifiedLayerNormalization", pending, residual, w,
                                           outputs=[f"{name}/out", "", "", f"{name}/residual"],
                                           domain="com.microsoft", epsilon=eps, name=f"{name}/SkipSLN")
            return out, new_residual
        if pending is not None:
            residual = b.op("Add", residual, pending, name=f"{name}/ResidualAdd")
        x = residual
        if self.onnx_dtype != TensorProto.FLOAT:  # the statistics of an fp16 model are taken in fp32
            x = b.op("Cast", x, to=TensorProto.FLOAT, name=f"{name}/CastUp")
        var = b.op("ReduceMean", b.op("Mul", x, x, name=f"{name}/Square"), b.const([-1]), keepdims=1,
                   name=f"{name}/Mean")                                                # (B, S, 1)
        inv = b.op("Reciprocal", b.op("Sqrt", b.op("Add", var, b.const(eps, np.float32), name=f"{name}/Eps"),
                                      name=f"{name}/Sqrt"), name=f"{name}/Inv")
        y = b.op("Mul", x, inv, name=f"{name}/Normalize")
        if self.onnx_dtype != TensorProto.FLOAT:
            y = b.op("Cast", y, to=self.onnx_dtype, name=f"{name}/CastDown")
        return b.op("Mul", y, w, name=f"{name}/Scale"), residual

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
        if self.opts.dialect == "ort":
            return self._gqa(qkv, i)
        return self._standard_attention(qkv, i)

    def _gqa(self, qkv: str, i: int) -> str:
        #   qkv ──GroupQueryAttention(rotary inside)──> attn (B, S, H*D)
        #             past_key_i ══ present_key_i (one buffer, written at P .. P+S-1)
        b, spec, cap = self.b, self.spec, "kv_capacity"
        shape = ["batch", spec.num_kv_heads, cap, spec.head_dim]
        names = []
        for kind in ("key", "value"):
            b.input(f"past_{kind}_{i}", self.onnx_dtype, shape)
            b.output(f"present_{kind}_{i}", self.onnx_dtype, shape)
            names.append(f"present_{kind}_{i}")
        out = f"layers.{i}.attn/out"
        b.op("GroupQueryAttention", qkv, "", "", f"past_key_{i}", f"past_value_{i}", "seqlens_k",
             "total_sequence_length", self.cos, self.sin, outputs=[out, *names], domain="com.microsoft",
             num_heads=spec.num_heads, kv_num_heads=spec.num_kv_heads, do_rotary=1, rotary_interleaved=0,
             scale=float(spec.head_dim ** -0.5), name=f"layers.{i}.attn/GQA")
        return out

    def _position_setup(self, ids: str) -> None:
        """P from the cache shape, positions P + arange(S), rotary rows and the causal mask."""
        b = self.b
        #   past_key_0 ─Shape[1]─> P ─┬─ + Range(S) ─> pos (S,) ─Gather─> cos, sin (S, 1, D/2)
        #   input_ids ─Shape[1]─> S ──┘               mask (S, P+S): key j visible iff j <= P + row
        past_len = b.op("Shape", "past_key_0", start=1, end=2, name="pos/PastLen")      # (1,)
        seq_len = b.op("Shape", ids, start=1, end=2, name="pos/SeqLen")                 # (1,)
        total = b.op("Add", past_len, seq_len, name="pos/Total")
        zero, one = b.const(0), b.const(1)
        p0 = b.op("Squeeze", past_len, b.const([0]), name="pos/P")
        s0 = b.op("Squeeze", seq_len, b.const([0]), name="pos/S")
        t0 = b.op("Squeeze", total, b.const([0]), name="pos/T")
        rows = b.op("Add", b.op("Range", zero, s0, one, name="pos/RangeS"), p0, name="pos/Rows")   # (S,)
        cols = b.op("Range", zero, t0, one, name="pos/RangeT")                                      # (T,)
        self.cos_rows = b.op("Unsqueeze", b.op("Gather", self.cos, rows, axis=0, name="rope/GatherCos"),
                             b.const([1]), name="rope/Cos")                                        # (S, 1, D/2)
        self.sin_rows = b.op("Unsqueeze", b.op("Gather", self.sin, rows, axis=0, name="rope/GatherSin"),
                             b.const([1]), name="rope/Sin")
        future = b.op("Greater", b.op("Unsqueeze", cols, b.const([0]), name="mask/Cols"),
                      b.op("Unsqueeze", rows, b.const([1]), name="mask/Rows"), name="mask/Future")  # (S, T)
        self.mask = b.op("Where", future, b.const(_NEG, np.float32), b.const(0.0, np.float32),
                         name="mask/Bias")                                                          # (S, T)

    def _rotary(self, x: str, name: str) -> str:
        """Half-split rotary on (B, S, heads, D): [x1*cos - x2*sin, x2*cos + x1*sin]."""
        b, half = self.b, self.spec.head_dim // 2
        x1, x2 = b.op("Split", x, b.const([half, half]), axis=-1, outputs=2, name=f"{name}/Split")
        cos, sin = self.cos_rows, self.sin_rows
        first = b.op("Sub", b.op("Mul", x1, cos, name=f"{name}/x1cos"), b.op("Mul", x2, sin, name=f"{name}/x2sin"),
                     name=f"{name}/First")
        second = b.op("Add", b.op("Mul", x2, cos, name=f"{name}/x2cos"), b.op("Mul", x1, sin, name=f"{name}/x1sin"),
                      name=f"{name}/Second")
        return b.op("Concat", first, second, axis=-1, name=f"{name}/Concat")

    def _standard_attention(self, qkv: str, i: int) -> str:
        #   qkv ─Split─> q (B,S,H,D) ─rope─> Reshape (B,S,Hkv,G,D) ─Transpose─> (B,Hkv,G,S,D) ──┐
        #              k (B,S,Hkv,D) ─rope─> new_key_i                                          MatMul ─+mask─Softmax─┐
        #   past_key_i (B,P,Hkv,D) ─Concat(k)─> (B,T,Hkv,D) ─Transpose─> (B,Hkv,1,D,T) ──────────┘                    │
        #   v: (B,Hkv,1,T,D) ──────────────────────────────────────────────────────────── MatMul ─┴─> (B,S,H*D)
        b, spec, name = self.b, self.spec, f"layers.{i}.attn"
        H, Hkv, D = spec.num_heads, spec.num_kv_heads, spec.head_dim
        G = H // Hkv
        q, k, v = b.op("Split", qkv, b.const([H * D, Hkv * D, Hkv * D]), axis=-1, outputs=3, name=f"{name}/SplitQKV")
        q = self._rotary(b.op("Reshape", q, b.const([0, 0, H, D]), name=f"{name}/q4"), f"{name}/rope_q")   # (B,S,H,D)
        k = self._rotary(b.op("Reshape", k, b.const([0, 0, Hkv, D]), name=f"{name}/k4"), f"{name}/rope_k")
        v = b.op("Reshape", v, b.const([0, 0, Hkv, D]), name=f"{name}/v4")                                 # (B,S,Hkv,D)
        new_k = b.op("Identity", k, outputs=[f"new_key_{i}"], name=f"{name}/NewKey")
        new_v = b.op("Identity", v, outputs=[f"new_value_{i}"], name=f"{name}/NewValue")
        for kind in ("key", "value"):
            b.input(f"past_{kind}_{i}", self.onnx_dtype, ["batch", "past_seq", Hkv, D])
            b.output(f"new_{kind}_{i}", self.onnx_dtype, ["batch", "seq", Hkv, D])
        k_all = b.op("Concat", f"past_key_{i}", new_k, axis=1, name=f"{name}/KAll")     # (B, T, Hkv, D)
        v_all = b.op("Concat", f"past_value_{i}", new_v, axis=1, name=f"{name}/VAll")
        q5 = b.op("Reshape", q, b.const([0, 0, Hkv, G, D]), name=f"{name}/q5")           # (B, S, Hkv, G, D)
        q5 = b.op("Transpose", q5, perm=[0, 2, 3, 1, 4], name=f"{name}/qT")               # (B, Hkv, G, S, D)
        kT = b.op("Unsqueeze", b.op("Transpose", k_all, perm=[0, 2, 3, 1], name=f"{name}/kT"), b.const([2]),
                  name=f"{name}/kT5")                                                     # (B, Hkv, 1, D, T)
        v5 = b.op("Unsqueeze", b.op("Transpose", v_all, perm=[0, 2, 1, 3], name=f"{name}/vT"), b.const([2]),
                  name=f"{name}/vT5")                                                     # (B, Hkv, 1, T, D)
        scores = b.op("MatMul", q5, kT, name=f"{name}/QK")                                # (B, Hkv, G, S, T)
        if self.onnx_dtype != TensorProto.FLOAT:  # softmax of an fp16 model in fp32
            scores = b.op("Cast", scores, to=TensorProto.FLOAT, name=f"{name}/CastScores")
        scores = b.op("Add", b.op("Mul", scores, b.const(spec.head_dim ** -0.5, np.float32), name=f"{name}/Scale"),
                      self.mask, name=f"{name}/Mask")
        probs = b.op("Softmax", scores, axis=-1, name=f"{name}/Softmax")
        if self.onnx_dtype != TensorProto.FLOAT:
            probs = b.op("Cast", probs, to=self.onnx_dtype, name=f"{name}/CastProbs")
        ctx = b.op("MatMul", probs, v5, name=f"{name}/PV")                                # (B, Hkv, G, S, D)
        ctx = b.op("Transpose", ctx, perm=[0, 3, 1, 2, 4], name=f"{name}/ctxT")           # (B, S, Hkv, G, D)
        return b.op("Reshape", ctx, b.const([0, 0, H * D]), name=f"{name}/ctx")           # (B, S, H*D)

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
        if self.opts.logits == "last" and self.opts.dialect == "ort":
            # N = logits_rows, an input that defaults to 1: decoding and prefill never feed it, a speculative
            # verify step feeds its token count and gets every drafted position's logits from the same run.
            rows = b.input("logits_rows", TensorProto.INT64, [1], default=np.array([1], np.int64))
            start = b.op("Neg", rows, name="lm_head/RowsStart")
            normed = b.op("Slice", normed, start, b.const([2**62]), b.const([1]), name="lm_head/Last")
        elif self.opts.logits == "last":
            normed = b.op("Slice", normed, b.const([-1]), b.const([2**62]), b.const([1]), name="lm_head/Last")
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
