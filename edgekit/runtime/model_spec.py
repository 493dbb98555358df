"""``ModelSpec``: everything edgekit needs to know about a decoder, as a bundle's manifest records it.

One frozen object, built without loading a single weight; derived sizes (parameter count, KV bytes per
token, the largest single tensor) are computed once from it. The exporter, the planner and the manifest
all take a ModelSpec, so they cannot disagree about the model. Reading one from a model's config.json or
GGUF metadata is the build side's (:mod:`edgekit.spec`); the runtime reads it from the manifest
(:meth:`ModelSpec.from_dict`). Standard library only.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from functools import cached_property
from typing import Any

from .dtypes import DTYPE_BYTES


@dataclass(frozen=True)
class RopeScaling:
    """Rotary-frequency scaling. Only Llama-3's scheme is used by the supported models."""

    kind: str                             # "llama3"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 1.0
    original_max_position: int = 8192


@dataclass(frozen=True)
class ModelSpec:
    architecture: str
    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool = False
    rope_scaling: RopeScaling | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    source_dtype: str = "fp32"
    name: str = ""
    # Extra keys of a GGUF that the exporter needs (e.g. a rope_freqs tensor); not part of identity.
    extras: tuple[tuple[str, Any], ...] = field(default=(), compare=False)

    # ----- derived sizes, computed once ----------------------------------------------------------
    @cached_property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @cached_property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @cached_property
    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(out_features, in_features) of each linear layer in one decoder layer."""
        h, i = self.hidden_size, self.intermediate_size
        return {"q": (self.q_size, h), "k": (self.kv_size, h), "v": (self.kv_size, h), "o": (h, self.q_size),
                "gate": (i, h), "up": (i, h), "down": (h, i)}

    @cached_property
    def linear_params_per_layer(self) -> int:
        return sum(o * i for o, i in self.linear_shapes.values())

    @cached_property
    def small_params_per_layer(self) -> int:
        """Norm weights and biases: kept in full precision whatever the weight precision."""
        bias = (self.q_size + 2 * self.kv_size) if self.qkv_bias else 0
        bias += self.hidden_size if self.o_bias else 0
        return 2 * self.hidden_size + bias

    @cached_property
    def embed_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @cached_property
    def lm_head_params(self) -> int:
        return 0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size

    @cached_property
    def parameters(self) -> int:
        """Exact parameter count, as ``sum(p.numel() for p in model.parameters())`` reports it."""
        per_layer = self.linear_params_per_layer + self.small_params_per_layer
        return self.num_layers * per_layer + self.embed_params + self.lm_head_params + self.hidden_size

    def kv_bytes_per_token(self, dtype: str = "fp16") -> int:
        """K and V of every layer for one token."""
        return 2 * self.num_layers * self.kv_size * DTYPE_BYTES[dtype]

    # ----- (de)serialisation ---------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("extras")
        d["eos_token_ids"] = list(self.eos_token_ids)
        d["parameters"] = self.parameters
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelSpec:
        """Inverse of :meth:`to_dict` (a manifest's ``model`` entry)."""
        d = {k: v for k, v in d.items() if k != "parameters"}
        rs = d.pop("rope_scaling", None)
        d["eos_token_ids"] = tuple(d.get("eos_token_ids", ()))
        return cls(**d, rope_scaling=RopeScaling(**rs) if rs else None)
