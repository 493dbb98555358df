"""The bytes a build writes, counted without reading a weight: the planner's single source for what
``edgekit build`` can write (fp32, fp16, int8, int4).

Every weight's form is decided by the dialect's :meth:`~edgekit.quant.forms.FormPolicy.form_of` from its source
type (a GGUF's real tensor-type mix, read from the header into ``spec.extras["tensor_types"]``) and shape, and
counted by :func:`~edgekit.quant.forms.form_bytes` — the same two functions the writer uses, which checks what
it writes against them. Norms, biases and the rotary tables are stored in the graph's float type.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from ..architectures import GGUF_WEIGHT_NAMES, layer_name
from ..errors import UserInputError
from ..spec import ModelSpec

# The ONNX dialect each backend runs.
DIALECT_OF_BACKEND = {"tensorrt": "tensorrt", "onnxruntime-cuda": "ort", "onnxruntime-cpu": "ort", "ggml-cpu": "gguf"}
BUILDABLE = ("fp32", "fp16", "int8", "int4")
# Packed matmuls: the graph's name -> the checkpoint tensors stacked into it.
PACKED = {"qkv": ("q", "k", "v"), "o": ("o",), "gate_up": ("gate", "up"), "down": ("down",)}


@dataclass(frozen=True)
class QuantSettings:
    """The options that change what a quantized build stores (see ``edgekit.build.QuantOptions``)."""

    block_size: int = 32
    head_bits: int = 8
    lossless: bool = True
    exact: bool = True
    accuracy_level: int = 4          # MatMulNBits: 4 = int8 compute (what onnxruntime CPU repacks for)
    kv_cache: str = "float"          # "int8": GroupQueryAttention's int8 cache (edgekit.export.kv_int8)


def tensor_types(spec: ModelSpec) -> dict[str, str]:
    """GGUF tensor name -> ggml type name, for a spec read from a GGUF (empty for float checkpoints)."""
    return dict(dict(spec.extras).get("tensor_types", ()))


def build_weight_bytes(spec: ModelSpec, *, dialect: str, precision: str, graph_float: str, context: int,
                       quant: QuantSettings | None = None):
    """:class:`edgekit.build.precision.WeightBytes` of the bundle ``edgekit build`` writes for these settings."""
    from ..build.precision import WeightBytes

    quant = quant or QuantSettings()
    sized = _Sizer(dialect, precision, graph_float, quant, tensor_types(spec))
    h, vocab, layers = spec.hidden_size, spec.vocab_size, spec.num_layers
    linears, largest = _linear_bytes(spec, sized)
    tied = spec.tie_word_embeddings
    embedding, embed_codes = sized("embedding", "embed.weight", None, vocab, h, tied=tied)
    lm_head, head_codes = 0, 0
    if not tied:
        lm_head, head_codes = sized("lm_head", "lm_head.weight", None, vocab, h)
    elif sized.policy is not None and quant.head_bits == 4:
        lm_head, head_codes = sized("lm_head", "embed.weight", None, vocab, h)
    bias = (spec.q_size + 2 * spec.kv_size if spec.qkv_bias else 0) + (h if spec.o_bias else 0)
    norms = (2 * layers + 1) * h
    rope = 2 * context * (spec.head_dim // 2)
    small = (layers * bias + norms + rope) * sized.float_bytes
    # The LM head first: on a tie it is the one named (it is the allocation seen failing on Jetson).
    largest = max(([("lm_head", head_codes)] if head_codes else []) + [("embedding", embed_codes), largest],
                  key=lambda c: c[1])
    if dialect == "ort" and sized.policy is not None and graph_float == "fp32":
        repack = _cpu_repack_bytes(spec, sized.policy, sized.qtype, quant.accuracy_level)
    else:
        repack = 0
    forms = ", ".join(f"{count} {kind}" for kind, count in sized.kinds.most_common())
    sources = {
        "linears": f"{layers} layers x {len(spec.linear_shapes)} linears; tensors: {forms}",
        "embedding": f"{vocab} x {h}",
        "lm_head": ("tied to the embedding (stored once)" if tied and not lm_head else f"{vocab} x {h}"),
        "small": f"norms, biases and rotary tables ({context} positions) in {graph_float}",
    }
    return WeightBytes(linears, embedding, lm_head, small, sources, largest, repack)


class _Sizer:
    """(bytes, codes bytes) of one weight in the form the build gives it, counting the forms for the report."""

    def __init__(self, dialect: str, precision: str, graph_float: str, quant: QuantSettings, types: dict[str, str]):
        from .forms import FormPolicy

        self.graph_float, self.types = graph_float, types
        self.float_bytes = 4 if graph_float == "fp32" else 2
        self.kinds: Counter = Counter()
        self.policy = None
        if precision in ("int4", "int8"):
            self.policy = FormPolicy.of(dialect, precision, block_size=quant.block_size, head_bits=quant.head_bits,
                                        lossless=quant.lossless, exact=quant.exact)

    def qtype(self, canonical: str, layer: int | None = None) -> str | None:
        return self.types.get(layer_name(GGUF_WEIGHT_NAMES, canonical, layer)) if self.types else None

    def __call__(self, role: str, canonical: str, layer: int | None, n: int, k: int,
                 tied: bool = False) -> tuple[int, int]:
        if self.policy is None:
            self.kinds[f"{self.graph_float} dense"] += 1
            return n * k * self.float_bytes, n * k * self.float_bytes
        from .forms import form_bytes

        form = self.policy.form_of(role, self.qtype(canonical, layer), k, tied=tied)
        self.kinds[_describe(form, self.qtype(canonical, layer))] += 1
        return form_bytes(form, n, k, self.float_bytes), _codes_bytes(form, n, k)


def _linear_bytes(spec: ModelSpec, sized: _Sizer) -> tuple[int, tuple[str, int]]:
    """Bytes of every layer's linears, and the largest packed weight's codes (what one allocation holds)."""
    linears, largest = 0, ("", 0)
    for i in range(spec.num_layers):
        for packed, parts in PACKED.items():
            for part in parts:
                n, k = spec.linear_shapes[part]
                total, codes = sized("linear", f"layers.{{i}}.{part}.weight", i, n, k)
                linears += total
                if codes > largest[1]:
                    largest = (f"{packed} weight of one layer", codes)
    return linears, largest


# onnxruntime's CPU MatMulNBits repacks its weight when the session starts; with int8 compute (accuracy level 4)
# the packed form holds, per block, the codes and two fp32 numbers (scale and block sum): measured on
# onnxruntime 1.32 (x86-64 AVX-512; 18944 x 3584 weights, RssAnon after the first run and malloc_trim): bits +
# 64 / block bits per weight (+0.3), e.g. 6.3 for 4-bit blocks of 32 against 5 in the file. With fp32 compute
# (level 0) 4-bit weights are repacked at their own size and 8-bit ones are read in place.
REPACK_FP32_PER_BLOCK = 2


def _cpu_repack_bytes(spec: ModelSpec, policy, qtype, level: int) -> int:
    """Memory onnxruntime CPU holds beyond the file's bytes for the MatMulNBits weights (the file's pages are
    released after repacking), plus the fp32 offsets of asymmetric blocks (folded once, kept for their MatMul)."""
    from .forms import form_bytes

    extra = 0

    def add(form, n: int, k: int, level: int) -> None:
        nonlocal extra
        if form.kind not in ("carry", "nbits"):
            return
        bits, block = form.bits, form.block
        nb = -(-k // block)
        packed = n * nb * (block * bits // 8 + 4 * REPACK_FP32_PER_BLOCK) if level == 4 else form_bytes(form, n, k, 4)
        extra += packed - form_bytes(form, n, k, 4)
        if form.kind == "carry" and form.qtype in ("Q4_1", "Q4_K"):
            extra += 4 * n * nb                                  # offsets (nb, N) fp32

    for i in range(spec.num_layers):
        for part, (n, k) in spec.linear_shapes.items():
            add(policy.form_of("linear", qtype(f"layers.{{i}}.{part}.weight", i), k), n, k, level)
    h, v = spec.hidden_size, spec.vocab_size
    if not spec.tie_word_embeddings:
        add(policy.form_of("lm_head", qtype("lm_head.weight"), h), v, h, 4)
    elif policy.head_bits == 8:
        add(policy.form_of("embedding", qtype("embed.weight"), h, tied=True), v, h, 4)
    else:
        add(policy.form_of("lm_head", qtype("embed.weight"), h), v, h, level)
    return max(extra, 0)


def _describe(form, qtype: str | None) -> str:
    if form.kind == "carry":
        return f"{form.qtype} carried over"
    source = f"{qtype} " if qtype and qtype not in ("F32", "F16", "BF16") else ""
    if form.kind == "nbits":
        return f"{source}int{form.bits} block {form.block}".strip()
    if form.kind == "int4":
        return "Q4_0 carried over" if form.qtype else f"{source}int4 block {form.block}".strip()
    return f"{source}int8 per {'row' if form.kind == 'rows8' else 'channel'}".strip()


def _codes_bytes(form, n: int, k: int) -> int:
    """The largest contiguous part of a weight: its codes."""
    return -(-n * k * (form.bits or 8) // 8)


# What a build holds besides the weights it is working on: the interpreter, numpy, onnx, the graph so far.
BUILD_BASE_BYTES = 512 << 20


def build_memory_bytes(spec: ModelSpec, precision: str) -> int:
    """The memory ``edgekit build`` itself needs at its peak, beyond the source file's pages (which are mapped,
    reclaimable, and let go of after every layer).

    A quantized build holds float32 copies of at most one stacked linear (gate and up together) at a time,
    with the temporaries of rounding it (x4); the embedding and LM head are decoded and quantized a few rows at a
    time. A dense (fp16/fp32) build converts each table whole: the largest table in float32 and its copy.
    """
    h, i = spec.hidden_size, spec.intermediate_size
    linear = max(2 * i * h, (spec.q_size + 2 * spec.kv_size) * h) * 4
    if precision in ("int4", "int8"):
        return BUILD_BASE_BYTES + 4 * linear
    table = spec.vocab_size * h * 4
    return BUILD_BASE_BYTES + max(2 * table, 2 * linear)


# ggml type name -> the precision class a bundle records for it (the ggml backend runs the blocks as stored)
_GGML_CLASS = {"F32": "fp32", "F16": "fp16", "BF16": "fp16", "Q8_0": "int8", "Q8_1": "int8", "Q8_K": "int8",
               "Q6_K": "int8", "Q5_0": "int8", "Q5_1": "int8", "Q5_K": "int8"}


def gguf_precision(spec: ModelSpec) -> str:
    """The precision class of a GGUF's linear weights (most bytes win): 2- to 4-bit blocks "int4", 5- to 8-bit
    "int8", F16/BF16 "fp16", F32 "fp32". What ``ggml-cpu`` bundles record: their blocks are not re-encoded."""
    types = tensor_types(spec)
    by_class: dict[str, int] = {}
    for name, n in dict(spec.extras).get("tensor_bytes", ()):
        if name.startswith("blk.") and name.endswith(".weight") and "norm" not in name:
            cls = _GGML_CLASS.get(types.get(name, ""), "int4")
            by_class[cls] = by_class.get(cls, 0) + n
    return max(by_class, key=by_class.get) if by_class else "fp32"


def gguf_weight_bytes(spec: ModelSpec):
    """The ggml backend's weights: the GGUF's tensors, byte for byte (the bundle carries the file)."""
    from ..build.precision import WeightBytes

    sizes = dict(dict(spec.extras).get("tensor_bytes", ()))
    if not sizes:
        raise UserInputError("the ggml-cpu backend runs GGUF files only: give a .gguf model, or use "
                             "--backend onnxruntime-cpu")
    embedding = sizes.get("token_embd.weight", 0)
    lm_head = sizes.get("output.weight", 0)
    linears = sum(n for k, n in sizes.items() if k.startswith("blk.") and k.endswith(".weight") and "norm" not in k)
    small = sum(sizes.values()) - embedding - lm_head - linears
    largest = max(sizes.items(), key=lambda kv: kv[1])
    src = "the GGUF's tensors as stored (memory-mapped; llama.cpp runs these blocks)"
    return WeightBytes(linears, embedding, lm_head, small,
                       {"linears": src, "embedding": src, "lm_head": src if lm_head else "tied: the embedding",
                        "small": "norms, biases as stored"}, (largest[0], largest[1]))
