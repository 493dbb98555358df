"""``ModelSpec``: everything edgekit needs to know about a decoder, read from config.json or GGUF metadata.

One frozen object, built without loading a single weight; derived sizes (parameter count, KV bytes per
token, the largest single tensor) are computed once from it. The exporter, the planner and the manifest
all take a ModelSpec, so they cannot disagree about the model.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from .architectures import Architecture, lookup
from .errors import ModelFormatError
from .runtime.dtypes import DTYPE_BYTES


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

    @classmethod
    def from_config(cls, config: dict[str, Any], *, name: str = "") -> ModelSpec:
        """Build a spec from a Hugging Face config.json dictionary."""
        archs = config.get("architectures")
        if not isinstance(archs, list) or not archs or not isinstance(archs[0], str):
            raise ModelFormatError(
                f"config.json of {name or 'the model'} has no 'architectures' list: "
                "it must name the model class, e.g. \"architectures\": [\"Qwen2ForCausalLM\"]")
        arch = lookup(archs[0])
        try:
            return _spec_from_config(arch, config, name)
        except (KeyError, TypeError, ValueError) as e:
            raise ModelFormatError(
                f"config.json of {name or 'the model'} is missing or has a malformed field ({e}): "
                "re-download the model's config.json") from None

    @classmethod
    def from_config_file(cls, path: Path) -> ModelSpec:
        try:
            config = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as e:
            raise ModelFormatError(f"cannot read {path}: {e}") from None
        except json.JSONDecodeError as e:
            raise ModelFormatError(
                f"{path} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}): "
                "re-download the model's config.json") from None
        if not isinstance(config, dict):
            raise ModelFormatError(f"{path} is not a JSON object: re-download the model's config.json")
        return cls.from_config(config, name=Path(path).parent.name)


def _rope_settings(config: dict[str, Any]) -> tuple[float, RopeScaling | None]:
    """Rope theta and scaling from either place transformers keeps them.

    transformers 5 writes ``rope_parameters`` (with rope_theta inside); older configs have top-level
    ``rope_theta`` and ``rope_scaling``. Reading only one silently changes the model.
    """
    params = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling") or {}
    theta = config.get("rope_theta", params.get("rope_theta", 10000.0))
    merged = {**params, **scaling}
    kind = merged.get("rope_type", merged.get("type", "default"))
    if kind in (None, "default"):
        return float(theta), None
    if kind == "llama3":
        return float(theta), RopeScaling(
            kind="llama3",
            factor=float(merged["factor"]),
            low_freq_factor=float(merged["low_freq_factor"]),
            high_freq_factor=float(merged["high_freq_factor"]),
            original_max_position=int(merged["original_max_position_embeddings"]),
        )
    raise ModelFormatError(f"unsupported rope scaling {kind!r}: edgekit supports default and llama3 rotary scaling")


_DTYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}


def _spec_from_config(arch: Architecture, c: dict[str, Any], name: str) -> ModelSpec:
    heads = int(c["num_attention_heads"])
    hidden = int(c["hidden_size"])
    theta, scaling = _rope_settings(c)
    eos = c.get("eos_token_id")
    eos_ids = tuple(int(e) for e in eos) if isinstance(eos, list) else ((int(eos),) if eos is not None else ())
    head_dim = int(c.get("head_dim") or hidden // heads)
    if hidden % heads and not c.get("head_dim"):
        raise ValueError("hidden_size is not a multiple of num_attention_heads")
    qkv_bias = arch.qkv_bias or bool(c.get("attention_bias", False))
    spec = ModelSpec(
        architecture=arch.name,
        family=arch.family,
        vocab_size=int(c["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(c["intermediate_size"]),
        num_layers=int(c["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(c.get("num_key_value_heads") or heads),
        head_dim=head_dim,
        rms_norm_eps=float(c.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        max_position_embeddings=int(c.get("max_position_embeddings", 4096)),
        tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
        qkv_bias=qkv_bias,
        o_bias=arch.family == "llama" and bool(c.get("attention_bias", False)),
        rope_scaling=scaling,
        bos_token_id=c.get("bos_token_id"),
        eos_token_ids=eos_ids,
        source_dtype=_DTYPES.get(str(c.get("torch_dtype") or c.get("dtype") or "float32"), "fp32"),
        name=name,
    )
    _check(spec)
    return spec


def _check(spec: ModelSpec) -> None:
    if min(spec.vocab_size, spec.hidden_size, spec.intermediate_size, spec.num_layers, spec.num_heads,
           spec.num_kv_heads, spec.head_dim) <= 0:
        raise ValueError("sizes must be positive")
    if spec.num_heads % spec.num_kv_heads:
        raise ValueError(f"num_attention_heads {spec.num_heads} is not a multiple of "
                         f"num_key_value_heads {spec.num_kv_heads}")
    if spec.head_dim % 2:
        raise ValueError(f"head_dim {spec.head_dim} is odd; rotary embeddings need an even head_dim")
    if not math.isfinite(spec.rope_theta) or spec.rope_theta <= 0:
        raise ValueError("rope_theta must be positive")


def spec_from_fields(**fields: Any) -> ModelSpec:
    """Validated construction for other readers (GGUF)."""
    try:
        spec = ModelSpec(**fields)
        _check(spec)
    except (TypeError, ValueError) as e:
        raise ModelFormatError(f"model metadata of {fields.get('name') or 'the model'} is malformed ({e})") from None
    return spec
