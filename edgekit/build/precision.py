"""Precision policy: how each weight precision stores every kind of tensor. The single source.

The planner sizes a model with this table and the exporter quantizes with it, so a bundle is exactly as
big as ``edgekit plan`` said. The table is data (``POLICIES``); the only code here turns a format and a
tensor shape into bytes.

Choices, and why:

- Linear layers carry almost all the parameters, so they get the requested precision. INT8 is weight-only
  with one fp16 scale per output channel; INT4 is weight-only, symmetric, with one fp16 scale per block of
  32 input features (what onnxruntime's MatMulNBits and TensorRT's INT4 weight-only GEMM consume), packed
  two values per byte. FP8 (E4M3) has one fp32 scale per tensor, as TensorRT's FP8 GEMMs take it.
- The embedding and the LM head are the two largest single tensors (151,936 x hidden for Qwen) and the LM
  head decides which token comes next, so at INT4/INT8 both stay INT8 (per row / per output channel, fp16
  scales): half the fp16 size, with none of INT4's damage to the logits. At FP8 they stay fp16; at
  fp32/fp16/bf16 they are stored like the linears.
- Norm weights and biases are tiny and numerically sensitive: stored in the compute dtype.
- The compute dtype (activations, norms, KV cache): onnxruntime on the CPU computes in fp32; GPUs compute in
  fp16, except fp32 and bf16 models which keep their own dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import UnsupportedPrecision
from ..runtime.dtypes import DTYPE_BYTES

if TYPE_CHECKING:
    from ..spec import ModelSpec

# Every precision edgekit knows, from the most to the least faithful.
PRECISIONS: tuple[str, ...] = ("fp32", "fp16", "bf16", "fp8", "int8", "int4")
# The order used when listing valid choices to a user: smallest first.
PRECISIONS_SMALL_FIRST: tuple[str, ...] = ("int4", "int8", "fp8", "fp16", "bf16", "fp32")

# Activation / KV-cache / norm dtype by device and weight precision.
COMPUTE_DTYPE: dict[str, dict[str, str]] = {
    "gpu": {"fp32": "fp32", "fp16": "fp16", "bf16": "bf16", "fp8": "fp16", "int8": "fp16", "int4": "fp16"},
    # onnxruntime's CPU kernels run fp32 (quantized MatMuls dequantize to fp32).
    "cpu": {p: "fp32" for p in PRECISIONS},
}


@dataclass(frozen=True)
class WeightFormat:
    """How one kind of 2-D weight (rows = output features or vocabulary, cols = input features) is stored."""

    dtype: str                       # element type of the stored values
    scheme: str = "dense"            # dense | per-channel / per-row (one scale per row) | per-tensor | block
    block_size: int = 0              # scheme "block": input features per scale
    scale_dtype: str | None = None   # dtype of the scales (no zero points: every scheme is symmetric)

    def nbytes(self, rows: int, cols: int) -> int:
        """Bytes of the stored values plus their scales for a (rows, cols) weight."""
        return self.data_nbytes(rows, cols) + self.scale_nbytes(rows, cols)

    def data_nbytes(self, rows: int, cols: int) -> int:
        """The values alone: one contiguous allocation."""
        if self.scheme == "block":
            # Each row is padded to whole blocks; INT4 packs two values per byte.
            blocks = -(-cols // self.block_size)
            return int(rows * blocks * self.block_size * DTYPE_BYTES[self.dtype])
        return int(rows * cols * DTYPE_BYTES[self.dtype])

    def scale_nbytes(self, rows: int, cols: int) -> int:
        if self.scale_dtype is None:
            return 0
        count = {"per-channel": rows, "per-row": rows, "per-tensor": 1,
                 "block": rows * -(-cols // max(self.block_size, 1))}.get(self.scheme, 0)
        return int(count * DTYPE_BYTES[self.scale_dtype])

    def describe(self) -> str:
        """Short text for plan tables, e.g. ``int4 block 32, fp16 scales``."""
        if self.scheme == "dense":
            return f"{self.dtype} dense"
        scheme = f"block {self.block_size}" if self.scheme == "block" else self.scheme
        return f"{self.dtype} {scheme}, {self.scale_dtype} scales"


@dataclass(frozen=True)
class PrecisionPolicy:
    precision: str
    linear: WeightFormat
    embedding: WeightFormat
    lm_head: WeightFormat
    int4_block_size: int = 0


_DENSE = {d: WeightFormat(d) for d in ("fp32", "fp16", "bf16")}
# The same bytes, named for what a scale covers: an output channel of a linear, a token row of the embedding.
_INT8_CHANNELS = WeightFormat("int8", "per-channel", scale_dtype="fp16")
_INT8_ROWS = WeightFormat("int8", "per-row", scale_dtype="fp16")
INT4_BLOCK_SIZE = 32

POLICIES: dict[str, PrecisionPolicy] = {
    "fp32": PrecisionPolicy("fp32", _DENSE["fp32"], _DENSE["fp32"], _DENSE["fp32"]),
    "fp16": PrecisionPolicy("fp16", _DENSE["fp16"], _DENSE["fp16"], _DENSE["fp16"]),
    "bf16": PrecisionPolicy("bf16", _DENSE["bf16"], _DENSE["bf16"], _DENSE["bf16"]),
    "fp8": PrecisionPolicy("fp8", WeightFormat("fp8", "per-tensor", scale_dtype="fp32"),
                           _DENSE["fp16"], _DENSE["fp16"]),
    "int8": PrecisionPolicy("int8", _INT8_CHANNELS, _INT8_ROWS, _INT8_CHANNELS),
    "int4": PrecisionPolicy("int4", WeightFormat("int4", "block", INT4_BLOCK_SIZE, "fp16"),
                            _INT8_ROWS, _INT8_CHANNELS, int4_block_size=INT4_BLOCK_SIZE),
}


def policy(precision: str, *, int4_block_size: int | None = None) -> PrecisionPolicy:
    """The policy of a precision; ``int4_block_size`` overrides the INT4 block (16, 32, 64, 128...)."""
    try:
        p = POLICIES[precision]
    except KeyError:
        raise UnsupportedPrecision(
            f"unknown precision {precision!r}: use one of {', '.join(PRECISIONS_SMALL_FIRST)}") from None
    if int4_block_size is None or precision != "int4":
        return p
    if int4_block_size < 16 or int4_block_size & (int4_block_size - 1):
        raise UnsupportedPrecision(
            f"invalid INT4 block size {int4_block_size}: use a power of two >= 16, e.g. 32 or 128")
    block = WeightFormat("int4", "block", int4_block_size, "fp16")
    return PrecisionPolicy("int4", block, p.embedding, p.lm_head, int4_block_size=int4_block_size)


def _on_cpu(pol: PrecisionPolicy) -> PrecisionPolicy:
    """onnxruntime's CPU MatMulNBits takes scales in the activation type (fp32), and its INT8 LM head is
    stored in blocks of 128 input features (one scale per block); the embedding keeps one scale per row."""
    def fp32(f: WeightFormat) -> WeightFormat:
        return WeightFormat(f.dtype, f.scheme, f.block_size, "fp32") if f.scale_dtype == "fp16" else f

    head = pol.lm_head
    if head.dtype == "int8":
        head = WeightFormat("int8", "block", 128, "fp32")
    return PrecisionPolicy(pol.precision, fp32(pol.linear), fp32(pol.embedding), head, pol.int4_block_size)


def compute_dtype(precision: str, device: str) -> str:
    """Dtype of activations, norms and the KV cache for weights at ``precision`` on ``device`` (gpu/cpu)."""
    return COMPUTE_DTYPE[device][precision]


@dataclass(frozen=True)
class WeightBytes:
    """Bytes of each component of a model's weights at one precision; ``sources`` say how each was counted."""

    linears: int
    embedding: int
    lm_head: int
    small: int
    sources: dict[str, str]
    largest_tensor: tuple[str, int]     # (component, bytes of its values): the largest single allocation
    repacked: int = 0                   # what the backend's kernels hold beyond the stored bytes (onnxruntime CPU)

    @property
    def total(self) -> int:
        return self.linears + self.embedding + self.lm_head + self.small


def weight_bytes(spec: ModelSpec, precision: str, device: str = "gpu", *,
                 int4_block_size: int | None = None, dialect: str | None = None, context: int | None = None,
                 quant=None) -> WeightBytes:
    """What the weights of ``spec`` take at ``precision`` when run on ``device`` ("gpu" or "cpu").

    With ``dialect`` and ``context`` (what ``edgekit plan`` passes), a precision ``edgekit build`` writes is
    counted exactly as the builder writes it (:func:`edgekit.quant.sizes.build_weight_bytes`, which also reads
    a GGUF's real tensor types); otherwise, and for fp8/bf16, from the policy table below.
    """
    from ..quant.sizes import BUILDABLE, QuantSettings, build_weight_bytes

    if dialect is not None and context is not None and precision in BUILDABLE:
        graph_float = "fp32" if compute_dtype(precision, device) == "fp32" else "fp16"
        if quant is None and int4_block_size is not None:
            quant = QuantSettings(block_size=int4_block_size)
        return build_weight_bytes(spec, dialect=dialect, precision=precision, graph_float=graph_float,
                                  context=context, quant=quant)
    pol = policy(precision, int4_block_size=int4_block_size)
    small_dtype = compute_dtype(precision, device)
    if device == "cpu":
        pol = _on_cpu(pol)
    h, vocab, layers = spec.hidden_size, spec.vocab_size, spec.num_layers

    linears = layers * sum(pol.linear.nbytes(o, i) for o, i in spec.linear_shapes.values())
    embedding = pol.embedding.nbytes(vocab, h)
    lm_head = 0 if spec.tie_word_embeddings else pol.lm_head.nbytes(vocab, h)
    # Per-layer norms and biases, plus the final norm.
    small_params = layers * spec.small_params_per_layer + h
    small = int(small_params * DTYPE_BYTES[small_dtype])

    shapes = ", ".join(f"{k} {o}x{i}" for k, (o, i) in spec.linear_shapes.items())
    sources = {
        "linears": f"{pol.linear.describe()}; {layers} layers x ({shapes})",
        "embedding": f"{pol.embedding.describe()}; {vocab} x {h}",
        "lm_head": ("tied to the embedding (stored once)" if spec.tie_word_embeddings
                    else f"{pol.lm_head.describe()}; {vocab} x {h}"),
        "small": f"{small_params:,} norm weights and biases in {small_dtype}",
    }
    # The LM head first: on a tie it is the one named (it is the allocation seen failing on Jetson).
    candidates = [] if spec.tie_word_embeddings else [("lm_head", pol.lm_head.data_nbytes(vocab, h))]
    candidates.append(("embedding", pol.embedding.data_nbytes(vocab, h)))
    name, (o, i) = max(spec.linear_shapes.items(), key=lambda kv: pol.linear.data_nbytes(*kv[1]))
    candidates.append((f"{name} weight of one layer", pol.linear.data_nbytes(o, i)))
    largest = max(candidates, key=lambda c: c[1])
    return WeightBytes(linears, embedding, lm_head, small, sources, largest)
