"""The memory planner: will this model, at this precision and context, fit this device?

``plan(spec, target, precision=..., context=...)`` adds up, without loading a weight:

- weights at the precision (linears, embedding, LM head, norms and biases; see :mod:`edgekit.build.precision`),
- the static KV cache for the whole context (the runtime allocates it once, up front),
- the workspace of one prefill step (activations of one layer for one chunk of prompt tokens, the
  fp32 attention scores of that chunk against the whole context, the last token's logits),
- the backend's fixed overhead (CUDA context, TensorRT/cuBLAS libraries...), from the target file,

and compares the sum with the target's budget. Every number carries a short ``source`` saying how it was
counted, so a table can show its working. Nothing here prints.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import UserInputError
from ..quant.sizes import DIALECT_OF_BACKEND, gguf_precision, gguf_weight_bytes
from ..runtime.ggml_backend import ggml_compute_bytes
from ..spec import ModelSpec
from ..units import fmt_bytes
from .precision import DTYPE_BYTES, PRECISIONS, compute_dtype, weight_bytes
from .target import Target, check_combination

SCORE_DTYPE = "fp32"      # attention scores and softmax run in fp32 for accuracy, whatever the weights
LOGITS_DTYPE = "fp32"
NEAR_FULL = 0.9           # warn above this share of the budget


@dataclass(frozen=True)
class Line:
    """One number of a plan: what it is, its bytes, and where it comes from."""

    name: str
    bytes: int
    source: str

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "bytes": self.bytes, "source": self.source}


@dataclass(frozen=True)
class Plan:
    model: str
    target: str
    backend: str
    precision: str
    context: int
    prefill_chunk: int
    parameters: int
    kv_dtype: str
    kv_bytes_per_token: int
    weights: tuple[Line, ...]         # linears, embedding, lm_head, small
    kv: Line
    workspace: tuple[Line, ...]       # hidden states, MLP, attention scores, logits
    overhead: Line
    budget: Line
    largest_allocation: Line
    fits: bool
    max_context: int                  # largest context that fits (capped at the model's maximum); 0: none
    fitting_precision: str | None     # when it does not fit: the most faithful precision that would
    decode_tokens_per_s: float        # memory-bandwidth upper bound at the full context
    warnings: tuple[str, ...] = ()
    # when it does not fit: every other (backend, precision) of the target that fits at this context
    fits_with: tuple[tuple[str, str], ...] = ()
    compute_dtype: str = ""           # the graph's float type (kv_dtype differs with an int8 KV cache)

    @property
    def weights_bytes(self) -> int:
        return sum(w.bytes for w in self.weights)

    @property
    def kv_bytes(self) -> int:
        return self.kv.bytes

    @property
    def workspace_bytes(self) -> int:
        return sum(w.bytes for w in self.workspace)

    @property
    def overhead_bytes(self) -> int:
        return self.overhead.bytes

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.kv_bytes + self.workspace_bytes + self.overhead_bytes

    @property
    def budget_bytes(self) -> int:
        return self.budget.bytes

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model, "target": self.target, "backend": self.backend, "precision": self.precision,
            "context": self.context, "prefill_chunk": self.prefill_chunk,
            "parameters": self.parameters,
            "weights_bytes": self.weights_bytes, "kv_bytes": self.kv_bytes,
            "workspace_bytes": self.workspace_bytes, "overhead_bytes": self.overhead_bytes,
            "total_bytes": self.total_bytes, "budget_bytes": self.budget_bytes,
            "fits": self.fits, "max_context": self.max_context, "fitting_precision": self.fitting_precision,
            "fits_with": [{"backend": b, "precision": p} for b, p in self.fits_with],
            "kv_dtype": self.kv_dtype, "kv_bytes_per_token": self.kv_bytes_per_token,
            "largest_allocation": self.largest_allocation.name,
            "largest_allocation_bytes": self.largest_allocation.bytes,
            "decode_tokens_per_s_bound": round(self.decode_tokens_per_s, 1),
            "breakdown": {
                "weights": [w.to_dict() for w in self.weights],
                "kv_cache": self.kv.to_dict(),
                "workspace": [w.to_dict() for w in self.workspace],
                "overhead": self.overhead.to_dict(),
                "budget": self.budget.to_dict(),
                "largest_allocation": self.largest_allocation.to_dict(),
            },
            "warnings": list(self.warnings),
        }


def plan(spec: ModelSpec, target: Target, *, precision: str, context: int, backend: str | None = None,
         budget: int | None = None, quant=None) -> Plan:
    """Plan ``spec`` on ``target``. ``budget`` (bytes) replaces the target's default budget. ``quant``
    (:class:`edgekit.quant.sizes.QuantSettings`) sizes INT4/INT8 weights for non-default build options."""
    chosen = check_combination(target, backend, precision)
    _check_request(spec, context, budget)
    device = chosen.device
    budget_line = (Line("budget", budget, "given by the caller") if budget is not None else
                   Line("budget", target.budget_bytes, target.budget_source))

    dialect = DIALECT_OF_BACKEND.get(chosen.name)
    _check_ggml(spec, dialect, precision)
    weights = _weights(spec, precision, device, dialect, context, quant)
    act = compute_dtype(precision, device)
    kv_dtype = _kv_dtype(act, quant, dialect)
    kv_per_token = spec.kv_bytes_per_token(kv_dtype)
    chunk = min(target.prefill_chunk, context)
    work = _workspace(spec, act, chunk, context, dialect)
    repack = (f" + {fmt_bytes(weights.repacked)} of MatMulNBits weights repacked for int8 compute (the packed "
              "form is bigger than the file; measured)" if weights.repacked else "")
    overhead = Line("runtime overhead", chosen.overhead_bytes + weights.repacked,
                    f"{chosen.name} on {target.name}: {chosen.overhead_source}{repack}")
    kv = Line("KV cache", kv_per_token * context,
              f"2 (K, V) x {spec.num_layers} layers x {spec.num_kv_heads} kv heads x {spec.head_dim} head_dim "
              f"x {kv_dtype} = {kv_per_token:,} B/token x {context} tokens (static, allocated up front)")
    weight_lines = (
        Line("linear weights", weights.linears, weights.sources["linears"]),
        Line("embedding", weights.embedding, weights.sources["embedding"]),
        Line("LM head", weights.lm_head, weights.sources["lm_head"]),
        Line("norms, biases, rotary", weights.small, weights.sources["small"]),
    )
    total = weights.total + kv.bytes + sum(w.bytes for w in work) + overhead.bytes
    fits = total <= budget_line.bytes

    def fits_at(b, p: str, ctx: int) -> bool:
        return _total(spec, target, b, p, ctx, quant) <= budget_line.bytes

    max_context = _max_context(lambda ctx: fits_at(chosen, precision, ctx), spec.max_position_embeddings)
    fitting, fits_with = (None, []) if fits else _what_fits(target, chosen, precision, context, fits_at)
    largest = _largest_allocation(spec, weights.largest_tensor, act, chunk, context)
    warnings = _warnings(spec, target, precision, largest, total if fits else None, budget_line.bytes)

    # Each decoded token reads every weight once (the embedding only one row, unless it is also the LM
    # head) and the whole KV cache at full context: bandwidth / bytes is an upper bound on tokens/s.
    read = weights.linears + weights.small + (weights.lm_head or weights.embedding) + kv.bytes
    decode = target.bandwidth_gbs * 1e9 / read

    return Plan(
        model=spec.name, target=target.name, backend=chosen.name, precision=precision, context=context,
        prefill_chunk=chunk, parameters=spec.parameters, kv_dtype=kv_dtype, kv_bytes_per_token=kv_per_token,
        weights=weight_lines, kv=kv, workspace=work, overhead=overhead, budget=budget_line,
        largest_allocation=largest, fits=fits, max_context=max_context, fitting_precision=fitting,
        decode_tokens_per_s=decode, warnings=tuple(warnings), fits_with=tuple(fits_with), compute_dtype=act,
    )


def _check_request(spec: ModelSpec, context, budget: int | None) -> None:
    if not isinstance(context, int) or context < 1:
        raise UserInputError(f"invalid context {context!r}: give a positive number of tokens, e.g. 4096")
    if context > spec.max_position_embeddings:
        raise UserInputError(
            f"context {context} is longer than {spec.name or 'the model'} supports "
            f"({spec.max_position_embeddings} positions): use a context of at most {spec.max_position_embeddings}")
    if budget is not None and budget <= 0:
        raise UserInputError(f"invalid budget {budget!r}: give a positive number of bytes, e.g. 3.5GiB")


def _total(spec: ModelSpec, target: Target, b, p: str, ctx: int, quant) -> int:
    """Total bytes of ``spec`` at precision ``p`` and context ``ctx`` on backend ``b`` of ``target``."""
    dialect = DIALECT_OF_BACKEND.get(b.name)
    if dialect == "gguf" and (p != gguf_precision(spec) or "tensor_bytes" not in dict(spec.extras)):
        return 1 << 62     # ggml-cpu runs a GGUF at its own precision only: never a fitting alternative
    w = _weights(spec, p, b.device, dialect, ctx, quant)
    a = compute_dtype(p, b.device)
    ws = sum(x.bytes for x in _workspace(spec, a, min(target.prefill_chunk, ctx), ctx, dialect))
    kv_b = spec.kv_bytes_per_token(_kv_dtype(a, quant, dialect))
    return w.total + kv_b * ctx + ws + b.overhead_bytes + w.repacked


def _weights(spec: ModelSpec, p: str, device: str, dialect: str | None, ctx: int, quant):
    if dialect == "gguf":      # the file as stored, whatever the options
        return gguf_weight_bytes(spec)
    return weight_bytes(spec, p, device, dialect=dialect, context=ctx, quant=quant)


def _check_ggml(spec: ModelSpec, dialect: str | None, precision: str) -> None:
    """ggml-cpu runs a GGUF's blocks as stored: a GGUF source, at the file's own precision."""
    if dialect != "gguf":
        return
    own = gguf_precision(spec) if "tensor_bytes" in dict(spec.extras) else None
    if own is None:
        gguf_weight_bytes(spec)    # raises: not a GGUF
    if precision != own:
        raise UserInputError(f"the ggml-cpu backend runs this GGUF's blocks as stored ({own}), not {precision}: "
                             f"omit --precision (or use --precision {own}), or use --backend onnxruntime-cpu "
                             "to re-quantize")


def _what_fits(target: Target, chosen, precision: str, context: int,
               fits_at) -> tuple[str | None, list[tuple[str, str]]]:
    """When the plan does not fit: the most faithful other precision of the chosen backend that does, and
    every other (backend, precision) of the target that does, at this context."""
    fitting = None
    for p in PRECISIONS:    # most faithful first
        if p != precision and p in chosen.precisions and fits_at(chosen, p, context):
            fitting = p
            break
    # the other backends too: a 4 GB Jetson that cannot hold TensorRT's runtime may run onnxruntime-cpu
    fits_with = [(b.name, p) for b in sorted(target.backends, key=lambda b: b.name != chosen.name)
                 for p in PRECISIONS if p in b.precisions and (b.name, p) != (chosen.name, precision)
                 and fits_at(b, p, context)]
    return fitting, fits_with


def _warnings(spec: ModelSpec, target: Target, precision: str, largest: Line, fitting_total: int | None,
              budget: int) -> list[str]:
    """The CMA pool warning on Jetsons and the near-full warning (``fitting_total``: None when it does not fit)."""
    warnings = []
    if target.kind == "jetson" and target.cma_bytes and largest.bytes > target.cma_bytes:
        fix = "enlarge the pool (cma= on the kernel command line, then check CmaTotal in /proc/meminfo)"
        int8_head = spec.vocab_size * spec.hidden_size        # int4/int8 store the LM head in int8
        if precision not in ("int4", "int8") and int8_head <= target.cma_bytes \
                and largest.name in ("LM head", "embedding"):
            fix += " or use int4/int8, which store the LM head and embedding in int8"
        warnings.append(
            f"the largest single allocation ({largest.name}, {fmt_bytes(largest.bytes)}) exceeds the "
            f"{fmt_bytes(target.cma_bytes)} CMA pool of {target.name}: allocations this large have failed "
            f"with NvMapMemAllocInternalTagged error 12 even with enough free memory; {fix}")
    if fitting_total is not None and fitting_total > NEAR_FULL * budget:
        warnings.append(f"uses {100 * fitting_total / budget:.0f}% of the budget: little headroom for "
                        "other processes or a longer context")
    return warnings


def _kv_dtype(act: str, quant, dialect: str | None) -> str:
    """The KV cache's element type: the compute type, or int8 (``--kv-cache int8``, onnxruntime graphs only);
    llama.cpp's cache is f16 (its default; runtime/ggml_backend.py)."""
    if dialect == "gguf":
        return "fp16"
    return "int8" if getattr(quant, "kv_cache", "float") == "int8" and dialect == "ort" else act


def _workspace(spec: ModelSpec, act: str, chunk: int, context: int, dialect: str | None = None) -> tuple[Line, ...]:
    """Buffers of one prefill step of ``chunk`` tokens against ``context`` positions.

    llama.cpp (``gguf``): its one compute buffer, measured (runtime/ggml_backend.py), and the last row's logits.

    An upper bound: the buffers of one layer are counted as if all were live at once (the runtime reuses
    them layer after layer, so only one layer's worth exists).
    """
    if dialect == "gguf":
        return (Line("compute buffer", ggml_compute_bytes(spec, chunk),
                     f"llama.cpp: ubatch {chunk} x (vocab {spec.vocab_size} + 2 x hidden {spec.hidden_size}) x fp32 "
                     "(measured; flash attention: no score matrix)"),
                Line("logits", int(spec.vocab_size * DTYPE_BYTES[LOGITS_DTYPE]),
                     f"output buffer, one row: {spec.vocab_size} x fp32"))
    a = DTYPE_BYTES[act]
    h, i = spec.hidden_size, spec.intermediate_size
    hidden_width = 2 * h + 2 * spec.q_size + 2 * spec.kv_size     # residual, normed, q, k, v, attention out
    s = DTYPE_BYTES[SCORE_DTYPE]
    return (
        Line("hidden states", int(chunk * hidden_width * a),
             f"chunk {chunk} x (residual {h} + normed {h} + q {spec.q_size} + k, v 2x{spec.kv_size} "
             f"+ attention out {spec.q_size}) x {act}"),
        Line("MLP intermediates", int(chunk * 3 * i * a),
             f"chunk {chunk} x 3 (gate, up, gate*up) x {i} x {act}"),
        Line("attention scores", int(chunk * context * spec.num_heads * s),
             f"chunk {chunk} x context {context} x {spec.num_heads} heads x {SCORE_DTYPE}"),
        Line("logits", int(spec.vocab_size * DTYPE_BYTES[LOGITS_DTYPE]),
             f"last token only: {spec.vocab_size} x {LOGITS_DTYPE}"),
    )


def _largest_allocation(spec: ModelSpec, weight: tuple[str, int], act: str, chunk: int, context: int) -> Line:
    """The single largest contiguous buffer: a weight, one layer's K (or V) cache, or the score buffer."""
    kv_one = context * spec.kv_size * DTYPE_BYTES[act]           # (1, kv_heads, context, head_dim) of one layer
    scores = chunk * context * spec.num_heads * DTYPE_BYTES[SCORE_DTYPE]
    candidates = [
        Line(weight[0].replace("lm_head", "LM head"), weight[1], "values of the largest weight tensor"),
        Line("K cache of one layer", int(kv_one), f"1 x {spec.num_kv_heads} x {context} x {spec.head_dim} x {act}"),
        Line("attention scores", int(scores), f"{chunk} x {context} x {spec.num_heads} heads x fp32"),
    ]
    return max(candidates, key=lambda line: line.bytes)


def _max_context(fits_at, cap: int) -> int:
    """Largest context in [1, cap] for which ``fits_at`` holds (memory grows with the context); 0 if none."""
    if not fits_at(1):
        return 0
    if fits_at(cap):
        return cap
    lo, hi = 1, cap           # fits_at(lo) and not fits_at(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits_at(mid):
            lo = mid
        else:
            hi = mid
    return lo


def choose_backend(target: Target, backend: str | None, spec: ModelSpec, precision: str | None = None) -> str | None:
    """The backend to plan and build with: the caller's, or for a GGUF on a target with ``ggml-cpu`` that one
    (the file's blocks run as stored on llama.cpp's kernels) unless ``precision`` asks for another precision than
    the file's, which only a re-encoding backend can give; ``None`` leaves the target's default."""
    # Opt-in until parity with llama.cpp is measured on a quiet machine: a target file makes it the default by
    # default_backend = "ggml-cpu" (targets/cpu.toml keeps onnxruntime-cpu for now).
    if backend is None and target.default_backend == "ggml-cpu" and "tensor_bytes" in dict(spec.extras) \
            and precision in (None, gguf_precision(spec)):
        return "ggml-cpu"
    if backend is None and target.default_backend == "ggml-cpu" and "onnxruntime-cpu" in target.backend_names:
        return "onnxruntime-cpu"   # another precision than the file's, or a float checkpoint: re-encoded
    return backend


def own_precision(backend: str | None, spec: ModelSpec) -> str | None:
    """The one precision ``ggml-cpu`` runs a GGUF at (its own); None for other backends."""
    return gguf_precision(spec) if backend == "ggml-cpu" and "tensor_bytes" in dict(spec.extras) else None
