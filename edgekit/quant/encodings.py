"""Weight encodings, in numpy: quantize, pack, and (for tests and eval) unpack and dequantize.

All weights here are in Hugging Face orientation, (N, K) = (out_features, in_features); blocks run along K.

Two containers hold the same numbers in different layouts:

``nbits`` — onnxruntime's MatMulNBits (``ort`` dialect)::

    B       uint8 (N, n_blocks, block_size * bits / 8)   4-bit: element 2j in the low nibble of byte j
    scales  float (N * n_blocks,), stored compactly as a Factor (fp16, or GGUF's fp16 d x integer sub-scales)
            and expanded in the graph (folded by onnxruntime at load)
    zeros   absent (the default zero point: 8 for 4-bit, 128 for 8-bit) or one integer for every block
    w[n, k] = (q[n, k] - zero) * scale[n, k // bs] + offset[n, k // bs]   (K is zero-padded to whole blocks)

  ``offset`` (asymmetric GGUF blocks, e.g. Q4_1's ``m``) is not part of MatMulNBits: it is added as a second,
  small product, ``sum of x over each block @ offset^T`` (see :mod:`edgekit.quant.codec`). Float zero points
  would express it inside MatMulNBits, but onnxruntime's CPU kernel runs them about 50x slower.

``qdq`` — ONNX DequantizeLinear on the transposed (K, N) MatMul weight (``tensorrt`` dialect)::

    INT4    int4 (K, N), signed, two per byte low nibble first (ONNX packing), scales (K / bs, N), axis 0,
            block_size bs, no zero point (TensorRT's weight-only INT4 is symmetric; bs must divide K)
    INT8    int8 (K, N), scales (N,), axis 1 (per output channel), no zero point

  Every scale is > 0: TensorRT's ONNX parser refuses a DequantizeLinear with any scale <= 0 ("Scale
  coefficients must all be positive", onnx-tensorrt onnxOpImporters.cpp QuantDequantLinearHelper; NvInfer.h
  IDequantizeLayer). So the sign trick of :func:`symmetric_codes` (used by the ``nbits`` form, whose
  MatMulNBits takes any scale) is not used here: INT4 scales come from a small per-block search
  (:func:`positive_codes`), and all-zero blocks get SCALE_FLOOR instead of 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import UserInputError

BLOCK_SIZES = (16, 32, 64, 128)


@dataclass(frozen=True)
class Factor:
    """Per-block numbers (scales or offsets) as stored in the bundle, compactly:

        value[n, j] = base[n, j // per] * mult[n, j]      per = n_blocks / n_groups; mult None: base[n, j]

    ``base`` is float16 (GGUF's own ``d``/``dmin``, or an fp16-rounded RTN scale) and ``mult`` the small integer
    sub-block scales of K-quants (uint8 / int8). The graph expands them to the compute dtype with Cast/Mul on
    initializers only, which onnxruntime folds once at load; the file keeps GGUF's size (fp32 scales per 32
    values would add a bit per weight: +22% on a Q4_K file).
    """

    base: np.ndarray                  # float16 (N, n_groups)
    mult: np.ndarray | None = None    # uint8 / int8 (N, n_blocks), n_blocks a multiple of n_groups

    def values(self) -> np.ndarray:
        """(N, n_blocks) float32, exactly as the graph computes them in fp32."""
        base = self.base.astype(np.float32)
        if self.mult is None:
            return base
        n, groups = base.shape
        per = self.mult.shape[1] // groups
        return (self.mult.astype(np.float32).reshape(n, groups, per) * base[..., None]).reshape(n, -1)

    @property
    def nbytes(self) -> int:
        return self.base.nbytes + (0 if self.mult is None else self.mult.nbytes)

    @staticmethod
    def concat(factors: list[Factor]) -> Factor:
        """Stacked along N (rows); all with the same structure."""
        mults = [f.mult for f in factors]
        return Factor(np.concatenate([f.base for f in factors]),
                      None if mults[0] is None else np.concatenate(mults))


def fp16_factor(values: np.ndarray) -> Factor:
    """Plain per-block float values stored as fp16 (the values the graph will compute with)."""
    return Factor(np.asarray(values, np.float32).astype(np.float16))


@dataclass(frozen=True)
class NBits:
    """A weight in MatMulNBits form.

    ``scale`` is stored as a :class:`Factor`; ``offset`` (asymmetric GGUF blocks) too, with
    offsets = offset_sign * offset.values() + offset_shift * scales (Q4_1: m + 8d; Q4_K: -dmin*m + 8*d*sc).
    """

    bits: int
    block_size: int
    n: int
    k: int
    blob: np.ndarray                  # uint8 (N, n_blocks, block_size * bits // 8)
    scale: Factor                     # (N, n_blocks) values
    zero_point: int | None = None     # None: MatMulNBits' default (8 or 128)
    offset: Factor | None = None      # added after the scaled codes (see above)
    offset_sign: float = 1.0
    offset_shift: float = 0.0

    @property
    def n_blocks(self) -> int:
        return -(-self.k // self.block_size)

    @property
    def zero(self) -> int:
        return (1 << (self.bits - 1)) if self.zero_point is None else self.zero_point

    @property
    def scales(self) -> np.ndarray:
        """float32 (N, n_blocks)."""
        return self.scale.values()

    @property
    def offsets(self) -> np.ndarray | None:
        """float32 (N, n_blocks), or None for symmetric encodings."""
        if self.offset is None:
            return None
        return (np.float32(self.offset_sign) * self.offset.values()
                + np.float32(self.offset_shift) * self.scales).astype(np.float32)

    @property
    def nbytes(self) -> int:
        """Bytes of every initializer this weight becomes (codes, scale and offset factors, zero points)."""
        zp = 0 if self.zero_point is None else self.packed_zero_points().nbytes
        return self.blob.nbytes + self.scale.nbytes + (0 if self.offset is None else self.offset.nbytes) + zp

    def packed_zero_points(self) -> np.ndarray:
        """MatMulNBits' zero_points input: uint8, 4-bit values two per byte per row of blocks."""
        if self.bits == 8:
            return np.full(self.n * self.n_blocks, self.zero, np.uint8)
        per_row = np.full((self.n, self.n_blocks + self.n_blocks % 2), self.zero, np.uint8)
        return pack_codes(per_row, 4).reshape(-1)

    def dequantize(self) -> np.ndarray:
        """(N, K) float32, computed independently of how the codes were made."""
        codes = unpack_codes(self.blob, self.bits).reshape(self.n, self.n_blocks, self.block_size).astype(np.float32)
        w = (codes - np.float32(self.zero)) * self.scales[..., None]
        offsets = self.offsets
        if offsets is not None:
            w = w + offsets[..., None]
        return w.reshape(self.n, -1)[:, :self.k]

    @staticmethod
    def stack(encs: list[NBits]) -> NBits:
        """Several weights with the same K, encoding and block size, stacked along N."""
        first = encs[0]
        if len(encs) == 1:
            return first
        return NBits(first.bits, first.block_size, sum(e.n for e in encs), first.k,
                     np.concatenate([e.blob for e in encs]), Factor.concat([e.scale for e in encs]),
                     first.zero_point, None if first.offset is None else Factor.concat([e.offset for e in encs]),
                     first.offset_sign, first.offset_shift)

    def same_form(self, other: NBits) -> bool:
        """Whether the two can be stacked into one MatMulNBits."""
        def shape(f):
            return None if f is None else (f.base.shape[1], None if f.mult is None else (f.mult.shape[1], f.mult.dtype))
        return ((self.bits, self.block_size, self.zero_point, self.offset_sign, self.offset_shift,
                 shape(self.scale), shape(self.offset)) ==
                (other.bits, other.block_size, other.zero_point, other.offset_sign, other.offset_shift,
                 shape(other.scale), shape(other.offset)))


def _check_block(block_size: int, k: int, *, must_divide: bool) -> None:
    if block_size not in BLOCK_SIZES:
        raise UserInputError(f"invalid block size {block_size}: use one of {', '.join(map(str, BLOCK_SIZES))}")
    if must_divide and k % block_size:
        raise UserInputError(
            f"block size {block_size} does not divide K = {k}, which TensorRT's INT4 requires: use a block size "
            f"that divides {k} ({', '.join(str(b) for b in BLOCK_SIZES if k % b == 0) or 'none does'})")


def _blocks(w: np.ndarray, block_size: int) -> np.ndarray:
    """(N, K) -> (N, n_blocks, block_size), zero-padding K."""
    n, k = w.shape
    pad = (-k) % block_size
    if pad:
        w = np.concatenate([w, np.zeros((n, pad), w.dtype)], axis=1)
    return w.reshape(n, -1, block_size)


def symmetric_codes(w: np.ndarray, bits: int, block_size: int, *, fp16_scales: bool = False
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Round-to-nearest symmetric block quantization: signed codes (N, n_blocks, bs) and scales (N, n_blocks).

    The scale maps the block's largest-magnitude value to the most negative code (-8 or -128), the trick
    llama.cpp's Q4_0 uses: the full signed range is used instead of leaving one code idle. With
    ``fp16_scales`` the scale is rounded to fp16 (how it is stored) before the codes are chosen.
    """
    blocks = _blocks(np.asarray(w, np.float32), block_size)
    lo = -(1 << (bits - 1))
    idx = np.abs(blocks).argmax(axis=-1)
    peak = np.take_along_axis(blocks, idx[..., None], axis=-1)[..., 0]            # signed, largest |w|
    scales = (peak / lo).astype(np.float32)
    if fp16_scales:
        scales = scales.astype(np.float16).astype(np.float32)
    safe = np.where(scales == 0, 1.0, scales)
    codes = np.clip(np.rint(blocks / safe[..., None]), lo, -lo - 1).astype(np.int8)
    return codes, scales


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned codes (..., bs) -> bytes; 4-bit: element 2j in the low nibble of byte j."""
    codes = codes.astype(np.uint8)
    if bits == 8:
        return codes
    return (codes[..., 0::2] & 0x0F) | ((codes[..., 1::2] & 0x0F) << 4)


def unpack_codes(blob: np.ndarray, bits: int) -> np.ndarray:
    if bits == 8:
        return blob
    out = np.empty(blob.shape[:-1] + (blob.shape[-1] * 2,), np.uint8)
    out[..., 0::2] = blob & 0x0F
    out[..., 1::2] = blob >> 4
    return out


def to_nbits(w: np.ndarray, bits: int, block_size: int) -> NBits:
    """RTN symmetric MatMulNBits encoding of a (N, K) weight (K zero-padded to whole blocks)."""
    n, k = w.shape
    _check_block(block_size, k, must_divide=False)
    codes, scales = symmetric_codes(w, bits, block_size, fp16_scales=True)
    offset = 1 << (bits - 1)
    return NBits(bits, block_size, n, k, pack_codes(codes.astype(np.int16) + offset, bits), fp16_factor(scales))


# ----- ONNX DequantizeLinear (tensorrt dialect) --------------------------------------------------------
@dataclass(frozen=True)
class QDQ:
    """A (K, N) MatMul weight as DequantizeLinear inputs."""

    bits: int
    block_size: int                   # 0 = per output channel
    values: np.ndarray                # int8 (K, N): signed codes (int4 range for bits=4)
    scales: np.ndarray                # float32 (K / bs, N) for blocks, (N,) per channel

    def dequantize(self) -> np.ndarray:
        """(K, N) float32."""
        if self.block_size:
            return self.values.astype(np.float32) * np.repeat(self.scales, self.block_size, axis=0)
        return self.values.astype(np.float32) * self.scales[None, :]

    def packed(self) -> bytes:
        """ONNX raw data: INT8 as is; INT4 two per byte, low nibble first, row-major over (K, N)."""
        if self.bits == 8:
            return self.values.astype(np.int8).tobytes()
        flat = self.values.reshape(-1).astype(np.uint8) & 0x0F
        if flat.size % 2:
            flat = np.append(flat, np.uint8(0))
        return (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8).tobytes()


# The smallest scale written for TensorRT: fp16's smallest normal number, so that a scale stays > 0 after the
# cast to an fp16 graph's scale type (and is not a subnormal that a kernel may flush to zero).
SCALE_FLOOR = float(np.finfo(np.float16).tiny)          # 2**-14 = 6.1e-5


# INT4 for TensorRT: the candidate divisors d of a block's scale amax / d (codes clamped to -8..7); each block takes
# the one with the least squared error. Measured on SmolLM2's linears (relative squared error of the weights):
# 0.0074 with this search, 0.0077 for MatMulNBits' signed-peak / -8 (which needs negative scales), 0.0093 for
# amax / 8, 0.0100 for amax / 7.5, 0.0105 for amax / 7 (codes -7..7).
INT4_DIVISORS = tuple(7.0 + 0.25 * i for i in range(9))       # 7, 7.25, ..., 9
_BLOCKS_PER_CHUNK = 1 << 16                                  # bounds the temporaries (8 MiB) of a large weight


def positive_codes(blocks: np.ndarray, bits: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric INT4 codes (..., bs) in -8..7 and strictly positive scales (...,) of float blocks (..., bs).

    Per block, the scale amax / d for the d of INT4_DIVISORS that reconstructs the block with the least squared
    error: d > 7.5 rounds the largest magnitude to 8 steps (kept when negative, clamped to 7 when positive) in
    exchange for a finer step. Scales below SCALE_FLOOR (all-zero or nearly zero blocks) are raised to it.
    """
    if bits != 4:
        raise ValueError("positive_codes encodes INT4")
    blocks = np.asarray(blocks, np.float32)
    codes = np.empty(blocks.shape, np.int8)
    scales = np.empty(blocks.shape[:-1], np.float32)
    flat_b, flat_c, flat_s = blocks.reshape(-1, blocks.shape[-1]), codes.reshape(-1, blocks.shape[-1]), \
        scales.reshape(-1)
    for start in range(0, flat_b.shape[0], _BLOCKS_PER_CHUNK):
        b = flat_b[start:start + _BLOCKS_PER_CHUNK]                        # (blocks, bs)
        amax = np.abs(b).max(axis=-1)
        best_err = np.full(amax.shape, np.inf, np.float32)
        best = np.full(amax.shape, np.float32(SCALE_FLOOR))
        for d in INT4_DIVISORS:
            s = np.maximum(amax / np.float32(d), np.float32(SCALE_FLOOR))
            q = np.clip(np.rint(b / s[:, None]), -8, 7)
            q *= s[:, None]
            q -= b
            err = np.einsum("ij,ij->i", q, q)
            better = err < best_err
            best_err[better], best[better] = err[better], s[better]
        flat_s[start:start + len(b)] = best
        flat_c[start:start + len(b)] = np.clip(np.rint(b / best[:, None]), -8, 7)
    return codes, scales


def to_qdq_int4(w: np.ndarray, block_size: int) -> QDQ:
    """Symmetric INT4 blocked along K for TensorRT, every scale > 0; ``w`` is (N, K)."""
    n, k = w.shape
    _check_block(block_size, k, must_divide=True)
    codes, scales = positive_codes(_blocks(np.asarray(w, np.float32), block_size), 4)   # (N, nb, bs), (N, nb)
    return QDQ(4, block_size, codes.reshape(n, k).T.copy(), scales.T.copy())


def to_qdq_int8(w: np.ndarray) -> QDQ:
    """Symmetric INT8 per output channel, every scale > 0 (amax / 127, codes -127..127); ``w`` is (N, K)."""
    w = np.asarray(w, np.float32)
    scales = np.maximum(np.abs(w).max(axis=1) / 127.0, SCALE_FLOOR).astype(np.float32)   # (N,)
    codes = np.clip(np.rint(w / scales[:, None]), -127, 127).astype(np.int8)
    return QDQ(8, 0, codes.T.copy(), scales)


def int8_rows(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-row symmetric INT8 of a (V, H) table: codes (V, H) int8 and scales (V,) float32."""
    q = to_qdq_int8(w)
    return q.values.T.copy(), q.scales
