"""What ``Model.astream`` costs against ``Model.stream``, and what it buys: the event loop stays free.

    python benchmarks/astream.py BUNDLE [--tokens 64] [--runs 5]

Runs, interleaved (stream, astream, blocking, stream, astream, ... so machine load hits all alike), the same
greedy generation three ways and prints medians:
  stream    ``Model.stream`` on the calling thread (no event loop)
  astream   ``async for event in model.astream(...)`` while a ticker task sleeps 5 ms in a loop
  blocking  ``for event in model.stream(...)`` inside a coroutine (the mistake astream avoids), same ticker
"loop gap" is the ticker's longest wait between two ticks: how long the event loop could not run anything else.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from edgekit.runtime.model import load

TICK_S = 0.005


async def _with_ticker(generation) -> tuple[object, float]:
    """Run ``generation`` (a coroutine) while a ticker measures the longest gap between its ticks."""
    gaps = []
    stop = asyncio.Event()

    async def ticker():
        last = time.perf_counter()
        while not stop.is_set():
            await asyncio.sleep(TICK_S)
            now = time.perf_counter()
            gaps.append(now - last - TICK_S)
            last = now
    task = asyncio.create_task(ticker())
    await asyncio.sleep(0)
    result = await generation
    stop.set()
    await task
    return result, max(gaps, default=float("nan"))


def main() -> None:
    parser = argparse.ArgumentParser(description="Model.astream against Model.stream")
    parser.add_argument("bundle")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    model = load(args.bundle)
    kw = dict(messages=[{"role": "user", "content": "Why is the sky blue?"}], max_new_tokens=args.tokens,
              temperature=0, ignore_eos=True)

    def stream():
        return [e for e in model.stream(**kw)][-1].result, float("nan")

    async def via_astream():
        async for event in model.astream(**kw):
            result = event.result
        return result

    async def blocking():
        for event in model.stream(**kw):
            result = event.result
        return result

    ways = {"stream": stream,
            "astream": lambda: asyncio.run(_with_ticker(via_astream())),
            "blocking": lambda: asyncio.run(_with_ticker(blocking()))}
    stream()   # warm-up
    rows = {name: [] for name in ways}
    for _ in range(args.runs):
        for name, way in ways.items():
            result, gap = way()
            rows[name].append((result.decode_tok_s, result.ttft_ms, gap * 1000))
    print(f"{model.manifest.precision} bundle, {args.tokens} tokens, {args.runs} runs, medians")
    print(f"{'way':<10} {'decode tok/s':>12} {'TTFT ms':>8} {'loop gap ms':>12}")
    for name, values in rows.items():
        tok_s, ttft, gap = (statistics.median(v[i] for v in values) for i in range(3))
        gap_text = "-" if gap != gap else f"{gap:.1f}"
        print(f"{name:<10} {tok_s:>12.1f} {ttft:>8.1f} {gap_text:>12}")


if __name__ == "__main__":
    main()
