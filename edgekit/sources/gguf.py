"""Read a GGUF file (llama.cpp's format): the ModelSpec from its metadata, its weights as float32 in Hugging
Face orientation, its tokenizer, chat template and special tokens.

Build-time only. The header is parsed by :mod:`.gguf_header` (arrays such as the vocabulary stay unread until a
tokenizer is written); weights are read through a memory map of the file and dequantized with gguf.quants.
Three things make a GGUF differ from the Hugging Face checkpoint it was converted from, and are undone here:

* dimensions are stored innermost first; reversed, they give (out_features, in_features), the Hugging Face
  orientation, so the row-major bytes need no transpose;
* llama.cpp's converter permutes the rows of q and k of Llama models (to its interleaved rotary layout);
  :meth:`GGUFReader.tensor` and :meth:`GGUFReader.raw` permute them back (``Architecture.gguf_permutes_qk``);
* Llama-3 rotary scaling is not stored as ``rope_scaling`` settings but as a ``rope_freqs.weight`` tensor of
  per-frequency divisors. The spec keeps ``rope_scaling=None`` and records the divisors in
  ``spec.extras`` as ``("rope_freqs", (f0, f1, ...))`` (head_dim / 2 floats); the exporter passes them to
  ``edgekit.export.rope`` as ``freq_factors``. The same tensor is also readable as "rope_freqs.weight".
"""

from __future__ import annotations

import hashlib
import re
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

__all__ = ["SUPPORTED_QUANT_TYPES", "GGUFHeader", "GGUFReader", "TensorInfo", "read_header", "spec_from_gguf",
           "unpermute_qk"]

_LAYER_NAME = re.compile(r"^layers\.(\d+)\.(.+)$")


def spec_from_gguf(path: str | Path) -> ModelSpec:
    """The ModelSpec of a GGUF file, from its metadata and tensor table only (no weight is read).

    Raises ModelFormatError (not a GGUF, truncated, missing metadata or tensors), UnsupportedArchitecture
    or UnsupportedQuantType, each one line naming the file.
    """
    path = Path(path)
    return _inspect(_open(path), path)[0]


class GGUFReader:
    """The :class:`~edgekit.sources.WeightReader` of one GGUF file.

    ``tensor(canonical, layer)`` returns a new float32 array per call; ``raw`` returns the stored blocks
    without dequantizing. Both undo llama.cpp's q/k row permutation for Llama.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.header = _open(self.path)
        self.spec, self.arch = _inspect(self.header, self.path)
        self._tensors: dict[str, TensorInfo] | None = {t.name: t for t in self.header.tensors}
        self._map: np.memmap | None = None     # the whole file, mapped at the first weight read
        self._meta: dict[str, Any] | None = None
        self._tokenizer: str | None = None
        self._fingerprint: str | None = None

    # ----- weights -------------------------------------------------------------------------------
    def has(self, canonical: str, layer: int | None = None) -> bool:
        return self._name(canonical, layer)[1] in self._live_tensors()

    def tensor(self, canonical: str, layer: int | None = None) -> np.ndarray:
        """float32, (out_features, in_features) for linear weights, a fresh writable array."""
        from gguf.constants import GGMLQuantizationType
        from gguf.quants import dequantize

        template, name = self._name(canonical, layer)
        t = self._get(name)
        _check_type(t, self.path)
        try:
            values = dequantize(self._rows(t), GGMLQuantizationType(t.type_id))
        except NotImplementedError:
            raise _unsupported(t, self.path) from None
        # An F32 tensor comes back as a view of the file: copy it so callers own what they get.
        values = np.array(values, dtype=np.float32, copy=True).reshape(t.shape)
        return self._unpermute(template, values)

    def raw(self, canonical: str, layer: int | None = None) -> tuple[str, np.ndarray, tuple[int, ...]]:
        """``(qtype_name, blocks, shape)``: the stored bytes of a tensor, not dequantized.

        ``shape`` is the logical Hugging Face shape, e.g. (out_features, in_features); ``blocks`` is uint8 of
        shape ``shape[:-1] + (shape[-1] // block_size, type_size)`` (block_size 1 for F32/F16/BF16, whose
        type_size is the element size), rows already in Hugging Face order. Read-only; it may be a view of
        the memory-mapped file.
        """
        template, name = self._name(canonical, layer)
        t = self._get(name)
        _check_type(t, self.path)
        shape = t.shape
        # (..., in_features // block_size, type_size) uint8
        blocks = self._rows(t).reshape(*shape[:-1], shape[-1] // t.block_size, t.type_size)
        blocks = self._unpermute(template, blocks)
        blocks.flags.writeable = False
        return t.type_name, blocks, shape

    def tensor_info(self, canonical: str, layer: int | None = None) -> TensorInfo:
        """The stored type, shape, offset and byte count of a tensor (nothing is read)."""
        return self._get(self._name(canonical, layer)[1])

    def tensor_names(self) -> list[str]:
        """The GGUF names of all tensors in the file, in file order."""
        return list(self._live_tensors())

    # ----- tokenizer -----------------------------------------------------------------------------
    def tokenizer_json(self) -> str:
        if self._tokenizer is None:
            self._tokenizer = gguf_tokenizer.tokenizer_json(self._tokenizer_meta(), self.path.name)
        return self._tokenizer

    def chat_template(self) -> str | None:
        template = self.header.value("tokenizer.chat_template")
        return template if isinstance(template, str) and template else None

    def special_tokens(self) -> dict[str, Any]:
        return gguf_tokenizer.special_tokens(self._tokenizer_meta(), self.path.name)

    # ----- identity and lifetime -----------------------------------------------------------------
    def fingerprint(self) -> str:
        """sha256 of the file's bytes (read in chunks; computed once)."""
        if self._fingerprint is None:
            digest = hashlib.sha256()
            try:
                with open(self.path, "rb") as f:
                    while chunk := f.read(8 << 20):
                        digest.update(chunk)
            except OSError as e:
                raise ModelFormatError(f"cannot read {self.path}: {e.strerror or e}") from None
            self._fingerprint = digest.hexdigest()
        return self._fingerprint

    def drop_pages(self) -> None:
        """Let go of the file pages read so far (they stay in the page cache; a later read faults them back
        in). The exporter calls this after each layer, so a build's resident memory is one layer of the file,
        not all of it (a 43 GB Llama-70B file would otherwise count in full)."""
        import mmap

        handle = getattr(self._map, "_mmap", None)
        if handle is not None and hasattr(mmap, "MADV_DONTNEED"):
            handle.madvise(mmap.MADV_DONTNEED)

    def close(self) -> None:
        """Drop the memory map (arrays already returned stay valid)."""
        self._map = None
        self._tensors = None

    def __enter__(self) -> GGUFReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----- internals -----------------------------------------------------------------------------
    def _live_tensors(self) -> dict[str, TensorInfo]:
        if self._tensors is None:
            raise ValueError(f"the GGUF reader of {self.path} is closed")
        return self._tensors

    def _rows(self, t: TensorInfo) -> np.ndarray:
        """The tensor's bytes as a read-only view of the file, (..., bytes per row) uint8."""
        self._live_tensors()
        if self._map is None:
            self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        row_bytes = t.dims[0] // t.block_size * t.type_size
        return self._map[t.offset:t.offset + t.n_bytes].reshape(*t.shape[:-1], row_bytes)

    def _name(self, canonical: str, layer: int | None) -> tuple[str, str]:
        """(canonical template, GGUF name); accepts "layers.{i}.q.weight" + layer or "layers.3.q.weight"."""
        m = _LAYER_NAME.match(canonical)
        if m and layer is None:
            canonical, layer = f"layers.{{i}}.{m.group(2)}", int(m.group(1))
        return canonical, layer_name(GGUF_WEIGHT_NAMES, canonical, layer)

    def _get(self, name: str) -> TensorInfo:
        t = self._live_tensors().get(name)
        if t is None:
            raise ModelFormatError(f"{self.path.name} has no tensor {name!r}: the GGUF is incomplete; {_FIX}")
        return t

    def _unpermute(self, template: str, values: np.ndarray) -> np.ndarray:
        if not self.arch.gguf_permutes_qk or template not in ("layers.{i}.q.weight", "layers.{i}.q.bias",
                                                              "layers.{i}.k.weight", "layers.{i}.k.bias"):
            return values
        heads = self.spec.num_heads if ".q." in template else self.spec.num_kv_heads
        return unpermute_qk(values, heads)

    def _tokenizer_meta(self) -> dict[str, Any]:
        """The tokenizer.* metadata with its arrays read (the vocabulary: parsed once, on first use)."""
        if self._meta is None:
            self._live_tensors()
            self._meta = {k: self.header.array(k) for k in self.header.fields if k.startswith("tokenizer.")}
        return self._meta


def unpermute_qk(values: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's Llama q/k row permutation (works on weights, biases and raw block arrays).

    Within each head llama.cpp stores rotary pairs interleaved, row (head, i, half) at position
    head*dim + 2*i + half; Hugging Face keeps the two halves apart, row head*dim + half*(dim/2) + i.
    """
    rows = values.shape[0]
    # (heads, dim / 2, 2, ...) -> (heads, 2, dim / 2, ...)
    grouped = values.reshape(heads, rows // heads // 2, 2, *values.shape[1:])
    return np.ascontiguousarray(grouped.swapaxes(1, 2)).reshape(values.shape)


# ----- opening and validating ----------------------------------------------------------------------
def _open(path: Path) -> GGUFHeader:
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


def _unsupported(t: TensorInfo, path: Path) -> UnsupportedQuantType:
    return UnsupportedQuantType(
        f"tensor {t.name!r} of {path.name} is stored as {t.type_name}, which edgekit cannot dequantize: "
        f"supported are {', '.join(SUPPORTED_QUANT_TYPES)}; requantize the model with llama.cpp (e.g. Q8_0 "
        "or Q4_K_M)")


def _check_type(t: TensorInfo, path: Path) -> None:
    if t.type_name not in SUPPORTED_QUANT_TYPES:
        raise _unsupported(t, path)


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


def _inspect(gg: GGUFHeader, path: Path) -> tuple[ModelSpec, Architecture]:
    """The spec from metadata, after checking the tensors the exporter needs exist with the right shapes."""
    arch = lookup_gguf(_required(gg, "general.architecture", path, str))
    a = arch.gguf_name
    hidden = _required(gg, f"{a}.embedding_length", path, int)
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
    names = {t.name for t in gg.tensors}
    tokens = gg.value("tokenizer.ggml.tokens")
    vocab = _optional(gg, f"{a}.vocab_size", path, int, len(tokens) if isinstance(tokens, LazyArray) else None)
    if vocab is None:
        raise ModelFormatError(
            f"{path.name} has neither {a}.vocab_size nor tokenizer.ggml.tokens: its vocabulary size is "
            f"unknown; {_FIX}")
    extras: list[tuple[str, Any]] = []
    scaling = _optional(gg, f"{a}.rope.scaling.type", path, str, "none")
    if "rope_freqs.weight" in names:
        t = next(t for t in gg.tensors if t.name == "rope_freqs.weight")
        _check_type(t, path)
        extras.append(("rope_freqs", tuple(float(x) for x in _read_small(path, t).reshape(-1))))
    elif scaling not in ("none", ""):
        raise ModelFormatError(
            f"{path.name} uses {scaling!r} rotary scaling: edgekit supports default and llama3 rotary scaling")
    # The real tensor-type mix (Q4_K_M files mix Q4_K, Q6_K and F32): the planner sizes each tensor by it.
    extras.append(("tensor_types", tuple((t.name, t.type_name) for t in gg.tensors)))
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
            _check_type(t, path)
