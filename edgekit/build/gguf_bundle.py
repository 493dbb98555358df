"""``ggml-cpu`` bundles: a GGUF carried as stored, for llama.cpp's CPU kernels (runtime/ggml_backend.py).

Writes into the staging folder:

- ``model.gguf``           the source file, byte for byte (a reflink where the filesystem can, else a copy)
- ``tokenizer.json``       the tokenizer from the GGUF's metadata, as for every bundle
- ``chat_template.jinja``  the chat template, when the GGUF has one
- ``manifest.json``        dialect "gguf": ``graph.file`` is model.gguf; no ONNX graph

No weight is decoded or re-encoded: bundle weights are 1.00x the GGUF's, the build takes seconds.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import UserInputError
from ..export.cache import _copy_hashed

# ggml tensor types llama.cpp's CPU backend runs (ggml.h's live types; 4, 5 and 31-33 were removed)
RUNNABLE = frozenset({"F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q8_1", "Q2_K", "Q3_K", "Q4_K",
                      "Q5_K", "Q6_K", "Q8_K", "IQ2_XXS", "IQ2_XS", "IQ3_XXS", "IQ1_S", "IQ4_NL", "IQ3_S", "IQ2_S",
                      "IQ4_XS", "IQ1_M", "TQ1_0", "TQ2_0", "MXFP4", "I8", "I16", "I32", "I64", "F64"})
GGUF_FILE = "model.gguf"


def check_runnable(spec, options) -> None:
    """Refuse, before any copy, a GGUF llama.cpp's CPU kernels cannot run, and options it does not take."""
    types = dict(dict(spec.extras).get("tensor_types", ()))
    bad = sorted({t for t in types.values() if t not in RUNNABLE})
    if bad:
        raise UserInputError(f"the ggml-cpu backend cannot run tensor type(s) {', '.join(bad)} of this GGUF: "
                             "use --backend onnxruntime-cpu, or a GGUF of common types (Q4_K_M, Q8_0, F16)")
    if options.get("kv_cache", "float") != "float":
        raise UserInputError("--kv-cache int8 is an onnxruntime graph option: ggml-cpu keeps an f16 cache; "
                             "omit --kv-cache, or use --backend onnxruntime-cpu")
    if options.get("logits", "last") != "last":
        raise UserInputError("logits='all' is an ONNX graph option: ggml-cpu returns any rows asked for; omit it")


def carry_gguf(source, tmp: Path, progress=None) -> int:
    """Copy the GGUF into the staging folder; returns its tensor bytes (the bundle's weights)."""
    if progress:
        progress("copy GGUF", 0, 1)
    _copy_hashed(Path(source.path), tmp / GGUF_FILE)
    if progress:
        progress("copy GGUF", 1, 1)
    return sum(n for _, n in dict(source.spec.extras).get("tensor_bytes", ()))


def gguf_graph_section(spec) -> dict:
    """The manifest's ``graph`` section of a ggml-cpu bundle."""
    return {"file": GGUF_FILE, "data": None, "inputs": [], "outputs": [], "logits": "all", "kv_dtype": "float16",
            "kv_cache": {"layout": "llama.cpp KV cache, one sequence", "update": "llama_decode appends rows",
                         "type": "f16"},
            "tensor_types": sorted(set(dict(dict(spec.extras).get("tensor_types", ())).values()))}
