"""The ``ort`` op-set (onnxruntime CPU/CUDA): contrib ops, the KV cache updated in place.

What it adds to the shared decoder (contract in :mod:`edgekit.export.decoder`)::

    inputs      seqlens_k, total_sequence_length (before any weight)
    add_norm    SimplifiedLayerNormalization first, then SkipSimplifiedLayerNormalization (the add fused)
    attention   qkv ─GroupQueryAttention(rotary inside)─> (B, S, H*D);  past_key_i ══ present_key_i
    last rows   logits_rows (an input defaulting to 1) ─Neg─> Slice of the last N positions
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto

from ..errors import UserInputError


class OrtOps:
    """:class:`~edgekit.export.dialect.DialectOps` for onnxruntime (contrib ops of com.microsoft)."""

    name = "ort"
    opsets = {"": 21, "com.microsoft": 1}

    def __init__(self, writer):
        self.w = writer
        head_dim = writer.spec.head_dim
        if head_dim % 16:
            raise UserInputError(
                f"head_dim {head_dim} is not a multiple of 16, which onnxruntime's fused attention (the "
                "graph of onnxruntime-cpu and onnxruntime-cuda bundles) needs: build this model for TensorRT "
                "(--backend tensorrt on a GPU target, whose graph uses standard ONNX ops)")

    def declare_inputs(self) -> None:
        b = self.w.b
        b.input("seqlens_k", TensorProto.INT32, ["batch"])
        b.input("total_sequence_length", TensorProto.INT32, [1])

    def after_embedding(self, ids: str) -> None:
        """GroupQueryAttention finds the positions itself (from seqlens_k)."""

    def add_norm(self, pending: str | None, residual: str, name: str, w: str) -> tuple[str, str]:
        b, eps = self.w.b, self.w.spec.rms_norm_eps
        if pending is None:
            return b.op("SimplifiedLayerNormalization", residual, w, axis=-1, epsilon=eps, stash_type=1,
                        name=f"{name}/SLN"), residual
        out, _, _, new_residual = b.op("SkipSimplifiedLayerNormalization", pending, residual, w,
                                       outputs=[f"{name}/out", "", "", f"{name}/residual"],
                                       domain="com.microsoft", epsilon=eps, name=f"{name}/SkipSLN")
        return out, new_residual

    def attention(self, qkv: str, i: int) -> str:
        #   qkv ──GroupQueryAttention(rotary inside)──> attn (B, S, H*D)
        #             past_key_i ══ present_key_i (one buffer, written at P .. P+S-1)
        w = self.w
        b, spec, cap = w.b, w.spec, "kv_capacity"
        shape = ["batch", spec.num_kv_heads, cap, spec.head_dim]
        names = []
        for kind in ("key", "value"):
            b.input(f"past_{kind}_{i}", w.onnx_dtype, shape)
            b.output(f"present_{kind}_{i}", w.onnx_dtype, shape)
            names.append(f"present_{kind}_{i}")
        out = f"layers.{i}.attn/out"
        b.op("GroupQueryAttention", qkv, "", "", f"past_key_{i}", f"past_value_{i}", "seqlens_k",
             "total_sequence_length", w.cos, w.sin, outputs=[out, *names], domain="com.microsoft",
             num_heads=spec.num_heads, kv_num_heads=spec.num_kv_heads, do_rotary=1, rotary_interleaved=0,
             scale=float(spec.head_dim ** -0.5), name=f"layers.{i}.attn/GQA")
        return out

    def last_rows(self, normed: str) -> tuple[str, str | None]:
        """N = logits_rows, an input that defaults to 1: decoding and prefill never feed it, a speculative
        verify step feeds its token count and gets every drafted position's logits from the same run."""
        b = self.w.b
        rows = b.input("logits_rows", TensorProto.INT64, [1], default=np.array([1], np.int64))
        start = b.op("Neg", rows, name="lm_head/RowsStart")
        return b.op("Slice", normed, start, b.const([2**62]), b.const([1]), name="lm_head/Last"), rows
