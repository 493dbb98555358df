"""INT8 KV cache for the ``ort`` dialect (``edgekit build --kv-cache int8``).

onnxruntime's CPU GroupQueryAttention (1.32, com.microsoft) takes an int8 cache with static scales: inputs
``k_scale``/``v_scale`` (float) and attributes ``k_quant_type``/``v_quant_type`` (``PER_TENSOR`` or
``PER_CHANNEL``) and ``kv_cache_bit_width`` 8. It quantizes the new rows as it writes them into the buffer
(saturating) and dequantizes what it reads. The scales here are per channel (one per kv head x head_dim
element, for K and for V, per layer) and come from a calibration prefill of the float graph: the largest
magnitude each channel reached on the calibration text, / 127. K is stored after rotary, so its channels are
what the cache really holds.

Why: every decode step reads every filled K/V row; at 4,096 tokens that is as many bytes as the weights of a
small model. INT8 stores a quarter of the float32 cache (half of fp16). How close it stays to the float cache
is measured by ``benchmarks/kv_int8_fidelity.py`` (top-1 agreement over 1,000 generated tokens).

The graph contract is unchanged except the element type of ``past_*``/``present_*`` (int8) and the manifest's
``graph.kv_dtype`` ("int8"); the tensorrt dialect keeps a float cache (its attention is standard ONNX ops).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..errors import UserInputError

KV_CACHE_CHOICES = ("float", "int8")
_SCALE_FLOOR = 1e-8           # a channel that stayed 0 on the calibration text still needs a positive scale
_K_SCALE, _V_SCALE = 12, 13   # GroupQueryAttention's input indices of k_scale and v_scale


def check_kv_cache(kv_cache: str, dialect: str) -> None:
    if kv_cache not in KV_CACHE_CHOICES:
        raise UserInputError(f"unknown KV cache type {kv_cache!r}: use one of {', '.join(KV_CACHE_CHOICES)}")
    if kv_cache == "int8" and dialect != "ort":
        raise UserInputError("an int8 KV cache needs the onnxruntime graph (its GroupQueryAttention quantizes the "
                             "cache); TensorRT bundles keep a float cache: drop --kv-cache int8, or build for an "
                             "onnxruntime backend (--backend onnxruntime-cpu)")


def calibrate(model_path: Path, spec, kv_dtype: str, sequences: list[list[int]], chunk: int = 256,
              threads: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Largest |K| and |V| per layer and channel over a prefill of ``sequences`` with the float cache:
    two (L, Hkv, D) float32 arrays."""
    from ..runtime.ort_backend import OrtDecoder

    longest = max(len(s) for s in sequences)
    dec = OrtDecoder(str(model_path), dialect="ort", spec=spec, capacity=longest, kv_dtype=kv_dtype, threads=threads)
    L, Hkv, D = spec.num_layers, spec.num_kv_heads, spec.head_dim
    k_max, v_max = np.zeros((L, Hkv, D), np.float32), np.zeros((L, Hkv, D), np.float32)
    for ids in sequences:
        dec.reset()
        arr = np.asarray(ids, np.int64)
        for a in range(0, len(arr), chunk):
            dec.step(arr[a:a + chunk])
        n = len(arr)
        for i in range(L):
            k = np.abs(dec.cache[f"key_{i}"].numpy()[0, :, :n, :].astype(np.float32))   # (Hkv, n, D)
            v = np.abs(dec.cache[f"value_{i}"].numpy()[0, :, :n, :].astype(np.float32))
            np.maximum(k_max[i], k.max(axis=1), out=k_max[i])
            np.maximum(v_max[i], v.max(axis=1), out=v_max[i])
    return k_max, v_max


def to_int8_cache(model_path: Path, k_max: np.ndarray, v_max: np.ndarray) -> int:
    """Rewrite the graph file (only the .onnx: the weights file is untouched) for an int8 cache with scales
    ``max / 127`` per channel. Returns the bytes of the scale tensors added (stored inside the .onnx file)."""
    model = onnx.load(str(model_path), load_external_data=False)
    g = model.graph
    for value in [*g.input, *g.output]:
        if value.name.startswith(("past_key_", "past_value_", "present_key_", "present_value_")):
            value.type.tensor_type.elem_type = TensorProto.INT8
    added = 0
    layers = 0
    for node in g.node:
        if node.op_type != "GroupQueryAttention":
            continue
        i = int(node.input[3].rsplit("_", 1)[1])           # past_key_{i}
        names = []
        for kind, peak in (("k", k_max[i]), ("v", v_max[i])):
            scale = np.maximum(peak.reshape(-1) / 127.0, _SCALE_FLOOR).astype(np.float32)   # (Hkv * D,)
            name = f"layers.{i}.attn.{kind}_scale"
            g.initializer.append(numpy_helper.from_array(scale, name))
            names.append(name)
            added += scale.nbytes
        while len(node.input) < _K_SCALE:
            node.input.append("")
        node.input.extend(names)
        node.attribute.extend([helper.make_attribute("k_quant_type", "PER_CHANNEL"),
                               helper.make_attribute("v_quant_type", "PER_CHANNEL"),
                               helper.make_attribute("kv_cache_bit_width", 8)])
        layers += 1
    if layers != len(k_max):
        raise RuntimeError(f"internal: {layers} GroupQueryAttention nodes for {len(k_max)} layers")
    # a new file, then rename: the export cache may hold a hard link to the old one
    tmp = model_path.with_name(model_path.name + ".int8kv")
    onnx.save(model, str(tmp))
    os.replace(tmp, model_path)
    return added
