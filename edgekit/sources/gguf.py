"""Read a GGUF file (llama.cpp's format): the ModelSpec from its metadata (:mod:`.gguf_spec`), its weights as
float32 in Hugging Face orientation, its tokenizer, chat template and special tokens.

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
from pathlib import Path
from typing import Any

import numpy as np

from ..architectures import GGUF_WEIGHT_NAMES, layer_name
from ..errors import ModelFormatError
from . import gguf_tokenizer
from .gguf_header import FIX as _FIX
from .gguf_header import SUPPORTED_QUANT_TYPES, GGUFHeader, TensorInfo, read_header
from .gguf_spec import check_type, inspect_header, open_header, spec_from_gguf, unsupported_type

__all__ = ["SUPPORTED_QUANT_TYPES", "GGUFHeader", "GGUFReader", "TensorInfo", "read_header", "spec_from_gguf",
           "unpermute_qk"]

_LAYER_NAME = re.compile(r"^layers\.(\d+)\.(.+)$")


class GGUFReader:
    """The :class:`~edgekit.sources.WeightReader` of one GGUF file.

    ``tensor(canonical, layer)`` returns a new float32 array per call; ``raw`` returns the stored blocks
    without dequantizing. Both undo llama.cpp's q/k row permutation for Llama.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.header = open_header(self.path)
        self.spec, self.arch = inspect_header(self.header, self.path)
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
        check_type(t, self.path)
        try:
            values = dequantize(self._rows(t), GGMLQuantizationType(t.type_id))
        except NotImplementedError:
            raise unsupported_type(t, self.path) from None
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
        check_type(t, self.path)
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
