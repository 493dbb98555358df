"""The ModelSpec of a GGUF file, from its metadata and tensor table, and every check that can fail before a
build reads a weight (missing keys or tensors, wrong shapes, unsupported types, tokenizer and template).

Used by :func:`spec_from_gguf` (``edgekit plan``: no weight is read) and by :class:`~edgekit.sources.gguf.GGUFReader`.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from ..architectures import GGUF_WEIGHT_NAMES, Architecture, layer_name, lookup_gguf, required_weight_shapes
from ..errors import ModelFormatError, UnsupportedQuantType
from ..spec import ModelSpec, spec_from_fields
from . import gguf_tokenizer
from .gguf_header import FILE_TYPES, SUPPORTED_QUANT_TYPES, GGUFHeader, LazyArray, TensorInfo, read_header
from .gguf_header import FIX as _FIX
from .gguf_header import MAGIC as _MAGIC


def spec_from_gguf(path: str | Path) -> ModelSpec:
    """The ModelSpec of a GGUF file, from its metadata and tensor table only (no weight is read).

    Raises ModelFormatError (not a GGUF, truncated, missing metadata or tensors), UnsupportedArchitecture
    or UnsupportedQuantType, each one line naming the file.
    """
    path = Path(path)
    return inspect_header(open_header(path), path)[0]


def open_header(path: Path) -> GGUFHeader:
    """The file's parsed header, or a one-line ModelFormatError saying what is wrong with it."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as e:
        raise ModelFormatError(f"cannot read {path}: {e.strerror or e}") from None
    if size == 0:
        raise ModelFormatError(f"{path} is empty: {_FIX}")
    if head != _MAGIC:
        if len(head) < 4 and _MAGIC.startswith(head):
            raise ModelFormatError(f"{path} is truncated ({size} bytes, not even a GGUF header): {_FIX}")
        raise ModelFormatError(
            f"{path} is not a GGUF file (it starts with {head!r}, not b'GGUF'): give a .gguf model file "
            "or a Hugging Face model folder")
    # read_header checks that every tensor's data lies inside the file.
    return read_header(path)


def _value(header: GGUFHeader, key: str) -> Any:
    return header.value(key)


def unsupported_type(t: TensorInfo, path: Path) -> UnsupportedQuantType:
    return UnsupportedQuantType(
        f"tensor {t.name!r} of {path.name} is stored as {t.type_name}, which edgekit cannot dequantize: "
        f"supported are {', '.join(SUPPORTED_QUANT_TYPES)}; requantize the model with llama.cpp (e.g. Q8_0 "
        "or Q4_K_M)")


def check_type(t: TensorInfo, path: Path) -> None:
    if t.type_name not in SUPPORTED_QUANT_TYPES:
        raise unsupported_type(t, path)


def _required(gg: GGUFHeader, key: str, path: Path, kind: type) -> Any:
    value = _value(gg, key)
    if isinstance(value, LazyArray):
        raise ModelFormatError(f"{path.name}: metadata key {key!r} is an array of {len(value)} entries, not a "
                               f"{kind.__name__}; {_FIX}")
    if value is None:
        raise ModelFormatError(f"{path.name} has no metadata key {key!r}: it is not a complete model file; {_FIX}")
    if kind is str and isinstance(value, str):
        return value
    if kind in (int, float) and isinstance(value, (int, float)) and not isinstance(value, bool):
        return kind(value)
    raise ModelFormatError(f"{path.name}: metadata key {key!r} is {value!r}, not a {kind.__name__}; {_FIX}")


def _optional(gg: GGUFHeader, key: str, path: Path, kind: type, default: Any = None) -> Any:
    return default if _value(gg, key) is None else _required(gg, key, path, kind)


def _source_dtype(gg: GGUFHeader) -> str:
    """The file's weight type in lower case: "fp32", "fp16", "bf16", or a llama.cpp file type ("q4_1", "q4_k_m")."""
    file_type = _value(gg, "general.file_type")
    name = FILE_TYPES.get(file_type) if type(file_type) is int else None
    if name is None:
        # No (or an unknown) file type: the type most 2-D tensors have.
        kinds = Counter(t.type_name for t in gg.tensors if len(t.dims) == 2)
        name = kinds.most_common(1)[0][0].lower() if kinds else "f32"
    return {"f32": "fp32", "f16": "fp16"}.get(name, name)


def inspect_header(gg: GGUFHeader, path: Path) -> tuple[ModelSpec, Architecture]:
    """The spec from metadata, after checking the tensors the exporter needs exist with the right shapes."""
    arch = lookup_gguf(_required(gg, "general.architecture", path, str))
    a = arch.gguf_name
    hidden = _required(gg, f"{a}.embedding_length", path, int)
    heads, head_dim = _heads(gg, a, path, hidden)
    names = {t.name for t in gg.tensors}
    vocab = _vocab_size(gg, a, path)
    extras = _extras(gg, a, path, names)
    eos_ids = [_optional(gg, f"tokenizer.ggml.{k}_token_id", path, int) for k in ("eos", "eot", "eom")]
    spec = spec_from_fields(
        architecture=arch.name,
        family=arch.family,
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=_required(gg, f"{a}.feed_forward_length", path, int),
        num_layers=_required(gg, f"{a}.block_count", path, int),
        num_heads=heads,
        num_kv_heads=_optional(gg, f"{a}.attention.head_count_kv", path, int, heads),
        head_dim=head_dim,
        rms_norm_eps=_required(gg, f"{a}.attention.layer_norm_rms_epsilon", path, float),
        # llama.cpp's default when the key is absent.
        rope_theta=_optional(gg, f"{a}.rope.freq_base", path, float, 10000.0),
        max_position_embeddings=_required(gg, f"{a}.context_length", path, int),
        tie_word_embeddings="output.weight" not in names,
        qkv_bias="blk.0.attn_q.bias" in names,
        o_bias="blk.0.attn_output.bias" in names,
        rope_scaling=None,
        bos_token_id=_optional(gg, "tokenizer.ggml.bos_token_id", path, int),
        eos_token_ids=tuple(dict.fromkeys(i for i in eos_ids if i is not None)),
        source_dtype=_source_dtype(gg),
        name=_display_name(gg) or path.stem,
        extras=tuple(extras),
    )
    _check_tensors(gg, spec, path)
    _check_tokenizer_and_template(gg, path)
    return spec, arch


def _heads(gg: GGUFHeader, a: str, path: Path, hidden: int) -> tuple[int, int]:
    """(head count, head size), checked against the other sizes the metadata gives."""
    heads = _required(gg, f"{a}.attention.head_count", path, int)
    if heads <= 0:
        raise ModelFormatError(f"{path.name}: {a}.attention.head_count is {heads}; {_FIX}")
    if _optional(gg, f"{a}.attention.key_length", path, int) is None and hidden % heads:
        raise ModelFormatError(
            f"{path.name}: embedding_length {hidden} is not a multiple of head_count {heads} and no "
            f"{a}.attention.key_length gives the head size; {_FIX}")
    head_dim = _optional(gg, f"{a}.attention.key_length", path, int, hidden // heads)
    for key in (f"{a}.attention.value_length", f"{a}.rope.dimension_count"):
        other = _optional(gg, key, path, int)
        if other is not None and other != head_dim:
            raise ModelFormatError(
                f"{path.name}: {key} is {other} but the head size is {head_dim}: edgekit builds models whose "
                "rotary and value size equal the head size")
    return heads, head_dim


def _vocab_size(gg: GGUFHeader, a: str, path: Path) -> int:
    tokens = gg.value("tokenizer.ggml.tokens")
    vocab = _optional(gg, f"{a}.vocab_size", path, int, len(tokens) if isinstance(tokens, LazyArray) else None)
    if vocab is None:
        raise ModelFormatError(
            f"{path.name} has neither {a}.vocab_size nor tokenizer.ggml.tokens: its vocabulary size is "
            f"unknown; {_FIX}")
    return vocab


def _extras(gg: GGUFHeader, a: str, path: Path, names: set[str]) -> list[tuple[str, Any]]:
    """The spec's extras: Llama-3's rotary divisors (module docstring of :mod:`.gguf`) and the tensor types."""
    extras: list[tuple[str, Any]] = []
    scaling = _optional(gg, f"{a}.rope.scaling.type", path, str, "none")
    if "rope_freqs.weight" in names:
        t = next(t for t in gg.tensors if t.name == "rope_freqs.weight")
        check_type(t, path)
        extras.append(("rope_freqs", tuple(float(x) for x in _read_small(path, t).reshape(-1))))
    elif scaling not in ("none", ""):
        raise ModelFormatError(
            f"{path.name} uses {scaling!r} rotary scaling: edgekit supports default and llama3 rotary scaling")
    # The real tensor-type mix (Q4_K_M files mix Q4_K, Q6_K and F32): the planner sizes each tensor by it.
    extras.append(("tensor_types", tuple((t.name, t.type_name) for t in gg.tensors)))
    # the ggml backend runs the file as stored: its weights are exactly these bytes
    extras.append(("tensor_bytes", tuple((t.name, t.n_bytes) for t in gg.tensors)))
    return extras


def _check_tokenizer_and_template(gg: GGUFHeader, path: Path) -> None:
    """What the bundle will need from the file's tokenizer and template, checked before any build work."""
    scalars = {k: v for k, v in gg.fields.items() if k.startswith("tokenizer.") and not isinstance(v, LazyArray)}
    gguf_tokenizer.check_supported(scalars, path.name)
    template = gg.value("tokenizer.chat_template")
    if isinstance(template, str) and template:
        from .gguf_template import check_template

        check_template(template, path.name)


def _display_name(gg: GGUFHeader) -> str | None:
    """"DeepSeek-R1-Distill-Qwen-7B" from general.basename + general.size_label (as llama.cpp names files);
    general.name is a prettified title ("Smollm2 135M 8k Lc100K Mix1 Ep2") used only without them."""
    parts = [gg.value(k) for k in ("general.basename", "general.size_label")]
    if all(isinstance(p, str) and p.strip() for p in parts):
        return "-".join(p.strip() for p in parts)
    name = gg.value("general.name")
    return name if isinstance(name, str) and name.strip() else None


def _read_small(path: Path, t: TensorInfo) -> np.ndarray:
    """A small tensor (rope_freqs) as float32, read without mapping the file."""
    try:
        with open(path, "rb") as f:
            f.seek(t.offset)
            data = np.frombuffer(f.read(t.n_bytes), dtype=np.uint8)
    except OSError as e:
        raise ModelFormatError(f"cannot read {path}: {e.strerror or e}") from None
    if t.type_name in ("F32", "F16"):   # what converters write; no gguf import needed
        return data.view("<f4" if t.type_name == "F32" else "<f2").astype(np.float32)
    from gguf.constants import GGMLQuantizationType
    from gguf.quants import dequantize

    return np.asarray(dequantize(data.reshape(*t.shape[:-1], -1), GGMLQuantizationType(t.type_id)), np.float32)


def _check_tensors(gg: GGUFHeader, spec: ModelSpec, path: Path) -> None:
    tensors = {t.name: t for t in gg.tensors}
    for canonical, shape in required_weight_shapes(spec).items():
        for layer in range(spec.num_layers) if "{i}" in canonical else (None,):
            name = layer_name(GGUF_WEIGHT_NAMES, canonical, layer)
            t = tensors.get(name)
            if t is None:
                raise ModelFormatError(f"{path.name} has no tensor {name!r}: the GGUF is incomplete; {_FIX}")
            if t.shape != shape:
                raise ModelFormatError(
                    f"{path.name}: tensor {name!r} has shape {t.shape} but the metadata implies {shape}; "
                    f"{_FIX}")
            check_type(t, path)
