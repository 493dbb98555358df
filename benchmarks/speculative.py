"""Speculative decoding (prompt lookup) against plain decoding and llama.cpp's plain decode, one run, interleaved.

    python benchmarks/speculative.py [--threads 2] [--new-tokens 256] [--runs 3] [--k 5] [--precisions int4,fp32]
                                     [--skip-llama] [--work DIR]

The model is SmolLM2-135M-Instruct (the packaged GGUF), the one real model here: acceptance rates only mean
something on real weights (the R1-shaped 1.5B/7B files of the other benchmarks have random weights, whose text
never restates anything, so they are not measured here). The prompts are R1-style: they ask for reasoning that
restates the question and each step, which is what prompt lookup can draft.

For each prompt, each run does, in turn: edgekit plain, edgekit speculative, llama.cpp plain (same GGUF, same
threads, llama-cpp-python), so machine load hits all of them alike; medians over the runs. Greedy, until EOS or
--new-tokens. Effective decode tok/s = (tokens - 1) / time after the first token, the same definition for all.
"same" says whether the speculative tokens equal plain decoding's (fp32: expected; INT4 with accuracy_level 4:
not guaranteed, see docs/ARCHITECTURE.md "Speculative decoding").
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

PROMPTS = [
    "A train leaves at 3 pm and travels 120 km at 60 km/h, then stops for 15 minutes, then travels 90 km at "
    "45 km/h. When does it arrive? Restate the question, then solve it step by step, restating each result.",
    "Sort these words alphabetically and explain each step, repeating the list after every step: pear, apple, "
    "mango, banana, cherry, kiwi.",
    "Write a Python function is_palindrome(s) that ignores case and spaces. First restate the task, then write "
    "the function, then explain it line by line, quoting each line before explaining it.",
    "Tom has 3 boxes with 12 apples each. He gives away 10 apples and buys 2 more boxes of 12. How many apples "
    "does he have? Restate the problem and show every step of the calculation.",
]


def build(work: Path, precision: str, gguf: Path) -> Path:
    from edgekit.build import build as build_bundle
    from edgekit.build.target import load_target

    out = work / f"smollm2-{precision}"
    if not (out / "manifest.json").exists():
        build_bundle(gguf, load_target("cpu"), output=out, precision=precision, context=2048, force=True)
    return out


def edgekit_once(model, ids: list[int], n: int, speculative: bool):
    from edgekit.runtime.generate import GenerationRequest, run
    from edgekit.runtime.sampling import SamplingParams

    req = GenerationRequest(prompt_ids=ids, sampling=SamplingParams(temperature=0.0), max_new_tokens=n)
    extra = model.speculation() if speculative else {}
    for event in run(model.decoder, model.codec, req, prefill_chunk=model.prefill_chunk, eos_ids=model.eos_ids,
                     **extra):
        if event.kind == "done":
            return event.result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--k", type=int, default=5, help="most drafted tokens per verify step")
    ap.add_argument("--ngram", type=int, default=3)
    ap.add_argument("--precisions", default="int4,fp32")
    ap.add_argument("--skip-llama", action="store_true")
    ap.add_argument("--work", type=Path, default=Path("/tmp/edgekit-bench-speculative"))
    args = ap.parse_args()

    from edgekit.runtime.model import load
    from edgekit.runtime.speculative import Speculation
    from edgekit.sources import packaged_model_path

    gguf = packaged_model_path("smollm2")
    args.work.mkdir(parents=True, exist_ok=True)
    llama = None
    if not args.skip_llama:
        from compare_peers import LlamaEngine

        llama = LlamaEngine(str(gguf), args.threads, 2048)
    spec = Speculation("ngram", k=args.k, ngram=args.ngram, min_ngram=min(2, args.ngram))
    rows = []
    for precision in args.precisions.split(","):
        model = load(build(args.work, precision, gguf), threads=args.threads, speculative=spec)
        model.prefix_reuse = False
        for i, text in enumerate(PROMPTS):
            ids = model.codec.encode(model.codec.render(model.chat_prompt(text)), add_special_tokens=False)
            edgekit_once(model, ids[:8], 4, False)                           # warm-up
            plain, specs, peer = [], [], []
            for _ in range(args.runs):
                plain.append(edgekit_once(model, ids, args.new_tokens, False))
                specs.append(edgekit_once(model, ids, args.new_tokens, True))
                if llama is not None:
                    n = max(2, plain[-1].completion_tokens)
                    peer.append(llama.generate(ids, n)[1])
            p, s = plain[0], specs[0]
            row = {"precision": precision, "prompt": i + 1, "tokens": p.completion_tokens,
                   "plain": statistics.median(r.decode_tok_s for r in plain),
                   "spec": statistics.median(r.decode_tok_s for r in specs),
                   "llama": statistics.median(peer) if peer else float("nan"),
                   "drafted": s.drafted, "accepted": s.accepted, "rate": s.acceptance_rate,
                   "same": s.tokens == p.tokens,
                   "diverge": next((j for j, (a, b) in enumerate(zip(s.tokens, p.tokens)) if a != b), None)}
            rows.append(row)
            print(f"[{time.strftime('%H:%M:%S')}] {precision} prompt {i + 1}: {row}", file=sys.stderr, flush=True)
        model.close()

    print(f"\nSmolLM2-135M, greedy, <= {args.new_tokens} new tokens, {args.threads} threads, medians of {args.runs} "
          f"interleaved runs; speculative = prompt lookup k {args.k}, n {spec.min_ngram}..{spec.ngram}, adaptive")
    print(f"{'precision':>9} {'prompt':>6} {'tokens':>6} {'plain tok/s':>11} {'spec tok/s':>10} {'llama.cpp':>9} "
          f"{'spec/plain':>10} {'spec/llama':>10} {'accepted':>14} {'same':>5}")
    for r in rows:
        print(f"{r['precision']:>9} {r['prompt']:>6} {r['tokens']:>6} {r['plain']:>11.1f} {r['spec']:>10.1f} "
              f"{r['llama']:>9.1f} {r['spec'] / r['plain']:>10.2f} {r['spec'] / r['llama']:>10.2f} "
              f"{r['accepted']:>4}/{r['drafted']:<4} {r['rate']:>4.0%} "
              f"{'yes' if r['same'] else 'no@' + str(r['diverge']):>5}")
    for precision in args.precisions.split(","):
        mine = [r for r in rows if r["precision"] == precision]
        ratio = statistics.median(r["spec"] / r["llama"] for r in mine)
        gain = statistics.median(r["spec"] / r["plain"] for r in mine)
        drafted, accepted = sum(r["drafted"] for r in mine), sum(r["accepted"] for r in mine)
        print(f"{precision}: speculative/plain {gain:.2f}x, speculative/llama.cpp {ratio:.2f}x (goal >= 1.3x: "
              f"{'MET' if ratio >= 1.3 else 'NOT MET'}), acceptance {accepted}/{drafted} = "
              f"{accepted / max(drafted, 1):.0%}, identical to plain on {sum(r['same'] for r in mine)}/{len(mine)}")


if __name__ == "__main__":
    main()
