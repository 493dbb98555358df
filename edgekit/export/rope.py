"""Rotary-embedding tables: ``cos``/``sin`` of shape (max_context, head_dim / 2), computed in float64.

Both dialects read positions out of these tables, so any frequency scaling (Llama-3's, or the per-frequency
factors a Llama-3 GGUF stores as ``rope_freqs.weight``) is applied here once and nowhere in the graph.
"""

from __future__ import annotations

import math

import numpy as np

from ..spec import ModelSpec


def inverse_frequencies(spec: ModelSpec, freq_factors: np.ndarray | None = None) -> np.ndarray:
    """(head_dim / 2,) float64 inverse frequencies, scaled as the checkpoint says."""
    dim = spec.head_dim
    inv = 1.0 / (spec.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    if freq_factors is not None:
        # llama.cpp divides each frequency's angle by its factor; that is the same as scaling inv_freq.
        return inv / np.asarray(freq_factors, dtype=np.float64).reshape(-1)
    rs = spec.rope_scaling
    if rs is None:
        return inv
    if rs.kind != "llama3":
        raise ValueError(f"unsupported rope scaling {rs.kind!r}")
    # Llama-3: long wavelengths are slowed by `factor`, short ones kept, the band between interpolated.
    low_wavelen = rs.original_max_position / rs.low_freq_factor
    high_wavelen = rs.original_max_position / rs.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > low_wavelen, inv / rs.factor, inv)
    smooth = (rs.original_max_position / wavelen - rs.low_freq_factor) / (rs.high_freq_factor - rs.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled)


def rope_tables(spec: ModelSpec, max_context: int, dtype=np.float32,
                freq_factors: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``cos, sin``, each (max_context, head_dim / 2)."""
    angles = np.arange(max_context, dtype=np.float64)[:, None] * inverse_frequencies(spec, freq_factors)[None, :]
    return np.cos(angles).astype(dtype), np.sin(angles).astype(dtype)
