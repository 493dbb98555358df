"""What each weight becomes in a quantized build, decided from its source type and shape alone, and the bytes
of each form. The codec (:mod:`edgekit.quant.codec`) writes by these decisions and the planner
(:mod:`edgekit.quant.sizes`) counts by them; this module imports no ONNX so that ``edgekit plan`` stays light.
"""

from __future__ import annotations

from dataclasses import dataclass

from .gguf_blocks import LOSSLESS

# INT8 LM head (MatMulNBits) block: 8-bit codes need few scales; the largest of these that divides K.
HEAD_BLOCKS = (128, 64, 32)


@dataclass(frozen=True)
class Form:
    """What one weight becomes: ``kind`` is "carry" (a GGUF type's own codes), "nbits" (MatMulNBits from
    floats), "int4"/"int8" (DequantizeLinear), "rows8" (INT8 per row); ``qtype`` for carry, ``block`` for nbits."""

    kind: str
    bits: int = 0
    block: int = 0
    qtype: str | None = None


def form_bytes(form: Form, n: int, k: int, float_bytes: int) -> int:
    """Bytes of every initializer a (N, K) weight of this form writes (codes, scales, offsets)."""
    if form.kind == "carry":
        bits, bs = LOSSLESS[form.qtype]
        codes = n * k * bits // 8
        side = {"Q4_0": 2 * n * (k // 32), "Q4_1": 4 * n * (k // 32), "Q5_0": 2 * n * (k // 32),
                "Q8_0": 2 * n * (k // 32),
                "Q4_K": 4 * n * (k // 256) + 2 * n * (k // 32),      # d, dmin fp16 + sc, m one byte each
                "Q6_K": 2 * n * (k // 256) + n * (k // 16)}[form.qtype]   # d fp16 + int8 sub-scales
        return codes + side
    if form.kind == "nbits":
        nb = -(-k // form.block)
        return n * nb * form.block * form.bits // 8 + 2 * n * nb       # fp16 scales
    if form.kind == "int4":
        return -(-n * k // 2) + (k // form.block) * n * float_bytes
    if form.kind in ("int8", "rows8"):
        return n * k + n * float_bytes
    raise ValueError(form.kind)


class FormPolicy:
    """The decisions of a quantizing codec (see :class:`edgekit.quant.codec.QuantCodec` for the options); one
    subclass per dialect (:data:`FORM_POLICIES`), shared by the planner and that dialect's codec."""

    dialect: str
    bits: int
    block_size: int
    head_bits: int
    lossless: bool
    exact: bool

    @staticmethod
    def of(dialect: str, precision: str, *, block_size: int = 32, head_bits: int = 8, lossless: bool = True,
           exact: bool = True) -> FormPolicy:
        policy = FORM_POLICIES[dialect]()
        policy.bits, policy.block_size = 4 if precision == "int4" else 8, block_size
        policy.head_bits, policy.lossless, policy.exact = head_bits, lossless, exact
        return policy

    def form_of(self, role: str, qtype: str | None, k: int, *, tied: bool = False) -> Form:
        """The form of one weight: ``role`` "linear", "embedding" or "lm_head"; ``qtype`` its GGUF type (None
        for float checkpoints or a reader without raw blocks)."""
        raise NotImplementedError


class OrtForms(FormPolicy):
    """MatMulNBits blocks: a GGUF type's own codes where they are exact, else round-to-nearest."""

    dialect = "ort"

    def _carries(self, qtype: str | None) -> bool:
        return self.lossless and qtype in LOSSLESS

    def form_of(self, role: str, qtype: str | None, k: int, *, tied: bool = False) -> Form:
        if role == "linear":
            if self._carries(qtype):
                bits = LOSSLESS[qtype][0]
                if bits == 4 or self.bits == 8 or self.exact:
                    return Form("carry", bits, LOSSLESS[qtype][1], qtype)
            return Form("nbits", self.bits, self.block_size)
        head_block = next((bs for bs in HEAD_BLOCKS if k % bs == 0), HEAD_BLOCKS[-1])
        if role == "lm_head":
            if self.head_bits == 4:
                return Form("nbits", 4, self.block_size)
            if self._carries(qtype) and LOSSLESS[qtype][0] == 8 and (qtype == "Q8_0" or self.exact):
                return Form("carry", 8, LOSSLESS[qtype][1], qtype)
            return Form("nbits", 8, head_block)
        # embedding: a tied INT8 head reads the embedding's own table; otherwise Gather decodes the rows it
        # needs from whatever the file holds (or an INT8 table when it holds floats)
        if tied and self.head_bits == 8:
            return self.form_of("lm_head", qtype, k)
        if self._carries(qtype):
            return Form("carry", *LOSSLESS[qtype], qtype=qtype)
        return Form("rows8", 8)


class TensorRTForms(FormPolicy):
    """DequantizeLinear: INT4 blocks (Q4_0 carried when its blocks allow) or INT8, tables INT8 per row."""

    dialect = "tensorrt"

    def form_of(self, role: str, qtype: str | None, k: int, *, tied: bool = False) -> Form:
        if role == "linear" or (role == "lm_head" and self.head_bits == 4):
            if self.bits == 4:
                return Form("int4", 4, self.block_size, "Q4_0" if self._trt_carries(qtype) else None)
            return Form("int8", 8)
        return Form("rows8", 8)

    def _trt_carries(self, qtype: str | None) -> bool:
        return self.lossless and qtype == "Q4_0" and self.block_size == 32


FORM_POLICIES: dict[str, type[FormPolicy]] = {p.dialect: p for p in (OrtForms, TensorRTForms)}
