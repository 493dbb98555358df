"""The header of a GGUF file (versions 2 and 3), parsed without materialising its big arrays.

A GGUF starts with ``b"GGUF"``, a uint32 version, uint64 tensor and key/value counts, the typed key/value
metadata, and one info record per tensor (name, dimensions innermost first, ggml type, offset into the data
region); the data region starts at the next multiple of ``general.alignment`` (32 by default). Everything is
little-endian.

``gguf.GGUFReader`` turns every array element into its own numpy view: for the 152k-entry token and merge
arrays of a Qwen2 vocabulary that takes ~10 s and ~500 MB. Here the header is walked once with
``struct.unpack_from`` over a memory map; scalars are decoded, arrays are recorded as :class:`LazyArray`
(element type, count, byte range), a string array is skipped by its length prefixes only. :meth:`GGUFHeader.array`
reads one array when it is needed (the vocabulary, when a tokenizer is written).

Every malformed input is a one-line ModelFormatError (or UnsupportedQuantType for an unknown ggml type id)
naming the file and the part that is wrong; nothing trusts a count or length before checking it against the
bytes the file has.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ModelFormatError, UnsupportedQuantType

# The ggml types edgekit dequantizes (all through gguf.quants). Others in the format (Q8_1, Q8_K, the
# integer types) are intermediate or non-weight types a model file does not use for its weights.
SUPPORTED_QUANT_TYPES = (
    "F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
    "IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ4_NL", "IQ4_XS", "TQ1_0", "TQ2_0",
)
# ggml tensor types (ggml.h's ggml_type; gguf.constants.GGML_QUANT_SIZES has the same figures, a test checks):
# id -> (name, values per block, bytes per block). Kept here so reading a header needs no gguf import.
GGML_TYPES = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 40), 10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210), 15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74), 18: ("IQ3_XXS", 256, 98), 19: ("IQ1_S", 256, 50),
    20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110), 22: ("IQ2_S", 256, 82), 23: ("IQ4_XS", 256, 136),
    24: ("I8", 1, 1), 25: ("I16", 1, 2), 26: ("I32", 1, 4), 27: ("I64", 1, 8), 28: ("F64", 1, 8),
    29: ("IQ1_M", 256, 56), 30: ("BF16", 1, 2), 34: ("TQ1_0", 256, 54), 35: ("TQ2_0", 256, 66),
    39: ("MXFP4", 32, 17), 40: ("NVFP4", 64, 36), 41: ("Q1_0", 128, 18),
}
# general.file_type (llama.cpp's llama_ftype, gguf.constants.LlamaFileType) -> the name edgekit reports.
FILE_TYPES = {
    0: "fp32", 1: "fp16", 2: "q4_0", 3: "q4_1", 7: "q8_0", 8: "q5_0", 9: "q5_1", 10: "q2_k", 11: "q3_k_s",
    12: "q3_k_m", 13: "q3_k_l", 14: "q4_k_s", 15: "q4_k_m", 16: "q5_k_s", 17: "q5_k_m", 18: "q6_k",
    19: "iq2_xxs", 20: "iq2_xs", 21: "q2_k_s", 22: "iq3_xs", 23: "iq3_xxs", 24: "iq1_s", 25: "iq4_nl",
    26: "iq3_s", 27: "iq3_m", 28: "iq2_s", 29: "iq2_m", 30: "iq4_xs", 31: "iq1_m", 32: "bf16", 36: "tq1_0",
    37: "tq2_0", 38: "mxfp4_moe", 39: "nvfp4", 40: "q1_0",
}
MAGIC = b"GGUF"
VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4   # GGML_MAX_DIMS: llama.cpp refuses tensors with more
FIX = "re-download the file, or re-convert it with llama.cpp's convert_hf_to_gguf.py"

# GGUF value types (gguf_type in ggml's gguf.h): id -> struct format of a scalar.
STRING, ARRAY = 8, 9
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_SCALAR_SIZE = {t: struct.calcsize("<" + f) for t, f in _SCALARS.items()}
_U32, _U64 = struct.Struct("<I"), struct.Struct("<Q")


@dataclass(frozen=True)
class LazyArray:
    """A metadata array not read yet: ``item_type`` (a GGUF value type), ``count`` elements in bytes
    ``[start, end)`` of the file."""

    item_type: int
    count: int
    start: int
    end: int

    def __len__(self) -> int:
        return self.count


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's record: ``dims`` as stored (innermost first), ``offset`` absolute in the file."""

    name: str
    type_id: int
    type_name: str         # ggml type name, e.g. "Q4_K", "F32"
    dims: tuple[int, ...]
    offset: int
    n_bytes: int
    block_size: int
    type_size: int

    @property
    def shape(self) -> tuple[int, ...]:
        """The Hugging Face (row-major) shape, e.g. (out_features, in_features)."""
        return tuple(reversed(self.dims))

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.dims:
            n *= d
        return n


@dataclass(frozen=True)
class GGUFHeader:
    path: Path
    size: int                          # the file's size in bytes
    version: int
    alignment: int
    data_offset: int                   # where the tensor data region starts
    fields: dict[str, Any]             # key -> int/float/bool/str, or LazyArray
    tensors: tuple[TensorInfo, ...]    # in file order

    def value(self, key: str) -> Any:
        """A scalar value, a LazyArray, or None when the key is absent."""
        return self.fields.get(key)

    def array(self, key: str) -> list[Any] | None:
        """The elements of an array key as Python values, read from the file now (nested arrays as nested
        lists); a scalar key's value as it is; None when the key is absent."""
        lazy = self.fields.get(key)
        if not isinstance(lazy, LazyArray):
            return lazy
        try:
            with open(self.path, "rb") as f:
                f.seek(lazy.start)
                blob = f.read(lazy.end - lazy.start)
        except OSError as e:
            raise ModelFormatError(f"cannot read {self.path}: {e.strerror or e}") from None
        if len(blob) != lazy.end - lazy.start:
            raise ModelFormatError(f"{self.path.name} changed while it was read (metadata key {key!r}); {FIX}")
        cursor = _Cursor(blob, self.path.name, len(blob))
        cursor.where = f"metadata key {key!r}"
        return cursor.array_items(lazy.item_type, lazy.count)

    @property
    def end(self) -> int:
        """Where the last tensor's data ends (the size a complete file has at least)."""
        return max((t.offset + t.n_bytes for t in self.tensors), default=self.data_offset)


def read_header(path: str | Path, *, check_data: bool = True) -> GGUFHeader:
    """Parse the header of ``path`` and (``check_data``) check every tensor lies inside the file.

    ``check_data=False`` reads the header of a file whose tensor data is cut short (e.g. the first part of a
    split download) to learn where its layout ends. The caller has checked the magic (so the file is not
    empty); raises ModelFormatError or UnsupportedQuantType, one line each.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                header = _parse(mm, path, size, check_data)
    except OSError as e:
        raise ModelFormatError(f"cannot read {path}: {e.strerror or e}") from None
    return header


class _Cursor:
    """Reads little-endian values from a buffer, checking every length against the bytes there are."""

    def __init__(self, buf: Any, file: str, size: int):
        self.buf, self.file, self.size, self.pos = buf, file, size, 0
        self.where = "the header"

    def need(self, n: int) -> None:
        if n > self.size - self.pos:
            raise ModelFormatError(
                f"{self.file} is truncated or corrupt: {self.where} runs past the end of the file (needs "
                f"{n:,} bytes at byte {self.pos:,}, the file has {self.size:,}); {FIX}")

    def u32(self) -> int:
        self.need(4)
        value = _U32.unpack_from(self.buf, self.pos)[0]
        self.pos += 4
        return value

    def u64(self) -> int:
        self.need(8)
        value = _U64.unpack_from(self.buf, self.pos)[0]
        self.pos += 8
        return value

    def string(self) -> str:
        n = self.u64()
        self.need(n)
        raw = self.buf[self.pos:self.pos + n]
        self.pos += n
        try:
            return bytes(raw).decode("utf-8")
        except UnicodeDecodeError:
            raise self.corrupt("a string that is not UTF-8") from None

    def corrupt(self, what: str) -> ModelFormatError:
        return ModelFormatError(f"{self.file} is corrupt: {self.where} has {what}; {FIX}")

    def value(self, kind: int, *, lazy: bool) -> Any:
        """One value of GGUF type ``kind``; an array is skipped and returned as a LazyArray when ``lazy``."""
        if kind in _SCALARS:
            self.need(_SCALAR_SIZE[kind])
            value = struct.unpack_from("<" + _SCALARS[kind], self.buf, self.pos)[0]
            self.pos += _SCALAR_SIZE[kind]
            return value
        if kind == STRING:
            return self.string()
        if kind == ARRAY:
            item_type, count = self.u32(), self.u64()
            if lazy:
                start = self.pos
                self.skip_items(item_type, count)
                return LazyArray(item_type, count, start, self.pos)
            return self.array_items(item_type, count)
        raise self.corrupt(f"value type {kind}, which GGUF does not define")

    def _check_count(self, item_type: int, count: int) -> None:
        # Every element takes at least this many bytes: a count the rest of the file cannot hold is refused
        # before looping over it.
        smallest = _SCALAR_SIZE.get(item_type, 8 if item_type == STRING else 12)
        if item_type not in _SCALARS and item_type not in (STRING, ARRAY):
            raise self.corrupt(f"an array of value type {item_type}, which GGUF does not define")
        if count * smallest > self.size - self.pos:
            raise ModelFormatError(
                f"{self.file} is truncated or corrupt: {self.where} claims {count:,} array entries but only "
                f"{self.size - self.pos:,} bytes follow; {FIX}")

    def skip_items(self, item_type: int, count: int) -> None:
        self._check_count(item_type, count)
        if item_type in _SCALARS:
            self.pos += count * _SCALAR_SIZE[item_type]
        elif item_type == STRING:
            # Only the length prefixes are read; positions past the end fail in unpack_from or at the end.
            buf, pos, unpack = self.buf, self.pos, _U64.unpack_from
            try:
                for _ in range(count):
                    pos += 8 + unpack(buf, pos)[0]
            except struct.error:
                pos = self.size + 1
            if pos > self.size:
                raise ModelFormatError(
                    f"{self.file} is truncated or corrupt: {self.where} runs past the end of the file (the file "
                    f"has {self.size:,} bytes); {FIX}")
            self.pos = pos
        else:
            for _ in range(count):
                self.value(ARRAY, lazy=True)

    def array_items(self, item_type: int, count: int) -> list[Any]:
        self._check_count(item_type, count)
        if item_type in _SCALARS:
            n = count * _SCALAR_SIZE[item_type]
            values = list(struct.unpack_from(f"<{count}{_SCALARS[item_type]}", self.buf, self.pos))
            self.pos += n
            return values
        return [self.value(item_type, lazy=False) for _ in range(count)]


def _parse(buf: Any, path: Path, size: int, check_data: bool) -> GGUFHeader:
    c = _Cursor(buf, path.name, size)
    c.need(4)
    c.pos = 4   # the magic, checked by the caller
    version = c.u32()
    if version not in VERSIONS:
        if version and not version & 0xFFFF:
            raise ModelFormatError(
                f"{path.name} is a big-endian GGUF (version field {version:#010x}): edgekit reads little-endian "
                "GGUF files; convert the model again with llama.cpp without --bigendian")
        raise ModelFormatError(
            f"{path.name} is GGUF version {version}: edgekit reads versions {' and '.join(map(str, VERSIONS))}; "
            "re-convert the model with a current llama.cpp (or upgrade edgekit if the file is newer)")
    n_tensors, n_kv = c.u64(), c.u64()

    fields: dict[str, Any] = {}
    c.where = "the metadata count"
    c._check_count(ARRAY, n_kv)   # a key/value takes at least 12 bytes
    for i in range(n_kv):
        c.where = f"metadata entry {i}"
        key = c.string()
        c.where = f"metadata key {key!r}"
        kind = c.u32()
        value = c.value(kind, lazy=True)
        if key in fields:
            raise c.corrupt("a second entry with the same key")
        fields[key] = value

    alignment = fields.get("general.alignment", DEFAULT_ALIGNMENT)
    if (not isinstance(alignment, int) or isinstance(alignment, bool) or alignment <= 0
            or alignment & (alignment - 1)):
        raise ModelFormatError(
            f"{path.name} is corrupt: general.alignment is {alignment!r}, not a power of two; {FIX}")

    c.where = "the tensor count"
    c._check_count(ARRAY, n_tensors)   # a tensor record takes at least 24 bytes
    records = []
    for i in range(n_tensors):
        c.where = f"tensor record {i}"
        name = c.string()
        c.where = f"tensor {name!r}"
        n_dims = c.u32()
        if not 1 <= n_dims <= MAX_DIMS:
            raise c.corrupt(f"{n_dims} dimensions (GGUF tensors have 1 to {MAX_DIMS})")
        dims = tuple(c.u64() for _ in range(n_dims))
        records.append((name, dims, c.u32(), c.u64()))
    data_offset = -(-c.pos // alignment) * alignment

    tensors = []
    seen: set[str] = set()
    for name, dims, type_id, offset in records:
        if name in seen:
            raise ModelFormatError(f"{path.name} is corrupt: it has two tensors named {name!r}; {FIX}")
        seen.add(name)
        tensors.append(_tensor(path, size if check_data else None, name, dims, type_id, data_offset, offset,
                               alignment))
    return GGUFHeader(path, size, version, alignment, data_offset, fields, tuple(tensors))


def _tensor(path: Path, size: int | None, name: str, dims: tuple[int, ...], type_id: int, data_offset: int,
            offset: int, alignment: int) -> TensorInfo:
    if type_id not in GGML_TYPES:
        raise UnsupportedQuantType(
            f"tensor {name!r} of {path.name} has ggml type id {type_id}, which edgekit does not know: "
            f"edgekit reads {', '.join(SUPPORTED_QUANT_TYPES)}; requantize the model with llama.cpp (e.g. Q8_0 "
            "or Q4_K_M)")
    type_name, block_size, type_size = GGML_TYPES[type_id]
    if dims[0] % block_size:
        raise ModelFormatError(
            f"{path.name} is corrupt: tensor {name!r} has rows of {dims[0]} values, not a multiple of the "
            f"{block_size}-value blocks of {type_name}; {FIX}")
    if offset % alignment:
        raise ModelFormatError(
            f"{path.name} is corrupt: tensor {name!r} starts at data offset {offset}, not a multiple of the "
            f"alignment {alignment}; {FIX}")
    n_elements = 1
    for d in dims:
        n_elements *= d
    info = TensorInfo(name, type_id, type_name, dims, data_offset + offset, n_elements // block_size * type_size,
                      block_size, type_size)
    end = info.offset + info.n_bytes
    if size is not None and end > size:
        raise ModelFormatError(
            f"{path.name} is truncated: tensor {name!r} needs bytes up to {end} but the file has {size}; {FIX}")
    return info
