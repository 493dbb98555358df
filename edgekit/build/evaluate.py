"""``edgekit eval``: how faithful a bundle is to its full-precision reference, measured on the same tokens.

Both models read the same token sequences (teacher forcing: every position sees the true previous tokens,
never its own mistakes), and at every scored position we compare their next-token distributions:

- **top-1 agreement**: how often the bundle's most likely next token is the reference's;
- **mean KL divergence** KL(reference || bundle) in nats per token: what the bundle loses of the
  reference's distribution, 0 for identical models;
- **perplexity** of each on the text: exp(mean negative log-likelihood of the true next token).

The reference is any model source (folder, .gguf, hub id, ``smollm2``). It is exported here as an fp32
``ort`` graph that returns the logits of every position (no torch needed), into a temporary folder (or
``work_dir``, where a previous export of the same weights is reused). It must use the bundle's tokenizer.

Without a text, the reference writes one: it answers prompts of the built-in calibration set greedily,
and only its answers are scored (the prompt's template tokens are trivially predictable and would inflate
agreement). A text file is scored over every token. Memory: the reference runs in fp32, so it needs about
4 bytes per parameter of RAM (a 1.5B model: ~7 GB) beside the bundle.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .. import __version__
from ..errors import UserInputError

Progress = Callable[[str, int, int], None]   # (stage, done, total)

GENERATED = "generated"     # EvalResult.text when the reference wrote the text itself
NEW_TOKENS_PER_PROMPT = 64  # reference answers are cut here, so that more prompts (more variety) are scored
_CHUNK = 128                # reference positions per graph run: bounds the (chunk, vocab) logits it returns


# ----- the statistics ----------------------------------------------------------------------------------
def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float64, (S, V) -> (S, V)."""
    x = np.asarray(logits, dtype=np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


class FidelityStats:
    """Accumulates agreement, KL and both negative log-likelihoods over scored positions.

    ``add(reference, logits, targets)``: row i of both (S, V) arrays is the prediction at one position and
    ``targets[i]`` the token that really came next. Work is done in blocks of rows, in float64.
    """

    def __init__(self, block: int = 32):
        self.block = block
        self.count = 0
        self.agree = 0
        self.kl_sum = 0.0
        self.kl_max = 0.0
        self.nll_ref = 0.0
        self.nll = 0.0

    def add(self, reference: np.ndarray, logits: np.ndarray, targets) -> None:
        targets = np.asarray(targets, dtype=np.int64)
        if reference.shape != logits.shape or reference.ndim != 2 or len(targets) != reference.shape[0]:
            raise ValueError(f"shapes differ: reference {reference.shape}, logits {logits.shape}, "
                             f"targets {targets.shape}")
        for start in range(0, len(targets), self.block):
            ref = log_softmax(reference[start:start + self.block])      # (b, V)
            out = log_softmax(logits[start:start + self.block])         # (b, V)
            t = targets[start:start + self.block]
            rows = np.arange(len(t))
            kl = (np.exp(ref) * (ref - out)).sum(axis=-1)                # (b,)
            self.kl_sum += float(kl.sum())
            self.kl_max = max(self.kl_max, float(kl.max()))
            self.agree += int((ref.argmax(axis=-1) == out.argmax(axis=-1)).sum())
            self.nll_ref -= float(ref[rows, t].sum())
            self.nll -= float(out[rows, t].sum())
            self.count += len(t)

    def summary(self) -> dict:
        n = max(self.count, 1)
        return {"tokens": self.count, "top1_agreement": self.agree / n, "mean_kl": self.kl_sum / n,
                "max_kl": self.kl_max, "perplexity": math.exp(self.nll / n),
                "reference_perplexity": math.exp(self.nll_ref / n)}


@dataclass(frozen=True)
class EvalResult:
    reference: str              # what the user gave as --reference
    reference_sha256: str       # fingerprint of the reference weights
    text: str                   # GENERATED, or the text file scored
    sequences: int
    tokens: int                 # scored positions
    top1_agreement: float       # 0 .. 1
    mean_kl: float              # nats per token, KL(reference || bundle)
    max_kl: float
    perplexity: float           # the bundle's, on the text
    reference_perplexity: float
    seconds: float
    token_ids: list = field(default_factory=list, repr=False, compare=False)   # the scored sequences
    scored_from: list = field(default_factory=list, repr=False, compare=False)  # first predicting position of each

    def to_dict(self) -> dict:
        """The figures, as the manifest's ``fidelity`` section records them."""
        return {"reference": self.reference, "reference_sha256": self.reference_sha256, "text": self.text,
                "sequences": self.sequences, "tokens": self.tokens,
                "top1_agreement": round(self.top1_agreement, 6), "mean_kl": round(self.mean_kl, 8),
                "max_kl": round(self.max_kl, 6), "perplexity": round(self.perplexity, 5),
                "reference_perplexity": round(self.reference_perplexity, 5), "edgekit_version": __version__}


# ----- the reference model -------------------------------------------------------------------------------
class Reference:
    """A model source exported as an fp32 ``ort`` graph returning every position's logits, ready to run."""

    def __init__(self, model, *, context: int, work_dir: str | Path | None = None, threads: int | None = None,
                 progress: Progress | None = None):
        from ..sources import ModelSource, open_weights, resolve
        from .calibration import codec_from_reader

        self.source = model if isinstance(model, ModelSource) else resolve(model)
        self.spec = self.source.spec
        self.context = min(int(context), self.spec.max_position_embeddings)
        self._tmp = tempfile.TemporaryDirectory(prefix="edgekit-reference-") if work_dir is None else None
        reader = open_weights(self.source)
        try:
            self.fingerprint = reader.fingerprint()
            self.codec = codec_from_reader(reader)
            self.tokenizer_json = reader.tokenizer_json()
            special = reader.special_tokens()
            self.eos_ids = {int(e) for e in (special.get("eos_token_ids") or [])} | set(self.spec.eos_token_ids)
            folder = Path(self._tmp.name if self._tmp else work_dir)
            self.graph = self._export(reader, folder, progress)
        finally:
            reader.close()
        from ..runtime.ort_backend import OrtDecoder

        self.decoder = OrtDecoder(str(self.graph), dialect="ort", spec=self.spec, capacity=self.context,
                                  kv_dtype="float32", threads=threads)

    def _export(self, reader, folder: Path, progress: Progress | None) -> Path:
        """The reference graph, from the export cache in ``folder`` (exported into it on a miss)."""
        from ..export import GraphOptions, export_onnx
        from ..export.cache import cache_key, use_or_export
        from ..export.decoder import GRAPH_REVISION

        report = (lambda done, total: progress("export reference", done, total)) if progress else None
        options = GraphOptions(dialect="ort", precision="fp32", max_context=self.context, logits="all")

        def export(into: Path) -> dict:
            return {"export": asdict(export_onnx(reader, self.spec, into, options, progress=report)),
                    "quantization": None}

        entry, meta = use_or_export(folder, cache_key(self.fingerprint, options=options, graph=GRAPH_REVISION),
                                    export, discarded=lambda why: progress and progress(
                                        f"export reference ({why})", 1, 1))
        return entry / meta["export"]["model_file"]

    def logits(self, tokens: list[int]) -> np.ndarray:
        """Teacher-forced logits of every position of ``tokens``, (S, V) float32."""
        ids = np.asarray(tokens, dtype=np.int64)
        self.decoder.reset()
        parts = [np.array(self.decoder.step_all(ids[s:s + _CHUNK]), copy=True) for s in range(0, len(ids), _CHUNK)]
        return np.concatenate(parts, axis=0)

    def generate(self, prompt: list[int], new_tokens: int) -> list[int]:
        """Greedy continuation of ``prompt`` (stops after an end-of-sequence token, which it keeps)."""
        self.decoder.reset()
        out: list[int] = []
        logits = self.decoder.step(np.asarray(prompt, dtype=np.int64))
        while len(out) < new_tokens and len(prompt) + len(out) < self.context:
            token = int(np.argmax(logits))
            out.append(token)
            if token in self.eos_ids or len(out) == new_tokens:
                break
            logits = self.decoder.step(np.asarray([token], dtype=np.int64))
        return out

    def close(self) -> None:
        self.decoder = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


# ----- checks -------------------------------------------------------------------------------------------
# Teacher forcing compares distributions over the same ids: refuse models whose token ids differ.
def check_vocabulary_size(bundle_name: str, bundle_vocab: int, reference_name: str, reference_vocab: int) -> None:
    if bundle_vocab != reference_vocab:
        raise UserInputError(
            f"the reference {reference_name} has a vocabulary of {reference_vocab} tokens but the bundle "
            f"{bundle_name} has {bundle_vocab}: give the model the bundle was built from as --reference")


def check_same_tokenizer(bundle_name: str, bundle_tokenizer: str, reference_name: str,
                         reference_tokenizer: str) -> None:
    from tokenizers import Tokenizer

    a, b = Tokenizer.from_str(bundle_tokenizer), Tokenizer.from_str(reference_tokenizer)
    probe = "Hello, world! 12345 <think>\nÄrger über 机器人 ロボット\n</think>\n\n  def f(x): return x**2"
    if a.get_vocab(with_added_tokens=True) != b.get_vocab(with_added_tokens=True) or \
            a.encode(probe, add_special_tokens=False).ids != b.encode(probe, add_special_tokens=False).ids:
        raise UserInputError(
            f"the reference {reference_name} uses a different tokenizer than the bundle {bundle_name} "
            "(its tokens map to other ids): give the model the bundle was built from as --reference")


# ----- the evaluation -----------------------------------------------------------------------------------
def spread(samples: list, step: int = 6) -> list:
    """The calibration samples reordered so that consecutive ones come from different topics."""
    return [samples[i] for start in range(step) for i in range(start, len(samples), step)]


def reference_text(ref: Reference, max_tokens: int, cap: int,
                   progress: Progress | None = None) -> tuple[list[list[int]], list[int]]:
    """The reference's greedy answers to calibration prompts: (prompt + answer token sequences, index of the
    position predicting each answer's first token), ``max_tokens`` answer tokens in all, each within ``cap``."""
    from .calibration import encode_prompt, load_samples

    sequences, starts, total = [], [], 0
    for sample in spread(load_samples()):
        if total >= max_tokens:
            break
        prompt = encode_prompt(ref.codec, sample)
        new = min(NEW_TOKENS_PER_PROMPT, max_tokens - total)
        if len(prompt) + new > cap:      # a byte-level toy tokenizer makes some prompts too long for a small context
            continue
        answer = ref.generate(prompt, new)
        sequences.append(prompt + answer)
        starts.append(len(prompt) - 1)   # the position that predicts the first answer token
        total += len(answer)
        if progress:
            progress("reference writes the text", min(total, max_tokens), max_tokens)
    if not sequences:
        raise UserInputError(f"no calibration prompt fits in a context of {cap} tokens: use a bundle built with a "
                             "larger --context, or give --text")
    return sequences, starts


def _file_text(codec, path: Path, max_tokens: int, cap: int) -> tuple[list[list[int]], list[int]]:
    from .calibration import calibration_token_batches

    sequences = calibration_token_batches(codec, path, max_tokens=min(cap, max_tokens + 1), what="text file")
    out, total = [], 0
    for ids in sequences:
        ids = ids[:max_tokens - total + 1]
        if len(ids) < 2:
            break
        out.append(ids)
        total += len(ids) - 1
        if total >= max_tokens:
            break
    return out, [0] * len(out)


def bundle_logits(decoder, tokens: list[int], all_logits: bool, start: int = 0) -> np.ndarray:
    """Teacher-forced logits of positions ``start`` .. S-1 through the runtime's decoder, (S - start, V) float32."""
    ids = np.asarray(tokens, dtype=np.int64)
    decoder.reset()
    if all_logits and hasattr(decoder, "step_all"):
        return np.concatenate([np.array(decoder.step_all(ids[s:s + _CHUNK]), copy=True)
                               for s in range(0, len(ids), _CHUNK)], axis=0)[start:]
    # A "last" graph: the prefix in one run (its last row is position ``start``), then one token per run,
    # each run's logits copied out of the output buffer the decoder reuses.
    rows = [np.array(decoder.step(ids[:start + 1]), copy=True)]
    rows += [np.array(decoder.step(ids[i:i + 1]), copy=True) for i in range(start + 1, len(ids))]
    return np.stack(rows)


def evaluate(bundle: str | Path, reference, *, text: str | Path | None = None, max_tokens: int = 512,
             threads: int | None = None, backend: str = "auto", work_dir: str | Path | None = None,
             progress: Progress | None = None) -> EvalResult:
    """Fidelity of ``bundle`` against the full-precision ``reference`` on the same tokens (see the module doc).

    ``text``: a plain-text or .jsonl file to score (default: the reference's own answers to calibration
    prompts); ``max_tokens``: scored positions in total. Raises BundleError, UserInputError (different
    vocabulary, unreadable text), ModelNotFound and the runtime's errors, all one line.
    """
    from ..runtime.bundle import read_manifest
    from ..runtime.model import load
    from ..sources import resolve
    from .calibration import load_samples

    if not isinstance(max_tokens, int) or max_tokens < 1:
        raise UserInputError(f"invalid max_tokens {max_tokens!r}: use a whole number >= 1")
    started = time.perf_counter()
    manifest = read_manifest(bundle)
    if text is not None:
        load_samples(text, what="text file")   # an unreadable file fails now, not after the reference is exported
    source = resolve(reference)
    b_spec = manifest.spec()
    check_vocabulary_size(str(bundle), b_spec.vocab_size, str(reference), source.spec.vocab_size)  # before any export
    model = load(bundle, backend=backend, threads=threads)
    ref = Reference(source, context=min(model.max_context, max(1024, max_tokens + 1)), work_dir=work_dir,
                    threads=threads, progress=progress)
    cap = ref.context
    try:
        check_same_tokenizer(str(bundle), manifest.path(manifest.tokenizer["file"]).read_text(encoding="utf-8"),
                             str(reference), ref.tokenizer_json)
        if text is None:
            sequences, starts = reference_text(ref, max_tokens, cap, progress)
        else:
            sequences, starts = _file_text(ref.codec, Path(text), max_tokens, cap)
            if not sequences:
                raise UserInputError(f"the text file {text} has fewer than 2 tokens: give more text to score")
        stats = FidelityStats()
        all_logits = manifest.graph.get("logits") == "all"
        for n, (ids, start) in enumerate(zip(sequences, starts)):
            ref_logits = ref.logits(ids)[start:-1]                                  # (S - 1 - start, V)
            out_logits = bundle_logits(model.decoder, ids, all_logits, start)[:-1]
            stats.add(ref_logits, out_logits, ids[start + 1:])
            if progress:
                progress("score", n + 1, len(sequences))
        s = stats.summary()
    finally:
        ref.close()
        model.close()
    return EvalResult(reference=str(reference), reference_sha256=ref.fingerprint,
                      text=GENERATED if text is None else str(text), sequences=len(sequences), tokens=s["tokens"],
                      top1_agreement=s["top1_agreement"], mean_kl=s["mean_kl"], max_kl=s["max_kl"],
                      perplexity=s["perplexity"], reference_perplexity=s["reference_perplexity"],
                      seconds=time.perf_counter() - started, token_ids=sequences, scored_from=starts)
