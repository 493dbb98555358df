"""The on-device runtime: loads a bundle and generates text; imports only numpy, onnxruntime, tokenizers, jinja2."""
