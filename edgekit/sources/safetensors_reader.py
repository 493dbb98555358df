"""Lazy reader for Hugging Face safetensors checkpoints (single file or sharded), with no torch.

The safetensors format is an 8-byte header length, a JSON header (name -> dtype, shape, byte offsets) and
raw little-endian data. Reading it directly lets us memory-map every shard and decode bf16 (what the
R1-Distill checkpoints ship) with numpy, which the safetensors package's numpy backend cannot do.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Any

import numpy as np

from ..architectures import HF_WEIGHT_NAMES, layer_name
from ..errors import ModelFormatError
from ..spec import ModelSpec

_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64,
           "I64": np.int64, "I32": np.int32, "I8": np.int8, "U8": np.uint8}


class _Shard:
    def __init__(self, path: Path):
        self.path = path
        try:
            size = path.stat().st_size
            with open(path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                if n > size - 8 or n > 100_000_000:
                    raise ValueError("header length beyond the file")
                header = json.loads(f.read(n))
        except (OSError, ValueError, struct.error) as e:
            raise ModelFormatError(f"{path} is not a readable safetensors file ({e}): re-download it") from None
        header.pop("__metadata__", None)
        self.base = 8 + n
        self.header: dict[str, Any] = header
        end = max((v["data_offsets"][1] for v in header.values()), default=0)
        if self.base + end > size:
            raise ModelFormatError(
                f"{path} is truncated ({size} bytes, its header needs {self.base + end}): re-download it")
        self._map = np.memmap(path, dtype=np.uint8, mode="r") if size else None

    def get(self, name: str) -> np.ndarray:
        info = self.header[name]
        if info["dtype"] not in _DTYPES:
            raise ModelFormatError(f"tensor {name} in {self.path.name} has unsupported dtype {info['dtype']}")
        start, end = info["data_offsets"]
        raw = self._map[self.base + start:self.base + end]
        if info["dtype"] == "BF16":  # bf16 is the top half of a float32
            wide = raw.view(np.uint16).astype(np.uint32) << 16
            return wide.view(np.float32).reshape(info["shape"])
        return raw.view(_DTYPES[info["dtype"]]).reshape(info["shape"]).astype(np.float32)


class SafetensorsReader:
    """WeightReader over a Hugging Face folder."""

    def __init__(self, folder: Path, spec: ModelSpec):
        self.folder, self.spec = Path(folder), spec
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as e:
                raise ModelFormatError(f"{index} is malformed ({e}): re-download it") from None
            files = sorted(set(weight_map.values()))
            missing = [f for f in files if not (self.folder / f).is_file()]
            if missing:
                raise ModelFormatError(
                    f"{self.folder} is missing {len(missing)} of {len(files)} shards ({', '.join(missing[:3])}): "
                    "download the complete checkpoint")
            self.shards = {f: _Shard(self.folder / f) for f in files}
            self.where = {}
            for name, f in weight_map.items():
                if name not in self.shards[f].header:
                    raise ModelFormatError(f"shard {f} does not contain {name} although the index says so: "
                                           "re-download the checkpoint")
                self.where[name] = self.shards[f]
        else:
            files = sorted(self.folder.glob("*.safetensors"))
            if not files:
                raise ModelFormatError(f"{self.folder} has no *.safetensors weights: download the complete checkpoint")
            self.shards = {f.name: _Shard(f) for f in files}
            self.where = {n: s for s in self.shards.values() for n in s.header}
        self._fingerprint: str | None = None

    def _name(self, canonical: str, layer: int | None) -> str | None:
        if canonical not in HF_WEIGHT_NAMES:
            return None
        return layer_name(HF_WEIGHT_NAMES, canonical, layer)

    def has(self, canonical: str, layer: int | None = None) -> bool:
        name = self._name(canonical, layer)
        return name is not None and name in self.where

    def tensor(self, canonical: str, layer: int | None = None) -> np.ndarray:
        name = self._name(canonical, layer)
        if canonical == "lm_head.weight" and self.spec.tie_word_embeddings:
            name = layer_name(HF_WEIGHT_NAMES, "embed.weight")
        if name is None or name not in self.where:
            raise ModelFormatError(f"the checkpoint in {self.folder} has no tensor {name or canonical}: "
                                   "the download is incomplete or it is not a supported model")
        return self.where[name].get(name)

    # ----- tokenizer ----------------------------------------------------------------------------
    def _json(self, name: str) -> dict[str, Any]:
        path = self.folder / name
        if not path.is_file():
            return {}
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except ValueError as e:
            raise ModelFormatError(f"{path} is not valid JSON ({e}): re-download it") from None

    def tokenizer_json(self) -> str:
        path = self.folder / "tokenizer.json"
        if not path.is_file():
            raise ModelFormatError(f"{self.folder} has no tokenizer.json: download the complete model folder")
        return path.read_text(encoding="utf-8")

    def chat_template(self) -> str | None:
        jinja = self.folder / "chat_template.jinja"
        if jinja.is_file():
            return jinja.read_text(encoding="utf-8")
        template = self._json("tokenizer_config.json").get("chat_template")
        if isinstance(template, list):  # a list of named templates: take the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        return template

    def special_tokens(self) -> dict[str, Any]:
        config = self._json("tokenizer_config.json")
        gen = self._json("generation_config.json")

        def text(value):
            return value.get("content") if isinstance(value, dict) else value

        eos = gen.get("eos_token_id", self.spec.eos_token_ids)
        eos_ids = [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]
        return {"bos_token": text(config.get("bos_token")), "eos_token": text(config.get("eos_token")),
                "bos_token_id": gen.get("bos_token_id", self.spec.bos_token_id), "eos_token_ids": eos_ids,
                "add_bos_token": bool(config.get("add_bos_token", False))}

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            digest = hashlib.sha256()
            for name in sorted(self.shards):
                digest.update(name.encode())
                with open(self.shards[name].path, "rb") as f:
                    while chunk := f.read(1 << 24):
                        digest.update(chunk)
            self._fingerprint = digest.hexdigest()
        return self._fingerprint

    def close(self) -> None:
        for shard in self.shards.values():
            shard._map = None
