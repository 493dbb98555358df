"""Write a random-weight Hugging Face folder with the exact shape of DeepSeek-R1-Distill-Qwen-1.5B.

Speed and memory depend on the shapes, not on the values, so this stands in for the real checkpoint where
the hub cannot be reached. Its output is meaningless text: never use it to judge fidelity.

    python benchmarks/make_r1_shaped.py OUT [--dtype bf16|fp16] [--seed 0] [--layers N] [--gguf FILE]

Writes config.json (the real one, from tests/fixtures/configs), generation_config.json, sharded
``model-0000X-of-0000N.safetensors`` + ``model.safetensors.index.json`` (weights generated and written one
block of rows at a time, so memory stays around 100 MB), and a byte-level BPE tokenizer (tokenizer.json,
tokenizer_config.json with an R1-style chat template) whose vocabulary has exactly ``vocab_size`` entries,
with the R1 special tokens at their real ids. It takes about 1 minute and 3.6 GB of disk (bf16).
Only numpy and tokenizers are needed.

``--gguf FILE`` also writes the same weights as an F16 GGUF the way llama.cpp's converter names them (qwen2
architecture, the tokenizer as a gpt2-style BPE), for llama.cpp to load or quantize (needs the ``gguf``
package and edgekit's safetensors reader). Tensors are streamed into the file one at a time.
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "tests" / "fixtures" / "configs" / "DeepSeek-R1-Distill-Qwen-1.5B" / "config.json"
SHARD_BYTES = 1 << 30
ROWS_PER_BLOCK = 1 << 22   # elements generated at once (16 MiB of float32)

# The R1-Distill-Qwen special tokens at their ids in the real tokenizer.
SPECIALS = {151643: "<｜end▁of▁sentence｜>", 151644: "<｜User｜>", 151645: "<｜Assistant｜>",
            151646: "<｜begin▁of▁sentence｜>", 151647: "<|EOT|>", 151648: "<think>", 151649: "</think>"}
NOT_SPECIAL = ("<think>", "</think>")   # ordinary added tokens, as in the real tokenizer
# A shortened R1-Distill template: no system prompt, and the generation prompt opens the thought.
TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}<｜User｜>{{ m['content'] }}"
            "{% elif m['role'] == 'assistant' %}<｜Assistant｜>{% set c = m['content'] %}"
            "{% if '</think>' in c %}{% set c = c.split('</think>')[-1] %}{% endif %}{{ c }}<｜end▁of▁sentence｜>"
            "{% endif %}{% endfor %}{% if add_generation_prompt %}<｜Assistant｜><think>\n{% endif %}")


def tensor_shapes(cfg: dict) -> list[tuple[str, tuple[int, ...]]]:
    """(HF name, shape) of every weight, in checkpoint order."""
    h, inter, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    d = h // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * d, cfg["num_key_value_heads"] * d
    out = [("model.embed_tokens.weight", (v, h))]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out += [(p + "input_layernorm.weight", (h,)), (p + "self_attn.q_proj.weight", (q, h)),
                (p + "self_attn.q_proj.bias", (q,)), (p + "self_attn.k_proj.weight", (kv, h)),
                (p + "self_attn.k_proj.bias", (kv,)), (p + "self_attn.v_proj.weight", (kv, h)),
                (p + "self_attn.v_proj.bias", (kv,)), (p + "self_attn.o_proj.weight", (h, q)),
                (p + "post_attention_layernorm.weight", (h,)), (p + "mlp.gate_proj.weight", (inter, h)),
                (p + "mlp.up_proj.weight", (inter, h)), (p + "mlp.down_proj.weight", (h, inter))]
    out += [("model.norm.weight", (h,))]
    if not cfg.get("tie_word_embeddings"):
        out += [("lm_head.weight", (v, h))]
    return out


def to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits (uint16), rounding to nearest even."""
    u = x.view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def values(name: str, n: int, rng: np.random.Generator, fan_in: int) -> np.ndarray:
    """n float32 values for a tensor: norms near 1, biases small, matrices scaled so activations stay O(1)."""
    if name.endswith("norm.weight"):
        return (1.0 + 0.05 * rng.standard_normal(n, dtype=np.float32)).astype(np.float32)
    if name.endswith(".bias"):
        return 0.02 * rng.standard_normal(n, dtype=np.float32)
    return rng.standard_normal(n, dtype=np.float32) * np.float32(1.0 / np.sqrt(fan_in))


def write_weights(folder: Path, cfg: dict, dtype: str, seed: int) -> int:
    rng = np.random.default_rng(seed)
    tensors = tensor_shapes(cfg)
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in tensors:
        nbytes = int(np.prod(shape)) * 2
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    weight_map, total = {}, 0
    st_dtype = "BF16" if dtype == "bf16" else "F16"
    for k, shard in enumerate(shards, 1):
        fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name, shape in shard:
            n = int(np.prod(shape)) * 2
            header[name] = {"dtype": st_dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
            offset += n
            weight_map[name] = fname
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)          # the data starts 8-byte aligned
        with open(folder / fname, "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            for name, shape in shard:
                n, fan_in = int(np.prod(shape)), shape[-1]
                for start in range(0, n, ROWS_PER_BLOCK):
                    block = values(name, min(ROWS_PER_BLOCK, n - start), rng, fan_in)
                    f.write((to_bf16(block) if dtype == "bf16" else block.astype(np.float16)).tobytes())
        total += offset
        print(f"  {fname}: {offset / 2**20:.0f} MiB", file=sys.stderr)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    return total


def write_tokenizer(folder: Path, vocab_size: int) -> None:
    """Byte-level BPE: 256 byte tokens, byte pairs merged into two-character tokens, placeholders up to the
    specials, the R1 specials at their real ids, padding up to ``vocab_size``."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    merges = []
    first_special = min(SPECIALS)
    for a in alphabet:
        for b in alphabet:
            if len(vocab) >= first_special:
                break
            vocab[a + b] = len(vocab)
            merges.append((a, b))
    while len(vocab) < first_special:
        vocab[f"<|placeholder_{len(vocab)}|>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    for i in range(first_special, vocab_size):
        text = SPECIALS.get(i, f"<|pad_{i}|>")
        added = AddedToken(text, special=text not in NOT_SPECIAL, normalized=False)
        (tok.add_tokens if text in NOT_SPECIAL else tok.add_special_tokens)([added])
    if tok.get_vocab_size(with_added_tokens=True) != vocab_size:
        raise SystemExit(f"tokenizer has {tok.get_vocab_size(True)} tokens, expected {vocab_size}")
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": SPECIALS[151646], "eos_token": SPECIALS[151643], "pad_token": SPECIALS[151643],
        "add_bos_token": True, "add_eos_token": False, "model_max_length": 16384,
        "tokenizer_class": "PreTrainedTokenizerFast", "chat_template": TEMPLATE}, indent=1, ensure_ascii=False))
    (folder / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 151646, "eos_token_id": 151643, "do_sample": True, "temperature": 0.6, "top_p": 0.95}))


def write_gguf(folder: Path, path: Path) -> Path:
    """The HF folder's weights as an F16 qwen2 GGUF (llama.cpp's names; no q/k row permutation for qwen2)."""
    import gguf

    from edgekit.architectures import GGUF_WEIGHT_NAMES, HF_WEIGHT_NAMES, layer_name
    from edgekit.sources import open_weights, resolve

    source = resolve(folder)
    spec, reader = source.spec, open_weights(source)
    cfg = json.loads((folder / "config.json").read_text())
    doc = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    tokens = [""] * cfg["vocab_size"]
    types = [gguf.TokenType.NORMAL] * cfg["vocab_size"]
    for text, i in doc["model"]["vocab"].items():
        tokens[i] = text
    for added in doc["added_tokens"]:
        tokens[added["id"]] = added["content"]
        types[added["id"]] = gguf.TokenType.CONTROL if added["special"] else gguf.TokenType.USER_DEFINED
    merges = [" ".join(m) if isinstance(m, list) else m for m in doc["model"]["merges"]]

    w = gguf.GGUFWriter(path, "qwen2")
    w.add_name("R1-Distill-Qwen-1.5B-shaped (random weights)")
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_rope_freq_base(float(cfg["rope_theta"]))
    w.add_layer_norm_rms_eps(float(cfg["rms_norm_eps"]))
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(151646)
    w.add_eos_token_id(151643)
    w.add_add_bos_token(True)
    w.add_chat_template(TEMPLATE)

    order = [("embed.weight", None)]
    for i in range(spec.num_layers):
        order += [(f"layers.{{i}}.{n}", i) for n in ("attn_norm.weight", "q.weight", "q.bias", "k.weight", "k.bias",
                                                     "v.weight", "v.bias", "o.weight", "mlp_norm.weight",
                                                     "gate.weight", "up.weight", "down.weight")]
    order += [("final_norm.weight", None), ("lm_head.weight", None)]
    shapes = {}
    for canonical, layer in order:   # the header lists every tensor before any data is written
        name = layer_name(GGUF_WEIGHT_NAMES, canonical, layer)
        hf_name = layer_name(HF_WEIGHT_NAMES, canonical, layer)
        shape = tuple(reader.where[hf_name].header[hf_name]["shape"])   # from the safetensors header, no data read
        dtype = np.float32 if len(shape) == 1 else np.float16   # llama.cpp keeps norms and biases in F32
        shapes[name] = (shape, dtype)
        w.add_tensor_info(name, shape, np.dtype(dtype), int(np.prod(shape)) * np.dtype(dtype).itemsize)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for canonical, layer in order:
        shape, dtype = shapes[layer_name(GGUF_WEIGHT_NAMES, canonical, layer)]
        w.write_tensor_data(np.ascontiguousarray(reader.tensor(canonical, layer), dtype=dtype))
    w.close()
    reader.close()
    return path


def make(out: Path, dtype: str = "bf16", seed: int = 0, layers: int | None = None) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    cfg = json.loads(CONFIG.read_text())
    if layers:
        cfg["num_hidden_layers"] = layers
    cfg["torch_dtype"] = "bfloat16" if dtype == "bf16" else "float16"
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    write_tokenizer(out, cfg["vocab_size"])
    write_weights(out, cfg, dtype, seed)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--layers", type=int, default=None, help="Fewer layers (for a quick try); default: the real 28.")
    ap.add_argument("--gguf", type=Path, default=None, help="Also write the weights as an F16 GGUF here.")
    ap.add_argument("--gguf-only", action="store_true", help="Only write --gguf from an existing OUT folder.")
    a = ap.parse_args()
    t0 = time.perf_counter()
    if not a.gguf_only:
        make(a.out, a.dtype, a.seed, a.layers)
    if a.gguf:
        write_gguf(a.out, a.gguf)
    print(f"wrote {a.out} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
