"""Where a model comes from and how its weights are read: :mod:`.model_source` (resolve, open_weights),
:mod:`.hub`; readers in :mod:`.gguf` and :mod:`.safetensors_reader`."""

from .hub import download_from_hub
from .model_source import PACKAGED_MODELS, ModelSource, WeightReader, open_weights, packaged_model_path, resolve

__all__ = ["PACKAGED_MODELS", "ModelSource", "WeightReader", "download_from_hub", "open_weights",
           "packaged_model_path", "resolve"]
