"""Chat with a bundle from asyncio: ``model.astream`` streams each answer while the event loop stays free.

    python examples/asyncio_chat.py BUNDLE "Why is the sky blue?" "And at sunset?" [--max-tokens N]
                                    [--timeout SECONDS] [--temperature T] [--memory-budget 3.5GiB]

The questions are one conversation (each answer goes into the history). ``--timeout`` gives each answer that
long: ``asyncio.wait_for`` cancels the task, which stops the generation at the next token (its timer can only
fire because the generation runs off the loop). R1's thought goes to stderr, the answer to stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from edgekit.errors import EdgekitError
from edgekit.runtime.model import load


async def ask(model, history: list[dict], question: str, **generation):
    """Stream one answer to stdout; the history gets the question and, once complete, the answer."""
    messages = history + [{"role": "user", "content": question}]
    async for event in model.astream(messages=messages, **generation):
        if event.kind == "answer":
            print(event.text, end="", flush=True)
        elif event.kind == "reasoning":
            print(event.text, end="", flush=True, file=sys.stderr)
        else:
            result = event.result
    history += [{"role": "user", "content": question}, {"role": "assistant", "content": result.answer}]
    return result


async def chat(args) -> None:
    model = load(args.bundle, memory_budget=args.memory_budget)
    generation = {"max_new_tokens": args.max_tokens}
    if args.temperature is not None:
        generation["temperature"] = args.temperature
    history: list[dict] = []
    for question in args.questions:
        print(f"> {question}", flush=True)
        try:
            result = await asyncio.wait_for(ask(model, history, question, **generation), args.timeout)
        except asyncio.TimeoutError:   # the generation was cancelled; the question stays out of the history
            print(f"\n[no answer within {args.timeout:g} s: cancelled]", flush=True)
            continue
        print(f"\n[{result.completion_tokens} tokens ({result.reasoning_tokens} reasoning), "
              f"{result.decode_tok_s:.1f} tok/s, {result.finish_reason}]", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("bundle")
    parser.add_argument("questions", nargs="+")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--timeout", type=float, default=None, help="seconds per answer (default: none)")
    parser.add_argument("--temperature", type=float, default=None, help="default: the bundle's")
    parser.add_argument("--memory-budget", default=None)
    args = parser.parse_args(argv)
    try:
        asyncio.run(chat(args))
    except EdgekitError as e:   # a bad bundle, budget or option: one line
        print(f"asyncio_chat: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:   # asyncio.run cancelled the task: the generation stopped with it
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
