"""``edgekit build``: plan -> export -> (quantize) -> package, as one function over typed stages.

``build(model, target, ...)`` writes a bundle folder (see docs/ARCHITECTURE.md for the format):

- ``manifest.json``        schema edgekit.bundle/1 (:mod:`edgekit.runtime.bundle`), sha256 of every file
- ``model.onnx``           the decoder graph (:mod:`edgekit.export.decoder` documents its inputs/outputs)
- ``model.onnx.data``      its weights
- ``tokenizer.json``       a `tokenizers` tokenizer (converted from GGUF metadata when the source is a GGUF)
- ``chat_template.jinja``  the chat template, when the model has one

Everything is written into a temporary folder next to the output and renamed into place at the end, so an
interrupted or failed build leaves nothing that looks like a bundle.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from .. import __version__
from ..errors import DoesNotFit, UserInputError
from ..export import ExportResult, GraphOptions, export_onnx
from ..export.decoder import GRAPH_REVISION
from ..quant.sizes import BUILDABLE, DIALECT_OF_BACKEND
from ..runtime.bundle import SCHEMA, write_manifest
from ..sources import ModelSource, open_weights, resolve
from ..units import fmt_bytes
from .memory_plan import Plan, choose_backend, own_precision, plan
from .staging import staged_output
from .target import Target

# What the graph builder writes: dense floats, or INT8/INT4 weights through a quantizing codec.
QUANTIZED = ("int8", "int4")
METHODS = ("auto", "rtn", "awq")
# DeepSeek's published settings for the R1 models: temperature 0.6, top-p 0.95, no system prompt.
R1_GENERATION = {"temperature": 0.6, "top_p": 0.95, "top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0,
                 "max_new_tokens": 2048, "reasoning": True, "system_prompt": False}
DEFAULT_GENERATION = {"temperature": 0.7, "top_p": 0.95, "top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0,
                      "max_new_tokens": 512, "reasoning": False, "system_prompt": True}

Progress = Callable[[str, int, int], None]   # (stage description, done, total)


@dataclass(frozen=True)
class BuildResult:
    bundle: Path
    plan: Plan
    manifest: dict


def default_precision(target: Target, backend: str | None = None) -> str:
    """The most compact precision the builder writes that the target's backend runs."""
    runs = target.backend(backend).precisions
    for p in ("int4", "int8", "fp16", "fp32"):
        if p in runs and p in BUILDABLE:
            return p
    return runs[0]


@dataclass(frozen=True)
class QuantOptions:
    """How INT8/INT4 weights are made (ignored for fp32/fp16)."""

    block_size: int = 32            # INT4 block along K
    accuracy_level: int | None = None   # MatMulNBits; None: the codec's default
    lossless: bool = True           # carry GGUF block codes over where they map exactly
    # "auto": a GGUF source keeps its own blocks (lossless) and rounds the rest to nearest; a float source
    # gets activation-aware scaling. "rtn": round to nearest only. "awq": scaling, even for a GGUF source.
    method: str = "auto"
    calibration: Path | None = None     # the user's own calibration text (default: the built-in set)
    calibration_tokens: int = 1024
    head_bits: int = 8              # the LM head: 8 (default, the precision policy) or 4 (faster, less faithful)
    # Keep every GGUF block type exactly even where that costs bytes (Q6_K/Q5_0 codes as 8-bit: a Q4_K_M file
    # becomes ~1.09x its size on onnxruntime). False (--compact-blocks) re-quantizes those to 4 bits: <= 1x the
    # GGUF, but SmolLM2 with a Q6_K ffn_down fell from 95.7% to 84.8% top-1 (benchmarks/kquant_fidelity.py).
    exact: bool = True
    # "int8": the KV cache stored as int8 with per-channel scales from a calibration prefill (ort dialect only;
    # any precision). Off by default: SmolLM2 agreed with the float cache on 97% of greedy tokens, not 99%.
    kv_cache: str = "float"

    def settings(self):
        """What of these options changes the stored bytes (the planner's view)."""
        from ..quant.sizes import QuantSettings

        return QuantSettings(block_size=self.block_size, head_bits=self.head_bits, lossless=self.lossless,
                             exact=self.exact, kv_cache=self.kv_cache)

    def __post_init__(self):
        if self.method not in METHODS:
            raise UserInputError(f"unknown quantization method {self.method!r}: use one of {', '.join(METHODS)}")
        from ..export.kv_int8 import KV_CACHE_CHOICES

        if self.kv_cache not in KV_CACHE_CHOICES:
            raise UserInputError(f"unknown KV cache type {self.kv_cache!r}: use one of {', '.join(KV_CACHE_CHOICES)}")


@dataclass(frozen=True)
class BuildPlan:
    """Everything decided before any weight is read (``preflight``)."""

    source: ModelSource
    plan: Plan
    precision: str
    options: GraphOptions | None     # None: a ggml-cpu bundle, no graph (build/gguf_bundle.py)
    quant: QuantOptions


def preflight(model: str | Path | ModelSource, target: Target, *, precision: str | None = None,
              context: int = 4096, backend: str | None = None, force: bool = False, logits: str = "last",
              quant: QuantOptions | None = None) -> BuildPlan:
    """Every check that can fail before heavy work: model, plan, precision, fit, block size."""
    source = model if isinstance(model, ModelSource) else resolve(model)
    spec = source.spec
    backend = choose_backend(target, backend, spec, precision)
    precision = precision or own_precision(backend, spec) or default_precision(target, backend)
    context = min(context, spec.max_position_embeddings)
    quant = quant or QuantOptions()
    the_plan = plan(spec, target, precision=precision, context=context, backend=backend, quant=quant.settings())
    if precision not in BUILDABLE:
        raise UserInputError(f"edgekit cannot write {precision} weights yet: build with --precision "
                             f"{' or '.join(p for p in BUILDABLE if p in target.backend(backend).precisions)}")
    if not the_plan.fits and not force:
        hint = (f"use --context {the_plan.max_context}" if the_plan.max_context >= 256 else
                f"use --precision {the_plan.fitting_precision}" if the_plan.fitting_precision else
                "use --backend {} --precision {}".format(*the_plan.fits_with[0]) if the_plan.fits_with else
                "use a bigger target")
        raise DoesNotFit(
            f"{spec.name or 'the model'} at {precision} with context {context} needs "
            f"{fmt_bytes(the_plan.total_bytes)} but {target.name} has a budget of {fmt_bytes(the_plan.budget_bytes)}: "
            f"{hint}, or pass --force to build anyway (edgekit plan shows the breakdown)")
    dialect = DIALECT_OF_BACKEND[the_plan.backend]
    if dialect == "gguf":
        from .gguf_bundle import check_runnable

        check_runnable(spec, {"kv_cache": quant.kv_cache, "logits": logits})
        return BuildPlan(source, the_plan, precision, None, quant)
    if precision == "int4" and dialect == "tensorrt":
        sizes = (spec.hidden_size, spec.intermediate_size, spec.q_size)
        uneven = sorted({k for k in sizes if k % quant.block_size})
        if uneven:
            fitting = max((b for b in (16, 32, 64, 128) if not any(k % b for k in sizes)), default=16)
            raise UserInputError(
                f"INT4 block size {quant.block_size} does not divide the input size {uneven[0]} of "
                f"{spec.name or 'this model'}'s linear layers, which TensorRT requires: use --block-size {fitting}")
    if quant.kv_cache != "float":
        from ..export.kv_int8 import check_kv_cache

        check_kv_cache(quant.kv_cache, dialect)
    graph_float = "fp32" if the_plan.compute_dtype == "fp32" else "fp16"
    options = GraphOptions(dialect=dialect, precision=graph_float, max_context=context, logits=logits)
    return BuildPlan(source, the_plan, precision, options, quant)


def build(model: str | Path | ModelSource | BuildPlan, target: Target, *, output: Path,
          precision: str | None = None, context: int = 4096, backend: str | None = None, force: bool = False,
          logits: str = "last", quant: QuantOptions | None = None, progress: Progress | None = None,
          cache_dir: Path | None = None, eval_tokens: int | None = None) -> BuildResult:
    """Build ``model`` for ``target`` into the bundle folder ``output``.

    Refuses before any heavy work when the plan does not fit (``force`` builds anyway) or when the
    precision/backend cannot run on the target. Raises EdgekitError subclasses with one-line messages.
    ``model`` may be the result of :func:`preflight` (then the other planning arguments are ignored).
    ``cache_dir``: reuse (and keep) exported graphs there (:mod:`edgekit.export.cache`).
    ``eval_tokens``: score the new bundle against its own full-precision source on that many tokens
    (:func:`edgekit.build.evaluate.evaluate`) and record the figures in the manifest's ``fidelity`` section.
    """
    bp = model if isinstance(model, BuildPlan) else preflight(
        model, target, precision=precision, context=context, backend=backend, force=force, logits=logits,
        quant=quant)
    source, spec, the_plan, precision, options, quant = bp.source, bp.source.spec, bp.plan, bp.precision, \
        bp.options, bp.quant

    output = Path(output)
    reader = open_weights(source)
    if options is None:
        try:
            return _build_gguf(reader, source, target, the_plan, output, force, progress)
        finally:
            reader.close()
    try:
        key = _cache_key(reader, options, precision, quant) if cache_dir is not None else None
        with staged_output(output, force=force) as tmp:
            exported, quantization = _export(reader, source, tmp, options, precision, quant, progress,
                                             cache_dir, key, the_plan.weights_bytes)
            if quant.kv_cache == "int8":
                _int8_kv_cache(reader, spec, tmp / exported.model_file, options, quant, the_plan, progress)
            if options.dialect == "tensorrt":     # TensorRT's parser rules, before anything is packaged
                from ..export.trt_check import require_tensorrt_graph

                require_tensorrt_graph(tmp / exported.model_file, spec,
                                       tensorrt=dict(target.software).get("tensorrt"),
                                       fix="this is an edgekit bug, please report it")
            special, template = _write_tokenizer(reader, tmp, progress)
            manifest = _manifest(source, reader.fingerprint(), spec, target, the_plan, options, exported, special,
                                 template)
            if quant.kv_cache == "int8":
                manifest["graph"]["kv_dtype"] = "int8"
                manifest["graph"]["kv_cache"]["scales"] = "per channel (kv head x head_dim), K and V, per layer"
            if quantization is not None:
                manifest["quantization"] = quantization
            manifest = write_manifest(tmp, manifest)
            if progress:
                progress("manifest", 1, 1)
            if eval_tokens:
                manifest = _record_fidelity(tmp, manifest, source, eval_tokens, progress)
    finally:
        reader.close()
    return BuildResult(output, the_plan, manifest)


def _cache_key(reader, options: GraphOptions, precision: str, quant: QuantOptions) -> str:
    """The export cache's key: everything the exported graph depends on."""
    from ..export.cache import cache_key

    return cache_key(reader.fingerprint(), options=options, precision=precision, quant=quant, graph=GRAPH_REVISION)


def _write_tokenizer(reader, tmp: Path, progress: Progress | None) -> tuple[dict, str | None]:
    """``tokenizer.json`` and ``chat_template.jinja`` (when the model has one); (special tokens, template)."""
    special = reader.special_tokens()
    (tmp / "tokenizer.json").write_text(reader.tokenizer_json(), encoding="utf-8")
    template = reader.chat_template()
    if template:
        (tmp / "chat_template.jinja").write_text(template, encoding="utf-8")
    if progress:
        progress("tokenizer", 1, 1)
    return special, template


def _record_fidelity(tmp: Path, manifest: dict, source: ModelSource, eval_tokens: int,
                     progress: Progress | None) -> dict:
    """Score the staged bundle against its own source and rewrite the manifest with a ``fidelity`` section."""
    from .evaluate import evaluate

    fidelity = evaluate(tmp, str(source.path), max_tokens=eval_tokens, progress=progress)
    manifest["fidelity"] = fidelity.to_dict()
    return write_manifest(tmp, {k: v for k, v in manifest.items() if k != "files"})


def _export(reader, source, tmp: Path, options: GraphOptions, precision: str, quant: QuantOptions,
            progress: Progress | None, cache_dir: Path | None, key: str | None, total_bytes: int | None = None):
    """The graph (from the cache when an identical export exists) and the manifest's quantization section."""
    from ..export import cache as export_cache

    if key is not None:
        meta = export_cache.restore(cache_dir, key, tmp,
                                    discarded=lambda why: progress and progress(f"export ({why})", 1, 1))
        if meta is not None:
            if progress:
                progress("export (cached)", 1, 1)
            return ExportResult(**meta["export"]), meta["quantization"]
    awq = None
    if precision in QUANTIZED and _uses_awq(quant, source):
        reader, awq = _awq_reader(reader, source.spec, precision, quant, progress)
    codec = _codec(precision, options, quant, reader)
    report = (lambda done, total: progress("export", done, total)) if progress else None
    exported = export_onnx(reader, source.spec, tmp, options, codec=codec, progress=report,
                           total_bytes=total_bytes)
    quantization = _quant_section(codec, quant, awq) if codec is not None else None
    if key is not None:
        export_cache.store(cache_dir, key, tmp, {"export": asdict(exported), "quantization": quantization})
    return exported, quantization


def _codec(precision: str, options: GraphOptions, quant: QuantOptions, reader):
    if precision not in QUANTIZED:
        return None
    from ..quant.codec import DEFAULT_ACCURACY_LEVEL, QuantCodec

    dtype = "float32" if options.precision == "fp32" else "float16"
    # An explicit level applies to every MatMulNBits (0 = exact fp32 compute, slow for the 8-bit LM head).
    level = DEFAULT_ACCURACY_LEVEL if quant.accuracy_level is None else quant.accuracy_level
    return QuantCodec(options.dialect, precision, dtype, block_size=quant.block_size, accuracy_level=level,
                      head_accuracy_level=quant.accuracy_level, head_bits=quant.head_bits, reader=reader,
                      lossless=quant.lossless, exact=quant.exact)


def _int8_kv_cache(reader, spec, graph: Path, options: GraphOptions, quant: QuantOptions, the_plan: Plan,
                   progress: Progress | None) -> None:
    """Calibrate per-channel K/V scales on the float graph just written, then switch it to an int8 cache."""
    from ..export.kv_int8 import calibrate, to_int8_cache
    from .calibration import calibration_token_batches, codec_from_reader

    sequences = calibration_token_batches(codec_from_reader(reader), quant.calibration, max_tokens=256,
                                          total_tokens=quant.calibration_tokens)
    float_kv = "float32" if options.precision == "fp32" else "float16"
    k_max, v_max = calibrate(graph, spec, float_kv, sequences, chunk=the_plan.prefill_chunk)
    to_int8_cache(graph, k_max, v_max)
    if progress:
        progress("int8 KV cache scales", 1, 1)


def _uses_awq(quant: QuantOptions, source: ModelSource) -> bool:
    return quant.method == "awq" or (quant.method == "auto" and source.kind != "gguf")


def _awq_reader(reader, spec, precision: str, quant: QuantOptions, progress: Progress | None):
    """Calibrate, search the scales, and wrap the reader so the exporter sees scaled weights."""
    from ..quant.awq import ScaledReader, compute_scales
    from .calibration import calibration_token_batches, codec_from_reader

    sequences = calibration_token_batches(codec_from_reader(reader), quant.calibration, max_tokens=256,
                                          total_tokens=quant.calibration_tokens)
    report = (lambda done, total: progress("calibrate", done, total)) if progress else None
    scales = compute_scales(reader, spec, sequences, bits=4 if precision == "int4" else 8,
                            block_size=quant.block_size if precision == "int4" else 32, progress=report)
    return ScaledReader(reader, scales), scales


def _build_gguf(reader, source: ModelSource, target: Target, the_plan: Plan, output: Path, force: bool,
                progress: Progress | None) -> BuildResult:
    """A ggml-cpu bundle: the GGUF as stored, its tokenizer and template, the manifest (build/gguf_bundle.py)."""
    from .gguf_bundle import carry_gguf, gguf_graph_section

    spec = source.spec
    with staged_output(output, force=force, expected_bytes=Path(source.path).stat().st_size) as tmp:
        weights = carry_gguf(source, tmp, progress)
        special, template = _write_tokenizer(reader, tmp, progress)
        manifest = _manifest(source, reader.fingerprint(), spec, target, the_plan, None, None, special, template,
                             weights_bytes=weights, graph=gguf_graph_section(spec))
        manifest = write_manifest(tmp, manifest)
        if progress:
            progress("manifest", 1, 1)
    return BuildResult(output, the_plan, manifest)


def _quant_section(codec, quant: QuantOptions, awq=None) -> dict:
    method = "awq" if awq is not None else ("lossless+rtn" if codec.stats.lossless else "rtn")
    extra = awq.summary() if awq is not None else {}
    head = "int8" if quant.head_bits == 8 else "embedding int8, LM head int4"
    return {**extra, "method": method, "weights": codec.precision, "block_size": quant.block_size,
            "gguf_blocks": "exact" if quant.exact else "compact",
            "embedding_and_lm_head": head, "accuracy_level": codec.accuracy_level,
            "encoding": "MatMulNBits" if codec.dialect == "ort" else "DequantizeLinear", **codec.stats.to_dict()}

def _is_r1(spec, template: str | None) -> bool:
    return "<think>" in (template or "") or "r1" in (spec.name or "").lower()


def _manifest(source: ModelSource, fingerprint: str, spec, target: Target, the_plan: Plan,
              options: GraphOptions | None, exported, special: dict, template: str | None, *,
              weights_bytes: int | None = None, graph: dict | None = None) -> dict:
    """The manifest of an ONNX bundle (``options``, ``exported``) or of a ggml-cpu one (``graph``,
    ``weights_bytes``)."""
    kv_per_token = the_plan.kv_bytes_per_token
    context = options.max_context if options is not None else the_plan.context
    weights = exported.weights_bytes if exported is not None else weights_bytes
    generation = dict(R1_GENERATION if _is_r1(spec, template) else DEFAULT_GENERATION)
    return {
        "schema": SCHEMA,
        "edgekit_version": __version__,
        "source": {"kind": source.kind, "name": Path(str(source.display)).name if source.kind == "gguf" else
                   str(source.display), "sha256": fingerprint},
        "model": spec.to_dict(),
        "target": {"name": target.name, "kind": target.kind, "compute_capability": target.sm},
        "backend": the_plan.backend,
        "dialect": options.dialect if options is not None else "gguf",
        "precision": the_plan.precision,
        "max_context": context,
        "graph": graph if graph is not None else _onnx_graph_section(options, exported),
        "memory": {"weights_bytes": weights, "kv_bytes_per_token": kv_per_token,
                   "kv_cache_bytes": kv_per_token * context,
                   "workspace_bytes": the_plan.workspace_bytes, "overhead_bytes": the_plan.overhead_bytes,
                   "prefill_chunk": the_plan.prefill_chunk,
                   "total_bytes": weights + kv_per_token * context + the_plan.workspace_bytes
                   + the_plan.overhead_bytes},
        "tokenizer": {"file": "tokenizer.json", "chat_template": "chat_template.jinja" if template else None,
                      "bos_token": special.get("bos_token"), "eos_token": special.get("eos_token"),
                      "bos_token_id": special.get("bos_token_id"),
                      "eos_token_ids": list(special.get("eos_token_ids") or spec.eos_token_ids),
                      "add_bos_token": bool(special.get("add_bos_token", False))},
        "generation": generation,
        "engine": None,
    }


def _onnx_graph_section(options: GraphOptions, exported) -> dict:
    return {"file": exported.model_file, "data": exported.data_file, "inputs": exported.inputs,
            "outputs": exported.outputs, "logits": options.logits,
            "kv_dtype": "float32" if options.precision == "fp32" else "float16",
            "kv_cache": ({"layout": "(batch, kv_heads, capacity, head_dim)", "update": "in-place (GQA)"}
                         if options.dialect == "ort" else
                         {"layout": "(batch, capacity, kv_heads, head_dim)",
                          "update": "runtime copies new_key/new_value rows"})}
