"""INT8 KV cache against the float cache: top-1 agreement over generated tokens, and decode speed.

    python benchmarks/kv_int8_fidelity.py FLOAT_BUNDLE INT8_BUNDLE [--tokens 1000] [--threads 2]

Both bundles come from the same model and build options, the second with ``--kv-cache int8``. The float
bundle writes --tokens tokens greedily after each prompt (the built-in calibration prompts' first questions,
chat-templated); then both bundles are teacher-forced over that same text one token at a time (decode steps,
so the int8 cache is read exactly as in generation) and, at every generated position, their argmax is
compared: the fraction that agrees is the top-1 agreement (issue 15 asks >= 99% over 1,000 tokens). Also
printed: the largest |logit difference| at those positions and each bundle's decode tok/s at the longest
filled length reached.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

PROMPTS = ("Explain in a few sentences why the sky is blue.",
           "Write a short story about a robot that learns to cook.",
           "List the steps to check that a door sensor works, with a reason for each.")


def greedy(dec, prompt: list[int], n: int, chunk: int) -> list[int]:
    dec.reset()
    ids = np.asarray(prompt, np.int64)
    for a in range(0, len(ids), chunk):
        logits = dec.step(ids[a:a + chunk])
    out = [int(np.argmax(logits))]
    while len(out) < n:
        out.append(int(np.argmax(dec.step(np.array([out[-1]], np.int64)))))
    return out


def forced(dec, prompt: list[int], text: list[int], chunk: int) -> tuple[np.ndarray, float]:
    """The argmax and logits at each generated position, teacher-forced on ``text``; and decode tok/s."""
    dec.reset()
    ids = np.asarray(prompt, np.int64)
    for a in range(0, len(ids), chunk):
        logits = dec.step(ids[a:a + chunk])
    rows = [logits.copy()]
    t0 = time.perf_counter()
    for tok in text[:-1]:
        rows.append(dec.step(np.array([tok], np.int64)).copy())
    return np.stack(rows), (len(text) - 1) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("float_bundle")
    ap.add_argument("int8_bundle")
    ap.add_argument("--tokens", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    from edgekit.runtime.model import load

    per_prompt = -(-args.tokens // len(PROMPTS))
    ref = load(args.float_bundle, threads=args.threads)
    q = load(args.int8_bundle, threads=args.threads)
    print(f"KV cache: {ref.decoder.kv_dtype_name} {ref.decoder.kv_cache_bytes / 2**20:.0f} MiB vs "
          f"{q.decoder.kv_dtype_name} {q.decoder.kv_cache_bytes / 2**20:.0f} MiB at context {q.max_context}")
    agree = total = 0
    worst = 0.0
    for text in PROMPTS:
        prompt = ref.codec.encode(ref.codec.render(ref.chat_prompt(text)), add_special_tokens=False)
        gen = greedy(ref.decoder, prompt, per_prompt, ref.prefill_chunk)
        a, tps_ref = forced(ref.decoder, prompt, gen, ref.prefill_chunk)
        b, tps_q = forced(q.decoder, prompt, gen, q.prefill_chunk)
        same = int((a.argmax(-1) == b.argmax(-1)).sum())
        agree, total = agree + same, total + len(gen)
        worst = max(worst, float(np.abs(a - b).max()))
        print(f"{text[:40]!r:44} {len(gen)} tokens: top-1 agreement {same / len(gen):.2%}, "
              f"decode float {tps_ref:.1f} tok/s, int8 {tps_q:.1f} tok/s (to {len(prompt) + len(gen)} filled)")
    print(f"top-1 agreement {agree}/{total} = {agree / total:.2%} (goal >= 99%), max |logit diff| {worst:.3f}")


if __name__ == "__main__":
    main()
