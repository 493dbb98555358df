"""Lossless import of GGUF block quantizations: carry the codes over instead of re-quantizing.

Re-quantizing weights that are already 4-bit compounds the error (measured on SmolLM2's Q4_1 file: every
4-bit re-quantization drifted from the file's own greedy output after 4-6 tokens). Where a GGUF block format
is exactly a MatMulNBits encoding, the codes and scales are taken from the file:

    GGUF    block  per block                         MatMulNBits                            exact?
    Q4_0    32     w = d * (q - 8)                   4-bit, scale d, zero 8 (default)          yes
    Q4_1    32     w = d * q + m                     4-bit, scale d, zero 8, offset m + 8d     yes
    Q4_K    32*    w = d*sc * q - dmin*m             4-bit, scale d*sc, zero 8, offset 8d*sc - dmin*m  yes
    Q5_0    32     w = d * (q - 16)                  8-bit, scale d, code q + 112         yes
    Q8_0    32     w = d * q                         8-bit, scale d, code q + 128         yes
    Q6_K    16*    w = d*sc * (q - 32)               8-bit, scale d*sc, code q + 96      yes
    (* sub-blocks of a 256-element super-block)

Q5_1 / Q5_K (asymmetric 5-bit) would need offsets on 8-bit codes, which is not done yet; they, F16/F32 and the TensorRT dialect's non-Q4_0 inputs (TensorRT accepts only symmetric
INT4) are re-quantized from the dequantized weights, and the build says so.

How: the block header gives each block's scale (and offset); the codes are recovered from the dequantized
values (exact small integers), then the encoding is checked to reproduce the file's dequantized weights.
"""

from __future__ import annotations

import numpy as np

from .encodings import SCALE_FLOOR, NBits, QDQ, pack_codes, positive_codes, unpack_codes

# qtype -> (bits of the MatMulNBits encoding, its block size)
LOSSLESS = {"Q4_0": (4, 32), "Q4_1": (4, 32), "Q4_K": (4, 32), "Q5_0": (8, 32), "Q8_0": (8, 32), "Q6_K": (8, 16)}


def _f16(raw: np.ndarray, offset: int) -> np.ndarray:
    """(N, nb) float32 from two bytes at ``offset`` of each block."""
    return np.ascontiguousarray(raw[..., offset:offset + 2]).view(np.float16)[..., 0].astype(np.float32)


def _k4_scales(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K: the 8 (scale, min) 6-bit pairs of each super-block, (N, nb, 8) each (llama.cpp's get_scale_min_k4)."""
    s = raw[..., 4:16].astype(np.uint16)                                   # (N, nb, 12)
    sc = np.empty(s.shape[:-1] + (8,), np.uint16)
    mn = np.empty_like(sc)
    sc[..., :4] = s[..., 0:4] & 63
    mn[..., :4] = s[..., 4:8] & 63
    sc[..., 4:] = (s[..., 8:12] & 0x0F) | ((s[..., 0:4] >> 6) << 4)
    mn[..., 4:] = (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)
    return sc.astype(np.float32), mn.astype(np.float32)


def scale_and_offset(qtype: str, raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per sub-block (N, n_sub) ``scale`` and ``offset`` such that w = scale * c + offset for integer c."""
    n = raw.shape[0]
    if qtype == "Q4_0":
        d = _f16(raw, 0)
        return d, -8 * d
    if qtype == "Q4_1":
        return _f16(raw, 0), _f16(raw, 2)
    if qtype == "Q5_0":
        d = _f16(raw, 0)
        return d, -16 * d
    if qtype == "Q8_0":
        d = _f16(raw, 0)
        return d, np.zeros_like(d)
    if qtype == "Q4_K":
        d, dmin = _f16(raw, 0)[..., None], _f16(raw, 2)[..., None]
        sc, mn = _k4_scales(raw)
        return (d * sc).reshape(n, -1), (-dmin * mn).reshape(n, -1)
    if qtype == "Q6_K":
        d = _f16(raw, 208)[..., None]
        sc = np.ascontiguousarray(raw[..., 192:208]).view(np.int8).astype(np.float32)      # (N, nb, 16)
        return (d * sc).reshape(n, -1), (-32 * d * sc).reshape(n, -1)
    raise KeyError(qtype)


def nbits_from_gguf(qtype: str, raw: np.ndarray, dequantized: np.ndarray) -> NBits | None:
    """The MatMulNBits encoding carrying a GGUF tensor's codes, or None when it cannot be exact.

    ``raw`` is (N, n_blocks, bytes_per_block) uint8, ``dequantized`` the (N, K) float32 the file means.
    """
    if qtype not in LOSSLESS:
        return None
    bits, bs = LOSSLESS[qtype]
    n, k = dequantized.shape
    if k % bs:
        return None
    scale, offset = scale_and_offset(qtype, raw)                            # (N, K / bs)
    w = dequantized.reshape(n, -1, bs)
    safe = np.where(scale == 0, 1.0, scale)[..., None]
    codes = np.rint((w - offset[..., None]) / safe)                        # the file's integer codes
    codes = np.where(scale[..., None] == 0, 0, codes)
    if bits == 4:
        if codes.min() < 0 or codes.max() > 15:
            return None
        blob = pack_codes(codes.astype(np.uint8), 4)
        if qtype == "Q4_0":  # codes q in 0..15 around the default zero point 8
            enc = NBits(4, bs, n, k, blob, scale.astype(np.float32))
        else:
            # w = d*q + offset = d*(q - 8) + (offset + 8d): centred codes around the default zero point, so that
            # int8-activation rounding (accuracy_level 4) multiplies small codes, and the rest added separately.
            enc = NBits(4, bs, n, k, blob, scale.astype(np.float32),
                        offsets=(offset + 8 * scale).astype(np.float32))
    else:
        # 8-bit with the default zero point 128: code = c + 128 - (offset / scale) for a symmetric offset
        shift = np.rint(-offset / np.where(scale == 0, 1.0, scale))             # 0, 16 or 32
        signed = codes - shift[..., None]
        if signed.min() < -128 or signed.max() > 127:
            return None
        enc = NBits(8, bs, n, k, (signed + 128).astype(np.uint8), scale.astype(np.float32), None)
    if not np.allclose(enc.dequantize(), dequantized, rtol=1e-5, atol=1e-6):
        return None
    return enc


def qdq_int4_from_q4_0(raw: np.ndarray, dequantized: np.ndarray) -> tuple[QDQ, dict[str, int]] | None:
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
