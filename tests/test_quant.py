"""INT4/INT8 encodings bit for bit, GGUF lossless import, and quantized graphs in both dialects."""

from __future__ import annotations

import numpy as np
import pytest

from edgekit.errors import UserInputError
from edgekit.quant.encodings import to_nbits, to_qdq_int4, to_qdq_int8
from edgekit.quant.gguf_blocks import nbits_from_gguf, qdq_int4_from_q4_0

rng = np.random.default_rng(0)


# ----- an independent reference, written element by element ------------------------------------------
def ref_symmetric(w, bits, bs, fp16_scales=False):
    """Per block: scale = (value of largest magnitude) / -(2^(bits-1)), rounded to fp16 when stored so;
    code = clip(round(w / scale))."""
    n, k = w.shape
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    nb = -(-k // bs)
    codes = np.zeros((n, nb * bs), np.int64)
    scales = np.zeros((n, nb), np.float32)
    for r in range(n):
        for j in range(nb):
            block = list(w[r, j * bs:(j + 1) * bs]) + [0.0] * max(0, (j + 1) * bs - k)
            peak = max(block, key=abs)
            s = np.float32(peak) / np.float32(lo)
            if fp16_scales:
                s = np.float32(np.float16(s))
            scales[r, j] = s
            for i, v in enumerate(block):
                codes[r, j * bs + i] = 0 if s == 0 else min(hi, max(lo, int(np.rint(np.float32(v) / s))))
    return codes, scales


def ref_pack_nibbles_rowwise(u):
    """MatMulNBits: within each row, element 2j is the low nibble of byte j."""
    out = []
    for row in u:
        out.append([int(row[2 * j]) | (int(row[2 * j + 1]) << 4) for j in range(len(row) // 2)])
    return np.array(out, np.uint8)


@pytest.mark.parametrize("bits, bs, shape", [(4, 32, (8, 64)), (4, 16, (5, 48)), (4, 32, (3, 70)),
                                             (8, 32, (6, 96)), (8, 64, (4, 100))])
def test_nbits_matches_reference(bits, bs, shape):
    w = rng.standard_normal(shape).astype(np.float32)
    enc = to_nbits(w, bits, bs)
    codes, scales = ref_symmetric(w, bits, bs, fp16_scales=True)      # MatMulNBits scales are stored as fp16
    u = codes + (1 << (bits - 1))
    expected_blob = ref_pack_nibbles_rowwise(u) if bits == 4 else u.astype(np.uint8)
    assert np.array_equal(enc.blob.reshape(shape[0], -1), expected_blob)        # bit for bit
    assert np.array_equal(enc.scales, scales)
    # dequantize == codes * scale (padding dropped); the error is within half a step, except for the
    # negated peak, which is clipped from +2^(bits-1) to 2^(bits-1) - 1 (one step)
    deq = (codes * np.repeat(scales, bs, axis=1))[:, :shape[1]]
    assert np.array_equal(enc.dequantize(), deq.astype(np.float32))
    step = np.repeat(np.abs(scales), bs, axis=1)[:, :shape[1]]
    err = np.abs(enc.dequantize() - w)
    assert (err <= step + 1e-6).all() and (err <= step * 0.5 + 1e-6).mean() > 0.95


def ref_positive(w, bs):
    """TensorRT's INT4, element by element: per block, of the scales max(amax / d, 2^-14) for d = 7, 7.25, .. 9
    (all > 0), the one whose codes clip(round(v / s), -8, 7) reconstruct the block with the least squared error."""
    n, k = w.shape
    codes = np.zeros((n, k), np.int64)
    scales = np.zeros((n, k // bs), np.float32)
    for r in range(n):
        for j in range(k // bs):
            block = [np.float32(v) for v in w[r, j * bs:(j + 1) * bs]]
            amax = np.float32(max(abs(float(v)) for v in block))
            best = None
            for i in range(9):
                s = max(amax / np.float32(7 + 0.25 * i), np.float32(2.0 ** -14))
                cs = [min(7, max(-8, int(np.rint(v / s)))) for v in block]
                err = sum(float(c * s - v) ** 2 for c, v in zip(cs, block))
                if best is None or err < best[0] - 1e-12:
                    best = (err, s, cs)
            scales[r, j] = best[1]
            codes[r, j * bs:(j + 1) * bs] = best[2]
    return codes, scales


def test_qdq_int4_packing_is_onnx_int4():
    from onnx import TensorProto, helper, numpy_helper

    w = rng.standard_normal((6, 64)).astype(np.float32)                # (N, K)
    w[2, 32:] = 0                                                      # an all-zero block: the floor, not 0
    enc = to_qdq_int4(w, 32)
    codes, scales = ref_positive(w, 32)
    assert np.array_equal(enc.values, codes.T) and np.array_equal(enc.scales, scales.T)
    assert (enc.scales > 0).all() and enc.scales[1, 2] == np.float32(2.0 ** -14)
    # never worse than a fixed amax / 7.5 (one of the candidates), and better than amax / 7 overall
    fixed = {}
    for d in (7.5, 7.0):
        s = np.repeat(np.maximum(np.abs(w.reshape(6, 2, 32)).max(-1) / d, 2.0 ** -14), 32, axis=1)
        fixed[d] = np.clip(np.rint(w / s), -8, 7) * s
    err = ((enc.dequantize().T - w) ** 2).reshape(6, 2, 32).sum(-1)
    assert (err <= ((fixed[7.5] - w) ** 2).reshape(6, 2, 32).sum(-1) + 1e-6).all()
    assert err.sum() < ((fixed[7.0] - w) ** 2).sum()
    # onnx's own INT4 packing of the same signed values must give the same bytes
    tensor = helper.make_tensor("w", TensorProto.INT4, enc.values.shape, enc.values.reshape(-1).tolist())
    assert numpy_helper.to_array(tensor).tolist() == enc.values.tolist()
    packed = helper.make_tensor("p", TensorProto.INT4, enc.values.shape, enc.packed(), raw=True)
    assert numpy_helper.to_array(packed).tolist() == enc.values.tolist()
    assert enc.dequantize().shape == (64, 6)


def test_qdq_int8_per_channel():
    w = rng.standard_normal((5, 40)).astype(np.float32)
    w[3] = 0                                                           # an all-zero row: the floor, not 0
    enc = to_qdq_int8(w)
    scales = np.maximum(np.abs(w).max(axis=1) / 127, 2.0 ** -14)
    assert np.allclose(enc.scales, scales) and (enc.scales > 0).all()
    assert np.array_equal(enc.values, np.clip(np.rint(w / scales[:, None]), -127, 127).astype(np.int8).T)


def test_tensorrt_int4_needs_a_block_that_divides_k():
    with pytest.raises(UserInputError, match="block size 32 does not divide K = 70.*TensorRT"):
        to_qdq_int4(rng.standard_normal((4, 70)).astype(np.float32), 32)
    with pytest.raises(UserInputError, match="invalid block size 48: use one of 16, 32, 64, 128"):
        to_nbits(rng.standard_normal((4, 96)).astype(np.float32), 4, 48)


def _graph_output(node_builder, x):
    """Run one node built by ``node_builder(b, 'x')`` with onnxruntime, optimizations off (no refusions)."""
    import tempfile
    from pathlib import Path

    import onnxruntime as ort
    from onnx import TensorProto

    from edgekit.export.graph import GraphBuilder

    folder = Path(tempfile.mkdtemp())
    b = GraphBuilder("t", folder / "m.onnx", {"": 21, "com.microsoft": 1})
    b.input("x", TensorProto.FLOAT, list(x.shape))
    y = node_builder(b, "x")
    b.op("Identity", y, outputs=["y"])
    b.output("y", TensorProto.FLOAT, ["batch", "seq", "n"])
    b.save(producer="test")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(folder / "m.onnx"), options, providers=["CPUExecutionProvider"]).run(
        None, {"x": x})[0]


@pytest.mark.parametrize("dialect, precision", [("ort", "int4"), ("ort", "int8"), ("tensorrt", "int4"),
                                                ("tensorrt", "int8")])
def test_codec_nodes_compute_x_times_dequantized_weight(dialect, precision):
    from edgekit.quant.codec import QuantCodec

    w = rng.standard_normal((48, 64)).astype(np.float32)
    x = rng.standard_normal((1, 3, 64)).astype(np.float32)
    codec = QuantCodec(dialect, precision, np.float32, accuracy_level=0)
    y = _graph_output(lambda b, name: codec.linear(b, name, "lin", w, None, []), x)
    if dialect == "ort":
        deq = to_nbits(w, 4 if precision == "int4" else 8, 32).dequantize()
    else:
        deq = (to_qdq_int4(w, 32) if precision == "int4" else to_qdq_int8(w)).dequantize().T
    assert np.abs(y - x @ deq.T).max() < 1e-4


# ----- GGUF lossless -------------------------------------------------------------------------------------
def _gguf_blocks(qtype: str, n: int, k: int):
    """Raw GGUF blocks of ``qtype`` for an (n, k) tensor and what the gguf package dequantizes them to."""
    import gguf
    from gguf import quants
    from gguf.constants import GGML_QUANT_SIZES

    t = getattr(gguf.GGMLQuantizationType, qtype)
    block, size = GGML_QUANT_SIZES[t]
    if qtype in ("Q4_0", "Q4_1", "Q5_0", "Q8_0"):
        raw = quants.quantize(rng.standard_normal((n, k)).astype(np.float32), t)
    else:  # the gguf package cannot quantize K types: random codes with sane fp16 scales
        raw = rng.integers(0, 256, (n, k // block * size), dtype=np.uint8).reshape(n, k // block, size)
        d = (rng.random((n, k // block)) * 0.01 + 0.001).astype(np.float16).view(np.uint8).reshape(n, -1, 2)
        if qtype == "Q4_K":
            raw[..., 0:2] = d
            raw[..., 2:4] = d[..., ::-1] & 0x3B                      # dmin: another small positive half
        else:  # Q6_K: d is the last two bytes
            raw[..., 208:210] = d
        raw = raw.reshape(n, -1)
    deq = quants.dequantize(raw, t).reshape(n, k)
    return raw.reshape(n, k // block, size), deq


@pytest.mark.parametrize("qtype, bits", [("Q4_0", 4), ("Q4_1", 4), ("Q4_K", 4), ("Q5_0", 8), ("Q8_0", 8),
                                         ("Q6_K", 8)])
def test_gguf_blocks_are_carried_over_exactly(qtype, bits):
    raw, deq = _gguf_blocks(qtype, 6, 512)
    enc = nbits_from_gguf(qtype, raw, deq)
    assert enc is not None and enc.bits == bits
    assert np.allclose(enc.dequantize(), deq, rtol=1e-5, atol=1e-6)
    assert (enc.offsets is not None) == (qtype in ("Q4_1", "Q4_K"))
    # and through onnxruntime (fp32 compute): x @ W^T equals the file's dequantized product
    from edgekit.quant.codec import QuantCodec

    codec = QuantCodec("ort", "int4", np.float32, accuracy_level=0)
    x = rng.standard_normal((1, 2, 512)).astype(np.float32)
    y = _graph_output(lambda b, name: codec._nbits_node(b, name, "lin", enc), x)
    assert np.abs(y - x @ deq.T).max() < 1e-3 * np.abs(x @ deq.T).max()


def test_q4_0_maps_to_tensorrt_int4_with_positive_scales():
    """llama.cpp's Q4_0 maps a block's peak to code -8, so d < 0 for every block whose peak is positive. Blocks
    with d > 0 or (d < 0 without a -8 code: negated) stay exact; d < 0 with a -8 code is re-quantized."""
    raw, deq = _gguf_blocks("Q4_0", 4, 128)
    raw[0, 1, :2] = np.array([0.0], np.float16).view(np.uint8)                 # a block with d = 0 (all zero)
    raw[1, 2, :2] = (-np.abs(np.frombuffer(raw[1, 2, :2].tobytes(), np.float16))).view(np.uint8)  # d < 0
    raw[1, 2, 2:] = (raw[1, 2, 2:] & 0xEE) | 0x11                              # ...and keep its codes off -8
    from gguf import GGMLQuantizationType, quants

    deq = quants.dequantize(raw.reshape(4, -1), GGMLQuantizationType.Q4_0).reshape(4, 128)
    enc, counts = qdq_int4_from_q4_0(raw, deq)
    d = np.frombuffer(np.ascontiguousarray(raw[..., :2]).tobytes(), np.float16).reshape(4, 4).astype(np.float32)
    assert (enc.scales > 0).all() and enc.values.min() >= -8 and enc.values.max() <= 7
    assert counts["negated"] >= 1 and counts["requantized"] >= 1 and sum(counts.values()) == 16
    got = enc.dequantize().T.reshape(4, 4, 32)
    want = deq.reshape(4, 4, 32)
    requantized = (d < 0) & (np.abs(want / np.where(d == 0, 1, d)[..., None] + 8) < 1e-3).any(-1)
    assert requantized.sum() == counts["requantized"]
    assert np.allclose(got[~requantized], want[~requantized], rtol=1e-6, atol=1e-7)       # exact blocks
    s = np.maximum(np.abs(want).max(-1) / 7.5, 2.0 ** -14)[..., None]                  # a fixed amax / 7.5
    fixed_err = ((np.clip(np.rint(want / s), -8, 7) * s - want) ** 2).sum(-1)
    assert (((got - want) ** 2).sum(-1)[requantized] <= fixed_err[requantized] + 1e-6).all()


def test_asymmetric_blocks_have_no_exact_tensorrt_form():
    raw, deq = _gguf_blocks("Q4_1", 4, 128)
    assert qdq_int4_from_q4_0(raw, deq) is None          # Q4_1 read as Q4_0 does not reproduce the weights
