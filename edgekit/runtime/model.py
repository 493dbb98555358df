"""``load(bundle)`` -> a :class:`Model` that generates text; the entry point robot code imports."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import BackendUnavailable, BundleError, GenerationError
from . import aio
from .answer_format import AnswerFormat
from .bundle import read_manifest, verify
from .generate import Event, GenerationRequest, GenerationResult, run
from .memory import check_budget, graph_memory, rotary_rows
from .onnx_refs import read_graph
from .reasoning import prompt_opens_thinking
from .sampling import SamplingParams
from .speculative import Speculation, check_draft, make_drafter
from .text import TextCodec

ORT_BACKENDS = ("onnxruntime-cpu", "onnxruntime-cuda")
BACKENDS = ("auto", *ORT_BACKENDS, "tensorrt", "ggml-cpu")


def _parse_budget(value) -> int | None:
    if value is None:
        return None
    from ..units import parse_size  # stdlib-only module

    return parse_size(value)


class Model:
    """A loaded bundle. One generation runs at a time (the device holds one KV cache); calls are serialised."""

    def __init__(self, manifest, decoder, codec: TextCodec, max_context: int, memory_need, *,
                 prefix_reuse: bool = True, speculative: Speculation | None = None, draft=None):
        self.manifest = manifest
        self.spec = decoder.spec
        self.decoder = decoder
        self.codec = codec
        self.max_context = max_context
        self.memory = memory_need
        self.defaults: dict[str, Any] = dict(manifest.generation)
        self.eos_ids = set(manifest.tokenizer.get("eos_token_ids") or []) | set(self.spec.eos_token_ids)
        self.prefill_chunk = int(manifest.memory.get("prefill_chunk", 256))
        # Keep the KV rows of the last sequence and prefill only from the first differing token id (a settable
        # attribute: False prefills every prompt from scratch).
        self.prefix_reuse = prefix_reuse
        # Speculative decoding (off: None); ``draft`` is the draft bundle's Model when it drafts with one.
        self.speculative = speculative
        self.draft = draft
        self._lock = threading.Lock()

    # ----- prompt handling ----------------------------------------------------------------------
    def render(self, prompt: str | None = None, messages: list[dict] | None = None,
               tools: list[dict] | None = None) -> tuple[str, bool]:
        """(text to tokenize, whether it is a rendered chat template). ``tools`` is the template's ``tools``
        variable (OpenAI-shaped definitions; see :mod:`edgekit.runtime.tools` for templates that ignore it)."""
        if (prompt is None) == (messages is None):
            raise GenerationError("give either a prompt or messages, not both or neither")
        if messages is not None:
            return self.codec.render(messages, add_generation_prompt=True, **({"tools": tools} if tools else {})), True
        if not isinstance(prompt, str):
            raise GenerationError(f"the prompt must be a string, got {type(prompt).__name__}")
        return prompt, False

    def chat_prompt(self, text: str) -> list[dict]:
        """A one-turn conversation; R1 bundles use no system prompt (DeepSeek's published guidance)."""
        return [{"role": "user", "content": text}]

    def request(self, prompt: str | None = None, *, messages: list[dict] | None = None,
                max_new_tokens: int | None = None, temperature: float | None = None, top_k: int | None = None,
                top_p: float | None = None, min_p: float | None = None, repetition_penalty: float | None = None,
                seed: int | None = None, stop: list[str] | tuple[str, ...] | str | None = None,
                thinking_budget: int | None = None, truncate: bool = False, ignore_eos: bool = False,
                answer_format: AnswerFormat | None = None, tools: list[dict] | None = None) -> GenerationRequest:
        """Render, tokenize and check one request. ``answer_format`` (e.g. ``json_answer(schema)``) constrains the
        answer (after an R1 thought): a bad format raises FormatError here, before anything is generated; a
        missing constraint library raises FormatUnavailable naming the extra to install."""
        d = self.defaults
        text, templated = self.render(prompt, messages, tools)
        ids = self.codec.encode(text, add_special_tokens=not templated)
        if max_new_tokens is not None and (not isinstance(max_new_tokens, int) or max_new_tokens < 1):
            raise GenerationError(f"invalid max_new_tokens {max_new_tokens!r}: use a whole number >= 1")
        if truncate and len(ids) >= self.max_context:
            keep = max(1, self.max_context - (max_new_tokens or max(1, self.max_context // 4)))
            ids = ids[-keep:]
        if isinstance(stop, str):
            stop = [stop]
        if stop is not None and not all(isinstance(s, str) for s in stop):
            raise GenerationError("stop must be a string or a list of strings")
        if thinking_budget is not None and (not isinstance(thinking_budget, int) or thinking_budget < 0):
            raise GenerationError(f"invalid thinking_budget {thinking_budget!r}: use a whole number of tokens >= 0")
        if answer_format is not None:   # compiled now (and cached) so that a bad schema fails before generation
            from .constrain import check

            check(answer_format, self.codec, self.decoder.vocab, self.eos_ids)
        sampling = SamplingParams(
            temperature=d.get("temperature", 0.0) if temperature is None else temperature,
            top_k=d.get("top_k", 0) if top_k is None else top_k,
            top_p=d.get("top_p", 1.0) if top_p is None else top_p,
            min_p=d.get("min_p", 0.0) if min_p is None else min_p,
            repetition_penalty=d.get("repetition_penalty", 1.0) if repetition_penalty is None else repetition_penalty,
            seed=seed)
        return GenerationRequest(
            prompt_ids=ids, sampling=sampling,
            max_new_tokens=max_new_tokens if max_new_tokens is not None else d.get("max_new_tokens"),
            stop=tuple(stop or ()), thinking_budget=thinking_budget,
            in_reasoning=templated and prompt_opens_thinking(text), ignore_eos=ignore_eos,
            answer_format=answer_format)

    # ----- generation ---------------------------------------------------------------------------
    def stream(self, prompt: str | None = None, *, cancel: threading.Event | None = None, **kw) -> Iterator[Event]:
        """Events as they are produced: "reasoning"/"answer" text deltas, then "done" with the result."""
        started = time.perf_counter()
        req = self.request(prompt, **kw)
        with self._lock:
            yield from run(self.decoder, self.codec, req, prefill_chunk=self.prefill_chunk, eos_ids=self.eos_ids,
                           cancel=cancel, started=started, reuse=self.prefix_reuse, **self.speculation())

    def speculation(self) -> dict:
        """The ``run`` arguments for speculative decoding as configured (a fresh drafter per request)."""
        if self.speculative is None:
            return {}
        return {"speculative": self.speculative, "drafter": make_drafter(self.speculative, self.draft)}

    def generate(self, prompt: str | None = None, **kw) -> GenerationResult:
        for event in self.stream(prompt, **kw):
            if event.kind == "done":
                return event.result
        raise GenerationError("generation ended without a result")  # unreachable: run() always ends with done

    def astream(self, prompt: str | None = None, **kw):
        """``stream`` for asyncio (``async for event in model.astream(...)``): :mod:`edgekit.runtime.aio`."""
        return aio.astream(self, prompt, **kw)

    async def agenerate(self, prompt: str | None = None, **kw) -> GenerationResult:
        """``generate`` for asyncio: :mod:`edgekit.runtime.aio`."""
        return await aio.agenerate(self, prompt, **kw)

    def count_tokens(self, prompt: str | None = None, *, messages: list[dict] | None = None,
                     tools: list[dict] | None = None) -> int:
        text, templated = self.render(prompt, messages, tools)
        return len(self.codec.encode(text, add_special_tokens=not templated))

    def close(self) -> None:
        """Release the decoder now: the TensorRT backend frees its GPU buffers and stream (onnxruntime's session
        goes with its last reference). The Model cannot generate afterwards."""
        decoder, self.decoder = self.decoder, None
        close = getattr(decoder, "close", None)
        if close is not None:
            close()
        if self.draft is not None:
            self.draft.close()


def load(bundle: str | Path, *, max_context: int | None = None, memory_budget: int | str | None = None,
         backend: str = "auto", threads: int | None = None, verify_weights: bool = False,
         prefix_reuse: bool = True, speculative=None) -> Model:
    """Load a bundle, checking it and the memory budget before anything is allocated.

    - The manifest is validated and every file's size checked; small files (graph, tokenizer, template) are
      hashed. ``verify_weights=True`` hashes the weights too: on a Jetson that reads GBs and takes tens of
      seconds, so it is off by default (``edgekit verify`` or ``edgekit flash`` do it once per copy).
    - ``max_context`` (<= the bundle's) sets the KV cache size; the cache is allocated once, at load.
    - ``memory_budget`` (bytes or "3.5GiB") caps what edgekit may use below what the device has free.
    - ``backend``: "auto" (the bundle's), "onnxruntime-cpu", "onnxruntime-cuda", "tensorrt" or "ggml-cpu" (GGUF
      bundles only: llama.cpp's kernels, runtime/ggml_backend.py).
    - ``prefix_reuse`` (default on): a request whose prompt token ids start like the previous sequence (prompt
      and generated tokens) keeps those KV rows and prefills only the rest; ``result.cached_tokens`` says how many.
    - ``speculative`` (default off): "ngram" drafts by prompt lookup, a path drafts with that bundle (same
      tokenizer, loaded with this max_context/backend/threads), or a :class:`Speculation` with its settings; the
      model checks each draft in one step (:mod:`edgekit.runtime.speculative`, which says when greedy output is
      identical to plain decoding). ``result.drafted``/``accepted`` count the drafts.
    Raises BundleError, BudgetExceeded, BackendUnavailable; never exits, never touches the network.
    """
    manifest = read_manifest(bundle)
    verify(bundle, weights=verify_weights).raise_for_problems()
    chosen = _choose_backend(manifest, backend, bundle)
    if chosen == "ggml-cpu":
        return _load_ggml(manifest, bundle, max_context=max_context, memory_budget=memory_budget, threads=threads,
                          prefix_reuse=prefix_reuse, speculative=speculative)
    graph_path = manifest.path(manifest.graph["file"])
    try:   # verify() read it too: what the graph reads is a file of the bundle
        info = read_graph(graph_path.read_bytes())
    except (ValueError, RecursionError) as e:
        raise BundleError(f"{graph_path} is not a readable ONNX model ({e}): rebuild or re-copy the bundle") from None
    context, fits = _context(manifest, info, max_context, bundle)
    need = check_budget(graph_memory(manifest, info), context, budget=_parse_budget(memory_budget),
                        bundle_context=fits)
    codec = _text_codec(manifest)
    if chosen == "tensorrt":   # probes the GPU and checks the engine before TensorRT is imported
        from .trt_backend import open_engine_decoder

        model = Model(manifest, open_engine_decoder(manifest, capacity=context), codec, context, need,
                      prefix_reuse=prefix_reuse)
        _speculate(model, Speculation.of(speculative), bundle=bundle)    # raises: TensorRT cannot verify yet
        return model
    from .ort_backend import OrtDecoder

    decoder = OrtDecoder(str(graph_path), dialect=manifest.dialect, spec=manifest.spec(),
                         capacity=context, kv_dtype=manifest.graph.get("kv_dtype", "float32"), backend=chosen,
                         threads=threads)
    model = Model(manifest, decoder, codec, context, need, prefix_reuse=prefix_reuse)
    _speculate(model, Speculation.of(speculative), bundle=bundle, backend=backend, threads=threads,
               memory_budget=memory_budget)
    return model


def _load_ggml(manifest, bundle, *, max_context, memory_budget, threads, prefix_reuse, speculative) -> Model:
    """A ggml-cpu bundle: the budget checked from the manifest's model section and the GGUF's verified size, then
    llama.cpp maps the file and allocates its cache (runtime/ggml_backend.py)."""
    from .ggml_backend import GgmlDecoder, ggml_memory

    built = int(manifest.max_context)
    context = built if max_context is None else max_context
    if not isinstance(context, int) or isinstance(context, bool) or not 2 <= context <= built:
        raise GenerationError(f"invalid max_context {max_context!r}: this bundle supports 2 .. {built}")
    memory = ggml_memory(manifest)
    need = check_budget(memory, context, budget=_parse_budget(memory_budget), bundle_context=built)
    codec = _text_codec(manifest)    # before llama.cpp allocates: a broken tokenizer fails cheaply
    decoder = GgmlDecoder(str(manifest.path(manifest.graph["file"])), spec=manifest.spec(), capacity=context,
                          n_ubatch=int(memory.get("prefill_chunk", 128)), threads=threads)
    model = Model(manifest, decoder, codec, context, need, prefix_reuse=prefix_reuse)
    _speculate(model, Speculation.of(speculative), bundle=bundle, backend="auto", threads=threads,
               memory_budget=memory_budget)
    return model


def _choose_backend(manifest, backend: str, bundle) -> str:
    """The backend to run ``manifest`` with: the bundle's for "auto", else ``backend`` if it can run it."""
    if backend not in BACKENDS:
        raise BackendUnavailable(f"unknown backend {backend!r}: use one of {', '.join(BACKENDS)}")
    chosen = manifest.backend if backend == "auto" else backend
    if (chosen == "ggml-cpu") != (manifest.backend == "ggml-cpu"):   # a GGUF bundle has no ONNX graph, and back
        raise BackendUnavailable(
            f"bundle {bundle} is built for {manifest.backend}, which {chosen} cannot run: load it with "
            f"--backend {manifest.backend} (or auto), or rebuild it (edgekit build MODEL --target cpu --backend "
            f"{chosen})")
    if chosen not in (*ORT_BACKENDS, "tensorrt", "ggml-cpu"):
        raise BundleError(f"bundle {bundle} is for backend {chosen!r}, which this edgekit does not know: "
                          "upgrade edgekit, or rebuild the bundle")
    if chosen == "tensorrt" and manifest.backend != "tensorrt":   # TensorRT runs only the tensorrt dialect + engine
        raise BackendUnavailable(
            f"bundle {bundle} is built for {manifest.backend} (target {manifest.target['name']}), not TensorRT: "
            f"run it with the {manifest.backend} backend (--backend {manifest.backend}, or auto), or build a "
            "TensorRT bundle for a GPU target (edgekit build MODEL --target orin-nano)")
    return chosen


def _context(manifest, info, max_context: int | None, bundle) -> tuple[int, int]:
    """(the KV cache size to load with, the largest the bundle really supports: the manifest's max_context
    within the positions its graph's rotary tables cover)."""
    built = int(manifest.max_context)
    context = built if max_context is None else max_context
    if not isinstance(context, int) or isinstance(context, bool) or not 2 <= context <= built:
        raise GenerationError(f"invalid max_context {max_context!r}: this bundle supports 2 .. {built}")
    rows = rotary_rows(manifest, info)
    if context > rows:   # onnxruntime would fail mid-generation, at the first position past the table
        raise BundleError(f"bundle {bundle} claims max_context {built} but its graph's rotary tables cover "
                          f"{rows} positions: the manifest is corrupt or hostile; rebuild the bundle, or load "
                          f"with max_context <= {rows}")
    return context, min(built, rows)


def _text_codec(manifest) -> TextCodec:
    """The bundle's tokenizer and chat template."""
    tok = manifest.tokenizer
    template_name = tok.get("chat_template")
    return TextCodec(manifest.path(tok["file"]).read_text(encoding="utf-8"),
                     manifest.path(template_name).read_text(encoding="utf-8") if template_name else None, tok)


def _speculate(model: Model, spec: Speculation | None, **load_kw) -> None:
    """Set up speculative decoding on a loaded model (raises before the model is returned)."""
    if spec is None:
        return
    if not getattr(model.decoder, "can_verify", False):
        raise BundleError(f"bundle {load_kw['bundle']} cannot verify drafts (its graph returns the last token's "
                          "logits only: built by an older edgekit, or for TensorRT): rebuild it with this edgekit, "
                          "or load it without speculative")
    if spec.draft != "ngram":
        draft = spec.draft
        if not isinstance(draft, Model):
            try:
                draft = load(draft, max_context=model.max_context, backend=load_kw["backend"],
                             threads=load_kw["threads"], memory_budget=load_kw["memory_budget"], prefix_reuse=False)
            except GenerationError as e:   # its max_context is smaller than the model's
                raise BundleError(f"draft bundle {spec.draft}: {e}") from None
        check_draft(model, draft)
        model.draft = draft
    model.speculative = spec
