"""Activation-aware weight scaling (AWQ-style) before INT4/INT8 rounding.

A few input channels of each linear layer carry much larger activations than the rest; rounding errors
in the weights that multiply them cost the most. Scaling those weight columns up by ``s`` (and the
activations down by ``1/s``) before quantizing gives them finer steps. The product is unchanged in exact
arithmetic because ``1/s`` is folded into whatever produces the input:

    group     input                         weights scaled (columns)     1/s folded into
    qkv       RMSNorm(attn) output           q, k, v                       attn_norm weight
    gate_up   RMSNorm(mlp) output            gate, up                      mlp_norm weight
    down      silu(gate) * up                down                          up (rows)

(The attention output projection is left alone: with grouped KV heads its input channels cannot all be
rescaled through v.) For each group, ``s = mean|x| ** alpha`` with alpha searched on a grid to minimise
``|| x W^T - (x / s) Q(W s)^T ||`` over calibration activations.

The activations come from a float32 numpy forward pass over the calibration tokens, one layer at a time
(weights read layer by layer, hidden states of all calibration tokens kept: tokens x hidden floats).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..export.rope import rope_tables
from ..spec import ModelSpec
from .encodings import to_nbits

GRID = (0.0, 0.15, 0.3, 0.45, 0.6, 0.75, 0.9)


@dataclass(frozen=True)
class AWQScales:
    """Per layer: ``qkv`` (hidden,), ``gate_up`` (hidden,), ``down`` (intermediate,)."""

    layers: tuple[dict[str, np.ndarray], ...]
    alphas: tuple[dict[str, float], ...]
    tokens: int

    def summary(self) -> dict:
        mean = {g: float(np.mean([a[g] for a in self.alphas])) for g in ("qkv", "gate_up", "down")}
        return {"method": "awq", "calibration_tokens": self.tokens, "mean_alpha": mean}


def _rms(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def _rotary(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """x (T, heads, D); cos/sin (T, D/2)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    c, s = cos[:, None, :], sin[:, None, :]
    return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)


def _fake_quant(w: np.ndarray, bits: int, block_size: int) -> np.ndarray:
    return to_nbits(w, bits, block_size).dequantize()


def _search(x: np.ndarray, w: np.ndarray, bits: int, block_size: int) -> tuple[np.ndarray, float]:
    """Best per-input-channel scale for weight ``w`` (N, K) given inputs ``x`` (T, K)."""
    magnitude = np.abs(x).mean(axis=0) + 1e-8                              # (K,)
    reference = x @ w.T                                                     # (T, N)
    best, best_err, best_alpha = np.ones_like(magnitude), np.inf, 0.0
    for alpha in GRID:
        s = magnitude ** alpha
        s = s / np.sqrt(s.max() * s.min())
        approx = (x / s) @ _fake_quant(w * s, bits, block_size).T
        err = float(((approx - reference) ** 2).mean())
        if err < best_err:
            best, best_err, best_alpha = s.astype(np.float32), err, alpha
    return best, best_alpha


def compute_scales(reader, spec: ModelSpec, sequences: list[list[int]], *, bits: int, block_size: int,
                   sample_tokens: int = 256, progress: Callable[[int, int], None] | None = None) -> AWQScales:
    """Run the calibration sequences through the float model layer by layer and search each group's scales."""
    rng = np.random.default_rng(0)
    embed = reader.tensor("embed.weight")
    hs = [embed[np.asarray(seq)].astype(np.float32) for seq in sequences]           # each (T_i, hidden)
    longest = max(len(s) for s in sequences)
    cos, sin = rope_tables(spec, longest, np.float32, _freq_factors(reader))
    total = sum(len(s) for s in sequences)
    pick = np.sort(rng.choice(total, size=min(sample_tokens, total), replace=False))  # rows for the search
    H, Hkv, D = spec.num_heads, spec.num_kv_heads, spec.head_dim
    G = H // Hkv
    layers, alphas = [], []

    def w(name: str, i: int) -> np.ndarray:
        return reader.tensor(name, i).astype(np.float32)

    def b(name: str, i: int):
        return reader.tensor(name, i).astype(np.float32) if reader.has(name, i) else 0.0

    for i in range(spec.num_layers):
        attn_norm, mlp_norm = w("layers.{i}.attn_norm.weight", i), w("layers.{i}.mlp_norm.weight", i)
        wq, wk, wv, wo = (w(f"layers.{{i}}.{n}.weight", i) for n in ("q", "k", "v", "o"))
        bq, bk, bv, bo = (b(f"layers.{{i}}.{n}.bias", i) for n in ("q", "k", "v", "o"))
        wg, wu, wd = (w(f"layers.{{i}}.{n}.weight", i) for n in ("gate", "up", "down"))

        x_attn = [_rms(h, attn_norm, spec.rms_norm_eps) for h in hs]
        attn_out = []
        for x in x_attn:
            t = x.shape[0]
            q = _rotary((x @ wq.T + bq).reshape(t, H, D), cos[:t], sin[:t])          # (T, H, D)
            k = _rotary((x @ wk.T + bk).reshape(t, Hkv, D), cos[:t], sin[:t])        # (T, Hkv, D)
            v = (x @ wv.T + bv).reshape(t, Hkv, D)
            k, v = np.repeat(k, G, axis=1), np.repeat(v, G, axis=1)                  # (T, H, D)
            scores = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(D)                    # (H, T, T)
            scores = scores + np.triu(np.full((t, t), -1e9, np.float32), 1)
            probs = np.exp(scores - scores.max(-1, keepdims=True))
            probs /= probs.sum(-1, keepdims=True)
            attn_out.append(np.einsum("hqk,khd->qhd", probs, v).reshape(t, H * D))
        hs = [h + a @ wo.T + bo for h, a in zip(hs, attn_out)]
        x_mlp = [_rms(h, mlp_norm, spec.rms_norm_eps) for h in hs]
        acts = []
        for x in x_mlp:
            g = x @ wg.T
            acts.append(g / (1 + np.exp(-g)) * (x @ wu.T))
        hs = [h + a @ wd.T for h, a in zip(hs, acts)]

        def sample(parts):
            return np.concatenate(parts)[pick]
        s_qkv, a_qkv = _search(sample(x_attn), np.concatenate([wq, wk, wv]), bits, block_size)
        s_gu, a_gu = _search(sample(x_mlp), np.concatenate([wg, wu]), bits, block_size)
        s_down, a_down = _search(sample(acts), wd, bits, block_size)
        layers.append({"qkv": s_qkv, "gate_up": s_gu, "down": s_down})
        alphas.append({"qkv": a_qkv, "gate_up": a_gu, "down": a_down})
        if progress:
            progress(i + 1, spec.num_layers)
    return AWQScales(tuple(layers), tuple(alphas), total)


def _freq_factors(reader):
    return reader.tensor("rope_freqs.weight") if reader.has("rope_freqs.weight") else None


class ScaledReader:
    """A WeightReader whose weights carry the AWQ scales (and the norms/up rows their inverses).

    It offers no raw GGUF blocks: scaled weights must be quantized afresh.
    """

    def __init__(self, reader, scales: AWQScales):
        self.reader, self.scales, self.spec = reader, scales, reader.spec

    def __getattr__(self, name):  # tokenizer, fingerprint, close, ... pass through (but not raw)
        if name == "raw":
            raise AttributeError(name)
        return getattr(self.reader, name)

    def has(self, canonical: str, layer: int | None = None) -> bool:
        return self.reader.has(canonical, layer)

    def tensor(self, canonical: str, layer: int | None = None) -> np.ndarray:
        t = self.reader.tensor(canonical, layer)
        if layer is None:
            return t
        s = self.scales.layers[layer]
        part = canonical.split(".")[-2]
        kind = canonical.split(".")[-1]
        if part == "attn_norm":
            return t / s["qkv"]
        if part == "mlp_norm":
            return t / s["gate_up"]
        if kind != "weight":
            return t
        if part in ("q", "k", "v"):
            return t * s["qkv"][None, :]
        if part == "gate":
            return t * s["gate_up"][None, :]
        if part == "up":
            return t * s["gate_up"][None, :] / s["down"][:, None]
        if part == "down":
            return t * s["down"][None, :]
        return t
