"""Lossless import of GGUF block quantizations: carry the codes over instead of re-quantizing.

Re-quantizing weights that are already 4-bit compounds the error (measured on SmolLM2's Q4_1 file: every
4-bit re-quantization drifted from the file's own greedy output after 4-6 tokens). Where a GGUF block format
is exactly a MatMulNBits encoding, the codes are unpacked from the file's bytes and the block header's numbers
are kept in their own compact form (:class:`~edgekit.quant.encodings.Factor`: GGUF's fp16 ``d`` and, for
K-quants, the 6-/8-bit sub-block scales), so the bundle is as small as the file:

    GGUF    block  per block                   MatMulNBits (zero point 8 / 128)            stored bytes/weight
    Q4_0    32     w = d * (q - 8)             4-bit, scale d                                 4.5 bits (= GGUF)
    Q4_1    32     w = d * q + m               4-bit, scale d, offset m + 8d                  5 bits (= GGUF)
    Q4_K    32*    w = d*sc * q - dmin*m       4-bit, scale d*sc, offset -dmin*m + 8*d*sc     4.625 (GGUF 4.5)
    Q5_0    32     w = d * (q - 16)            8-bit, scale d, code q + 112                   8.5 (GGUF 5.5)
    Q8_0    32     w = d * q                   8-bit, scale d, code q + 128                   8.5 (= GGUF)
    Q6_K    16*    w = d*sc * (q - 32)         8-bit, scale d*sc, code q + 96                 8.5625 (GGUF 6.5625)
    (* sub-blocks of a 256-element super-block; sc and m are stored as one byte each instead of 6 bits)

The offsets are not part of MatMulNBits: they are added as a second, small product (``sum of x over each
block @ offset^T``, see :mod:`edgekit.quant.codec`); float zero points would express them inside MatMulNBits,
but onnxruntime's CPU kernel runs those about 50x slower. MatMulNBits has no fast 5- or 6-bit form (its 2-bit
path, which a 4+2 split of Q6_K would need, measured 100x slower than 4-bit), so Q5_0 and Q6_K codes take a
byte each: :mod:`edgekit.quant.codec` re-quantizes them to 4 bits in an INT4 build unless asked to keep them.

How: the codes are unpacked straight from the blocks (llama.cpp's bit layouts, as gguf-py's dequantizers read
them), row by row if asked, without ever forming the float weights; the result is checked against gguf-py's
own dequantization of the first rows of every tensor.
"""

from __future__ import annotations

import numpy as np

from .encodings import QDQ, SCALE_FLOOR, Factor, NBits, pack_codes, positive_codes, unpack_codes

# qtype -> (bits of the MatMulNBits encoding, its block size)
LOSSLESS = {"Q4_0": (4, 32), "Q4_1": (4, 32), "Q4_K": (4, 32), "Q5_0": (8, 32), "Q8_0": (8, 32), "Q6_K": (8, 16)}
# Rows of a tensor compared with gguf-py's dequantization (cheap, catches any layout mistake).
CHECK_ROWS = 8


def _f16(raw: np.ndarray, offset: int) -> np.ndarray:
    """(N, nb) float16 from two bytes at ``offset`` of each block."""
    return np.ascontiguousarray(raw[..., offset:offset + 2]).view(np.float16)[..., 0]


def _k4_scales(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K: the 8 (scale, min) 6-bit pairs of each super-block, (N, nb, 8) uint8 each
    (llama.cpp's get_scale_min_k4)."""
    s = raw[..., 4:16]                                                     # (N, nb, 12)
    sc = np.empty(s.shape[:-1] + (8,), np.uint8)
    mn = np.empty_like(sc)
    sc[..., :4] = s[..., 0:4] & 63
    mn[..., :4] = s[..., 4:8] & 63
    sc[..., 4:] = (s[..., 8:12] & 0x0F) | ((s[..., 0:4] >> 6) << 4)
    mn[..., 4:] = (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)
    return sc, mn


def _nibbles_32(qs: np.ndarray) -> np.ndarray:
    """Q4_0/Q4_1 (N, nb, 16) bytes -> (N, nb, 32) codes: the low nibbles are values 0-15, the high 16-31."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def decode(qtype: str, raw: np.ndarray) -> NBits | None:
    """The MatMulNBits encoding carrying a GGUF tensor's codes exactly, or None for a type that has none.

    ``raw`` is (N, n_blocks, bytes_per_block) uint8 (e.g. a row slice of :meth:`GGUFReader.raw`).
    """
    if qtype not in LOSSLESS:
        return None
    raw = np.asarray(raw)
    n, nb, _ = raw.shape
    if qtype == "Q4_0":
        codes = _nibbles_32(raw[..., 2:18])
        return _nbits(4, 32, codes, Factor(_f16(raw, 0)))
    if qtype == "Q4_1":
        codes = _nibbles_32(raw[..., 4:20])
        return _nbits(4, 32, codes, Factor(_f16(raw, 0)), Factor(_f16(raw, 2)), 1.0, 8.0)
    if qtype == "Q5_0":
        qh = np.ascontiguousarray(raw[..., 2:6]).view("<u4")                       # (N, nb, 1) high bits
        bit = (qh >> np.arange(32, dtype=np.uint32)) & 1                          # (N, nb, 32)
        low = _nibbles_32(raw[..., 6:22])
        q = low | (bit.astype(np.uint8) << 4)                                     # 0..31, w = d * (q - 16)
        return _nbits(8, 32, q + np.uint8(112), Factor(_f16(raw, 0)))
    if qtype == "Q8_0":
        q = raw[..., 2:34].view(np.int8)                                           # (N, nb, 32)
        return _nbits(8, 32, (q.astype(np.int16) + 128).astype(np.uint8), Factor(_f16(raw, 0)))
    if qtype == "Q4_K":
        sc, mn = _k4_scales(raw)                                                   # (N, nb, 8)
        qs = raw[..., 16:144].reshape(n, nb, 4, 1, 32)                             # 4 groups of 64 values
        codes = np.concatenate([qs & 0x0F, qs >> 4], axis=3).reshape(n, nb * 8, 32)
        # -dmin stored negated (exact in fp16), so the graph's offset is one product: (-dmin) * m + 8 * d * sc
        return _nbits(4, 32, codes, Factor(_f16(raw, 0), sc.reshape(n, -1)),
                      Factor(-_f16(raw, 2), mn.reshape(n, -1)), 1.0, 8.0)
    # Q6_K: ql (128) low nibbles, qh (64) two high bits, 16 int8 scales, d
    ql = raw[..., 0:128].reshape(n, nb, 2, 1, 64)
    ql = np.concatenate([ql & 0x0F, ql >> 4], axis=3).reshape(n, nb, 2, 4, 32)     # (half, quarter, 32)
    qh = raw[..., 128:192].reshape(n, nb, 2, 1, 32)
    qh = (qh >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 1, 4, 1)) & 3      # (N, nb, 2, 4, 32)
    q = (ql | (qh << 4)).reshape(n, nb * 16, 16)                                    # 0..63, w = d*sc*(q - 32)
    sc = raw[..., 192:208].view(np.int8).reshape(n, nb * 16)
    return _nbits(8, 16, q + np.uint8(96), Factor(_f16(raw, 208), sc))


def _nbits(bits: int, bs: int, codes: np.ndarray, scale: Factor, offset: Factor | None = None,
           sign: float = 1.0, shift: float = 0.0) -> NBits:
    n = codes.shape[0]
    codes = codes.reshape(n, -1, bs)
    blob = pack_codes(codes, 4) if bits == 4 else np.ascontiguousarray(codes, np.uint8)
    return NBits(bits, bs, n, codes.shape[1] * bs, blob, scale, None, offset, sign, shift)


def check(qtype: str, raw: np.ndarray, enc: NBits, rows: int = CHECK_ROWS) -> bool:
    """Whether ``enc`` reproduces gguf-py's dequantization of the first ``rows`` rows of ``raw``."""
    from gguf.constants import GGMLQuantizationType
    from gguf.quants import dequantize

    rows = min(rows, enc.n)
    expected = dequantize(np.ascontiguousarray(raw[:rows]).reshape(rows, -1), GGMLQuantizationType[qtype])
    head = decode(qtype, raw[:rows]) if rows < enc.n else enc
    got = head.dequantize()
    return bool(np.allclose(got, expected.reshape(got.shape), rtol=1e-5, atol=1e-6, equal_nan=False))


def nbits_from_gguf(qtype: str, raw: np.ndarray, dequantized: np.ndarray | None = None) -> NBits | None:
    """:func:`decode`, checked: against ``dequantized`` (the (N, K) float32 the file means) when given, else
    against gguf-py on the first rows. None when the type has no exact form or the check fails (e.g. a
    non-finite block scale)."""
    enc = decode(qtype, raw)
    if enc is None:
        return None
    if dequantized is not None:
        ok = np.allclose(enc.dequantize(), dequantized, rtol=1e-5, atol=1e-6)
    else:
        ok = check(qtype, raw, enc)
    return enc if ok else None


def qdq_int4_from_q4_0(raw: np.ndarray, dequantized: np.ndarray | None = None
                       ) -> tuple[QDQ, dict[str, int]] | None:
    """TensorRT's symmetric INT4 from Q4_0 (the one GGUF format it can carry), with every scale > 0.

    Q4_0 stores w = d * c with c in -8..7 and a signed d (llama.cpp maps a block's peak to -8, so d < 0 when
    the peak is positive). TensorRT refuses scales <= 0 (onnx-tensorrt QuantDequantLinearHelper), so block by
    block: d > 0 is carried as is; d < 0 becomes (-d, -c) when no code is -8 (exact, since -c then fits
    -7..8 minus 8); a block with d < 0 and a -8 code, whose -c = +8 does not fit INT4, is re-quantized from
    its dequantized values (:func:`positive_codes`); d = 0 (all zero) gets SCALE_FLOOR and zero codes.
    Returns the encoding and block counts {"exact", "negated", "requantized"}, or None when the file's
    blocks do not reproduce ``dequantized``.
    """
    enc = nbits_from_gguf("Q4_0", raw, dequantized)
    if enc is None:
        return None
    if dequantized is None:
        dequantized = enc.dequantize()
    n, k = dequantized.shape
    codes = unpack_codes(enc.blob, 4).reshape(n, -1, 32).astype(np.int8) - 8   # signed, (N, nb, 32)
    d = enc.scales.astype(np.float32)                                          # (N, nb), signed
    negative = d < 0
    has_min = (codes == -8).any(axis=-1)
    requant = negative & has_min
    flip = negative & ~has_min
    codes = np.where(flip[..., None], -codes, np.where((d == 0)[..., None], np.int8(0), codes))
    scales = np.where(flip, -d, np.where(d == 0, np.float32(SCALE_FLOOR), d)).astype(np.float32)
    if requant.any():
        rq_codes, rq_scales = positive_codes(dequantized.reshape(n, -1, 32)[requant], 4)
        codes[requant], scales[requant] = rq_codes, rq_scales
    counts = {"exact": int((~negative).sum()), "negated": int(flip.sum()), "requantized": int(requant.sum())}
    return QDQ(4, 32, codes.reshape(n, k).T.copy(), scales.T.copy()), counts
