"""Reading a ``ModelSpec`` from a model: a Hugging Face config.json (or its dictionary) or GGUF metadata fields.

The spec itself (fields, derived sizes, the manifest's ``model`` section) is
:class:`edgekit.runtime.model_spec.ModelSpec`, which the on-device runtime reads without this module.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from .architectures import Architecture, lookup
from .errors import ModelFormatError
from .runtime.model_spec import ModelSpec, RopeScaling


def spec_from_config(config: dict[str, Any], *, name: str = "") -> ModelSpec:
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


def spec_from_config_file(path: Path) -> ModelSpec:
    """Build a spec from a config.json file (named after its folder)."""
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
    return spec_from_config(config, name=Path(path).parent.name)


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
