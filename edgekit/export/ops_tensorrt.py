"""The ``tensorrt`` op-set: standard ONNX only (opset 21), no input aliased to an output.

What it adds to the shared decoder (contract in :mod:`edgekit.export.decoder`)::

    positions   past_key_0 ─Shape[1]─> P;  P + arange(S) ─Gather─> rotary rows;  causal mask (S, P+S)
    add_norm    (residual + pending) ─RMSNorm spelled out (statistics in fp32)─> normed
    attention   qkv ─Split─rope─> Concat(past, new) ─MatMul─+mask─Softmax─MatMul─> (B, S, H*D);  new_key_i out
    last rows   Slice of the last position
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto

_NEG = -1e9  # masked attention score; finite so that a fully masked row cannot produce NaN


class TensorRTOps:
    """:class:`~edgekit.export.dialect.DialectOps` for TensorRT's ONNX parser."""

    name = "tensorrt"
    opsets = {"": 21}

    def __init__(self, writer):
        self.w = writer
        self.cos_rows = self.sin_rows = self.mask = None

    def declare_inputs(self) -> None:
        """P is read from the shape of past_key_0: no position input to get wrong."""

    def after_embedding(self, ids: str) -> None:
        """P from the cache shape, positions P + arange(S), rotary rows and the causal mask."""
        b, w = self.w.b, self.w
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
        self.cos_rows = b.op("Unsqueeze", b.op("Gather", w.cos, rows, axis=0, name="rope/GatherCos"),
                             b.const([1]), name="rope/Cos")                                        # (S, 1, D/2)
        self.sin_rows = b.op("Unsqueeze", b.op("Gather", w.sin, rows, axis=0, name="rope/GatherSin"),
                             b.const([1]), name="rope/Sin")
        future = b.op("Greater", b.op("Unsqueeze", cols, b.const([0]), name="mask/Cols"),
                      b.op("Unsqueeze", rows, b.const([1]), name="mask/Rows"), name="mask/Future")  # (S, T)
        self.mask = b.op("Where", future, b.const(_NEG, np.float32), b.const(0.0, np.float32),
                         name="mask/Bias")                                                          # (S, T)

    def add_norm(self, pending: str | None, residual: str, name: str, w: str) -> tuple[str, str]:
        b, eps, dtype = self.w.b, self.w.spec.rms_norm_eps, self.w.onnx_dtype
        if pending is not None:
            residual = b.op("Add", residual, pending, name=f"{name}/ResidualAdd")
        x = residual
        if dtype != TensorProto.FLOAT:  # the statistics of an fp16 model are taken in fp32
            x = b.op("Cast", x, to=TensorProto.FLOAT, name=f"{name}/CastUp")
        var = b.op("ReduceMean", b.op("Mul", x, x, name=f"{name}/Square"), b.const([-1]), keepdims=1,
                   name=f"{name}/Mean")                                                # (B, S, 1)
        inv = b.op("Reciprocal", b.op("Sqrt", b.op("Add", var, b.const(eps, np.float32), name=f"{name}/Eps"),
                                      name=f"{name}/Sqrt"), name=f"{name}/Inv")
        y = b.op("Mul", x, inv, name=f"{name}/Normalize")
        if dtype != TensorProto.FLOAT:
            y = b.op("Cast", y, to=dtype, name=f"{name}/CastDown")
        return b.op("Mul", y, w, name=f"{name}/Scale"), residual

    def _rotary(self, x: str, name: str) -> str:
        """Half-split rotary on (B, S, heads, D): [x1*cos - x2*sin, x2*cos + x1*sin]."""
        b, half = self.w.b, self.w.spec.head_dim // 2
        x1, x2 = b.op("Split", x, b.const([half, half]), axis=-1, outputs=2, name=f"{name}/Split")
        cos, sin = self.cos_rows, self.sin_rows
        first = b.op("Sub", b.op("Mul", x1, cos, name=f"{name}/x1cos"), b.op("Mul", x2, sin, name=f"{name}/x2sin"),
                     name=f"{name}/First")
        second = b.op("Add", b.op("Mul", x2, cos, name=f"{name}/x2cos"), b.op("Mul", x1, sin, name=f"{name}/x1sin"),
                      name=f"{name}/Second")
        return b.op("Concat", first, second, axis=-1, name=f"{name}/Concat")

    def attention(self, qkv: str, i: int) -> str:
        #   qkv ─Split─> q (B,S,H,D) ─rope─> Reshape (B,S,Hkv,G,D) ─Transpose─> (B,Hkv,G,S,D) ──┐
        #              k (B,S,Hkv,D) ─rope─> new_key_i                                          MatMul ─+mask─Softmax─┐
        #   past_key_i (B,P,Hkv,D) ─Concat(k)─> (B,T,Hkv,D) ─Transpose─> (B,Hkv,1,D,T) ──────────┘                    │
        #   v: (B,Hkv,1,T,D) ──────────────────────────────────────────────────────────── MatMul ─┴─> (B,S,H*D)
        b, spec, dtype, name = self.w.b, self.w.spec, self.w.onnx_dtype, f"layers.{i}.attn"
        H, Hkv, D = spec.num_heads, spec.num_kv_heads, spec.head_dim
        G = H // Hkv
        q, k, v = b.op("Split", qkv, b.const([H * D, Hkv * D, Hkv * D]), axis=-1, outputs=3, name=f"{name}/SplitQKV")
        q = self._rotary(b.op("Reshape", q, b.const([0, 0, H, D]), name=f"{name}/q4"), f"{name}/rope_q")   # (B,S,H,D)
        k = self._rotary(b.op("Reshape", k, b.const([0, 0, Hkv, D]), name=f"{name}/k4"), f"{name}/rope_k")
        v = b.op("Reshape", v, b.const([0, 0, Hkv, D]), name=f"{name}/v4")                                 # (B,S,Hkv,D)
        new_k = b.op("Identity", k, outputs=[f"new_key_{i}"], name=f"{name}/NewKey")
        new_v = b.op("Identity", v, outputs=[f"new_value_{i}"], name=f"{name}/NewValue")
        for kind in ("key", "value"):
            b.input(f"past_{kind}_{i}", dtype, ["batch", "past_seq", Hkv, D])
            b.output(f"new_{kind}_{i}", dtype, ["batch", "seq", Hkv, D])
        k_all = b.op("Concat", f"past_key_{i}", new_k, axis=1, name=f"{name}/KAll")     # (B, T, Hkv, D)
        v_all = b.op("Concat", f"past_value_{i}", new_v, axis=1, name=f"{name}/VAll")
        q5 = b.op("Reshape", q, b.const([0, 0, Hkv, G, D]), name=f"{name}/q5")           # (B, S, Hkv, G, D)
        q5 = b.op("Transpose", q5, perm=[0, 2, 3, 1, 4], name=f"{name}/qT")               # (B, Hkv, G, S, D)
        kT = b.op("Unsqueeze", b.op("Transpose", k_all, perm=[0, 2, 3, 1], name=f"{name}/kT"), b.const([2]),
                  name=f"{name}/kT5")                                                     # (B, Hkv, 1, D, T)
        v5 = b.op("Unsqueeze", b.op("Transpose", v_all, perm=[0, 2, 1, 3], name=f"{name}/vT"), b.const([2]),
                  name=f"{name}/vT5")                                                     # (B, Hkv, 1, T, D)
        scores = b.op("MatMul", q5, kT, name=f"{name}/QK")                                # (B, Hkv, G, S, T)
        if dtype != TensorProto.FLOAT:  # softmax of an fp16 model in fp32
            scores = b.op("Cast", scores, to=TensorProto.FLOAT, name=f"{name}/CastScores")
        scores = b.op("Add", b.op("Mul", scores, b.const(spec.head_dim ** -0.5, np.float32), name=f"{name}/Scale"),
                      self.mask, name=f"{name}/Mask")
        probs = b.op("Softmax", scores, axis=-1, name=f"{name}/Softmax")
        if dtype != TensorProto.FLOAT:
            probs = b.op("Cast", probs, to=dtype, name=f"{name}/CastProbs")
        ctx = b.op("MatMul", probs, v5, name=f"{name}/PV")                                # (B, Hkv, G, S, D)
        ctx = b.op("Transpose", ctx, perm=[0, 3, 1, 2, 4], name=f"{name}/ctxT")           # (B, S, Hkv, G, D)
        return b.op("Reshape", ctx, b.const([0, 0, H * D]), name=f"{name}/ctx")           # (B, S, H*D)

    def last_rows(self, normed: str) -> tuple[str, str | None]:
        b = self.w.b
        return b.op("Slice", normed, b.const([-1]), b.const([2**62]), b.const([1]), name="lm_head/Last"), None
