"""The architecture registry: which ``architectures[0]`` values edgekit builds, and their weight names.

Qwen2 and Llama are one decoder (pre-norm RMSNorm, rotary attention with grouped KV heads, SwiGLU MLP);
they differ only in flags: Qwen2 has biases on q/k/v, some Qwen2 checkpoints tie the LM head to the
embedding, Llama-3 scales its rotary frequencies. Weight names are a table, not code: the exporter asks
for a canonical name ("layers.3.q.weight") and the table says what the checkpoint calls it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import UnsupportedArchitecture

if TYPE_CHECKING:
    from .spec import ModelSpec

# Canonical name -> Hugging Face checkpoint name. "{i}" is the layer index.
HF_WEIGHT_NAMES: dict[str, str] = {
    "embed.weight": "model.embed_tokens.weight",
    "final_norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
    "layers.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "layers.{i}.q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "layers.{i}.q.bias": "model.layers.{i}.self_attn.q_proj.bias",
    "layers.{i}.k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "layers.{i}.k.bias": "model.layers.{i}.self_attn.k_proj.bias",
    "layers.{i}.v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "layers.{i}.v.bias": "model.layers.{i}.self_attn.v_proj.bias",
    "layers.{i}.o.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "layers.{i}.o.bias": "model.layers.{i}.self_attn.o_proj.bias",
    "layers.{i}.mlp_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "layers.{i}.gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "layers.{i}.up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "layers.{i}.down.weight": "model.layers.{i}.mlp.down_proj.weight",
}

# Canonical name -> GGUF tensor name (llama.cpp's convention, shared by its llama and qwen2 converters).
GGUF_WEIGHT_NAMES: dict[str, str] = {
    "embed.weight": "token_embd.weight",
    "final_norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "rope_freqs.weight": "rope_freqs.weight",
    "layers.{i}.attn_norm.weight": "blk.{i}.attn_norm.weight",
    "layers.{i}.q.weight": "blk.{i}.attn_q.weight",
    "layers.{i}.q.bias": "blk.{i}.attn_q.bias",
    "layers.{i}.k.weight": "blk.{i}.attn_k.weight",
    "layers.{i}.k.bias": "blk.{i}.attn_k.bias",
    "layers.{i}.v.weight": "blk.{i}.attn_v.weight",
    "layers.{i}.v.bias": "blk.{i}.attn_v.bias",
    "layers.{i}.o.weight": "blk.{i}.attn_output.weight",
    "layers.{i}.o.bias": "blk.{i}.attn_output.bias",
    "layers.{i}.mlp_norm.weight": "blk.{i}.ffn_norm.weight",
    "layers.{i}.gate.weight": "blk.{i}.ffn_gate.weight",
    "layers.{i}.up.weight": "blk.{i}.ffn_up.weight",
    "layers.{i}.down.weight": "blk.{i}.ffn_down.weight",
}

# The linear layers of one decoder layer, in the order the graph uses them.
LINEAR_LAYERS = ("q", "k", "v", "o", "gate", "up", "down")


@dataclass(frozen=True)
class Architecture:
    """One registry entry: the flags that make the shared decoder into this family."""

    name: str                 # architectures[0] in config.json
    family: str               # short name used in manifests and tables
    gguf_name: str            # general.architecture in a GGUF file
    qkv_bias: bool            # Qwen2: always; Llama: only with attention_bias=true
    # llama.cpp's converter permutes the rows of q/k for Llama (to its interleaved rotary layout);
    # a GGUF of that family must be permuted back before use with the half-split rotary of HF.
    gguf_permutes_qk: bool


REGISTRY: dict[str, Architecture] = {
    a.name: a
    for a in (
        Architecture("Qwen2ForCausalLM", "qwen2", "qwen2", qkv_bias=True, gguf_permutes_qk=False),
        Architecture("LlamaForCausalLM", "llama", "llama", qkv_bias=False, gguf_permutes_qk=True),
    )
}
GGUF_REGISTRY: dict[str, Architecture] = {a.gguf_name: a for a in REGISTRY.values()}


def lookup(name: str) -> Architecture:
    """The registry entry for ``architectures[0]``; an unknown one lists what is supported."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise UnsupportedArchitecture(
            f"unsupported architecture {name!r}: edgekit builds {', '.join(sorted(REGISTRY))}; "
            "use an R1-Distill-Qwen or R1-Distill-Llama checkpoint (or another model of those families)"
        ) from None


def lookup_gguf(name: str) -> Architecture:
    try:
        return GGUF_REGISTRY[name]
    except KeyError:
        raise UnsupportedArchitecture(
            f"unsupported GGUF architecture {name!r}: edgekit builds {', '.join(sorted(GGUF_REGISTRY))} "
            "(R1-Distill-Qwen and R1-Distill-Llama GGUFs)"
        ) from None


def layer_name(table: dict[str, str], canonical: str, layer: int | None = None) -> str:
    """``layer_name(HF_WEIGHT_NAMES, "layers.{i}.q.weight", 3)`` -> ``model.layers.3.self_attn.q_proj.weight``."""
    name = table[canonical]
    return name.format(i=layer) if layer is not None else name


def weight_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """Canonical name -> Hugging Face shape of every weight the decoder may read, whether or not ``spec``'s
    checkpoint has it (the LM head, every linear's bias, rope_freqs): what a weight must look like if present."""
    h = spec.hidden_size
    shapes: dict[str, tuple[int, ...]] = {
        "embed.weight": (spec.vocab_size, h), "final_norm.weight": (h,),
        "layers.{i}.attn_norm.weight": (h,), "layers.{i}.mlp_norm.weight": (h,),
        "lm_head.weight": (spec.vocab_size, h),
    }
    for linear, (out, inp) in spec.linear_shapes.items():
        shapes[f"layers.{{i}}.{linear}.weight"] = (out, inp)
    for linear, (out, _) in spec.linear_shapes.items():
        shapes[f"layers.{{i}}.{linear}.bias"] = (out,)
    shapes["rope_freqs.weight"] = (spec.head_dim // 2,)
    return shapes


def required_weight_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """The part of :func:`weight_shapes` that ``spec``'s checkpoint must hold: the LM head unless tied, the
    biases its flags name, rope_freqs when the file stores them (Llama-3 GGUFs)."""
    wanted = {"lm_head.weight": not spec.tie_word_embeddings,
              "layers.{i}.q.bias": spec.qkv_bias, "layers.{i}.k.bias": spec.qkv_bias,
              "layers.{i}.v.bias": spec.qkv_bias, "layers.{i}.o.bias": spec.o_bias,
              "rope_freqs.weight": any(key == "rope_freqs" for key, _ in spec.extras)}
    return {name: shape for name, shape in weight_shapes(spec).items()
            if wanted.get(name, not name.endswith(".bias"))}
