"""``edgekit run``, ``edgekit chat`` and ``edgekit bench``: use a bundle on this machine."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from ._common import cli, echo_json, speculation, speculative_options

DIM, RESET = "\x1b[2m", "\x1b[0m"
CHAT_HELP = ("commands: /reset clears the conversation, /exit (or /quit, /bye, Ctrl-D) quits, /help shows this; "
             "start a message with // to send a line that begins with /")


def _load_options(f):
    f = speculative_options(f)
    f = click.option("--threads", type=click.IntRange(1, 256), default=None, help="CPU threads [default: all].")(f)
    f = click.option("--backend", default="auto", show_default=True,
                     help="auto, onnxruntime-cpu, onnxruntime-cuda or tensorrt.")(f)
    f = click.option("--max-context", type=int, default=None, help="KV cache size (<= the bundle's).")(f)
    f = click.option("--memory-budget", default=None, metavar="SIZE",
                     help="Cap what edgekit may allocate, e.g. 3.5GiB.")(f)
    return click.argument("bundle", type=click.Path(path_type=Path))(f)


def _load(bundle, memory_budget, max_context, backend, threads, kw):
    from ..runtime.model import load

    spec = speculation(kw.pop("speculative"), kw.pop("draft_tokens"), kw.pop("ngram"))
    return load(bundle, max_context=max_context, memory_budget=memory_budget, backend=backend, threads=threads,
                speculative=spec)


def _sampling_options(f):
    for option in (
        click.option("--max-new-tokens", "-n", type=int, default=None, help="Stop after N tokens."),
        click.option("--temperature", type=float, default=None, help="0 = greedy [default: the bundle's]."),
        click.option("--top-p", type=float, default=None),
        click.option("--top-k", type=int, default=None),
        click.option("--min-p", type=float, default=None),
        click.option("--repetition-penalty", type=float, default=None),
        click.option("--seed", type=int, default=None, help="Same seed, same tokens."),
        click.option("--stop", multiple=True, help="Stop string (repeatable)."),
        click.option("--thinking-budget", type=int, default=None,
                     help="R1 models: close the thought after N reasoning tokens and answer."),
    ):
        f = option(f)
    return f


def _sampling(kw) -> dict:
    keys = ("max_new_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed",
            "thinking_budget")
    out = {k: kw[k] for k in keys if kw.get(k) is not None}
    if kw.get("stop"):
        out["stop"] = list(kw["stop"])
    return out


@cli.command("run")
@_load_options
@click.argument("prompt")
@_sampling_options
@click.option("--raw", is_flag=True, help="Send PROMPT as is, without the chat template.")
@click.option("--truncate", is_flag=True, help="Keep the end of a prompt longer than the context.")
@click.option("--show-reasoning", is_flag=True, help="Print the model's reasoning (dimmed, on stderr).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object with text, reasoning, answer, timings.")
def run_cmd(bundle, prompt, memory_budget, max_context, backend, threads, raw, truncate, show_reasoning, as_json,
            **kw):
    """Generate a reply to PROMPT with BUNDLE."""
    model = _load(bundle, memory_budget, max_context, backend, threads, kw)
    args = _sampling(kw)
    target = {"prompt": prompt} if raw or not model.codec.has_chat_template else {
        "messages": model.chat_prompt(prompt)}
    if as_json:
        result = model.generate(**target, truncate=truncate, **args)
        echo_json(result.to_dict())
        return
    result = _stream_to_terminal(model.stream(**target, truncate=truncate, **args), show_reasoning)
    drafts = f", {result.accepted}/{result.drafted} drafts accepted" if model.speculative is not None else ""
    click.echo(f"[{result.prompt_tokens} prompt + {result.completion_tokens} tokens, ttft {result.ttft_ms:.0f} ms, "
               f"{result.decode_tok_s:.1f} tok/s{drafts}, {result.finish_reason}]", err=True)


def _stream_to_terminal(events, show_reasoning: bool):
    tty = sys.stderr.isatty()
    in_reasoning = False
    result = None
    for event in events:
        if event.kind == "reasoning" and show_reasoning:
            if not in_reasoning:
                in_reasoning = True
                click.echo(DIM if tty else "", nl=False, err=True)
            click.echo(event.text, nl=False, err=True)
        elif event.kind == "answer":
            if in_reasoning:
                in_reasoning = False
                click.echo((RESET if tty else "") + "\n", nl=False, err=True)
            click.echo(event.text, nl=False)
        elif event.kind == "done":
            result = event.result
    if in_reasoning:
        click.echo(RESET if tty else "", nl=False, err=True)
    click.echo("")
    return result


@cli.command("chat")
@_load_options
@_sampling_options
@click.option("--hide-reasoning", is_flag=True, help="Do not show the model's reasoning.")
def chat_cmd(bundle, memory_budget, max_context, backend, threads, hide_reasoning, **kw):
    """Talk to BUNDLE interactively. /reset clears the conversation, /exit (or Ctrl-D) quits, /help lists the
    commands."""
    model = _load(bundle, memory_budget, max_context, backend, threads, kw)
    args = _sampling(kw)
    if not model.codec.has_chat_template:
        raise click.UsageError("this bundle has no chat template: use `edgekit run --raw` instead")
    history: list[dict] = []
    click.echo(f"edgekit chat: {model.spec.name or bundle} (context {model.max_context}). /help lists the commands.",
               err=True)
    while True:
        try:
            line = input(">>> ")
        except (EOFError, KeyboardInterrupt):
            click.echo("", err=True)
            return
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit", "/bye"):
            return
        if text == "/reset":
            history.clear()
            click.echo("(conversation cleared)", err=True)
            continue
        if text.startswith("/") and not text.startswith("//"):   # a mistyped command must not reach the model
            click.echo(f"{'' if text in ('/help', '/?') else f'unknown command {text.split()[0]}: '}{CHAT_HELP}",
                       err=True)
            continue
        if text.startswith("//"):
            text = text[1:]
        history.append({"role": "user", "content": text})
        try:
            result = _stream_to_terminal(model.stream(messages=history, truncate=True, **args), not hide_reasoning)
        except KeyboardInterrupt:
            history.pop()
            click.echo("\n(interrupted)", err=True)
            continue
        # R1 guidance: earlier turns keep only the answer, not the thought.
        history.append({"role": "assistant", "content": result.answer})


def _lengths(text: str, option: str, example: str) -> list[int]:
    try:
        lengths = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter(f"give comma-separated whole numbers, e.g. {example}", param_hint=option) from None
    if not lengths or min(lengths) < 1:
        raise click.BadParameter(f"give comma-separated whole numbers >= 1, e.g. {example}", param_hint=option)
    return lengths


@cli.command("bench")
@_load_options
@click.option("--prompt-tokens", default="32,512", show_default=True, help="Comma-separated prompt lengths.")
@click.option("--new-tokens", type=click.IntRange(1), default=128, show_default=True)
@click.option("--runs", type=click.IntRange(1), default=3, show_default=True)
@click.option("--ignore-eos", is_flag=True, help="Always generate --new-tokens tokens (comparable runs).")
@click.option("--shared-prefix", type=click.IntRange(1), default=None, metavar="N",
              help="Instead: TTFT of a request with an N-token prefix (from an empty cache) vs a second one sharing "
                   "that prefix (prefix reuse), and their ratio.")
@click.option("--filled", default=None, metavar="LENGTHS",
              help="Instead: decode tok/s with each of these many tokens already in the KV cache (filled by "
                   "prefill), e.g. 64,512,1024,4096, and each rate relative to the shortest.")
@click.option("--json", "as_json", is_flag=True)
def bench_cmd(bundle, memory_budget, max_context, backend, threads, prompt_tokens, new_tokens, runs, ignore_eos,
              shared_prefix, filled, as_json, **kw):
    """Time to first token, decode tok/s and peak memory for BUNDLE (medians over --runs)."""
    from ..runtime.bench import bench, filled_decode
    from ..runtime.bench import shared_prefix as shared_prefix_case

    if filled is not None:
        lengths = _lengths(filled, "--filled", "64,512,1024,4096")
        model = _load(bundle, memory_budget, max_context, backend, threads, kw)
        cases = filled_decode(model, lengths, new_tokens, runs)
        if as_json:
            echo_json({"bundle": str(bundle), "threads": threads, "filled": [c.to_dict() for c in cases]})
            return
        click.echo(f"{'filled':>7} {'new':>5} {'decode tok/s':>13} {'±':>6} {'vs shortest':>12}")
        for c in cases:
            click.echo(f"{c.filled:>7} {c.new_tokens:>5} {c.decode_tok_s:>13.1f} {c.decode_tok_s_spread:>6.1f} "
                       f"{c.relative:>12.1%}")
        return

    if shared_prefix is not None:
        model = _load(bundle, memory_budget, max_context, backend, threads, kw)
        case = shared_prefix_case(model, shared_prefix, new_tokens, runs)
        if as_json:
            echo_json({"bundle": str(bundle), "threads": threads, "shared_prefix": case.to_dict()})
            return
        click.echo(f"{'prefix':>7} {'prompt 1':>9} {'prompt 2':>9} {'cached':>7} {'ttft 1 ms':>10} "
                   f"{'ttft 2 ms':>10} {'ratio':>7}")
        click.echo(f"{case.prefix_tokens:>7} {case.first_prompt_tokens:>9} {case.second_prompt_tokens:>9} "
                   f"{case.cached_tokens:>7} {case.first_ttft_ms:>10.1f} {case.second_ttft_ms:>10.1f} "
                   f"{case.ratio:>7.3f}")
        return

    lengths = _lengths(prompt_tokens, "--prompt-tokens", "32,512")
    model = _load(bundle, memory_budget, max_context, backend, threads, kw)
    cases = bench(model, lengths, new_tokens, runs, ignore_eos=ignore_eos)
    if as_json:
        echo_json({"bundle": str(bundle), "threads": threads, "cases": [c.to_dict() for c in cases]})
        return
    spec = model.speculative is not None
    click.echo(f"{'prompt':>7} {'new':>5} {'ttft ms':>9} {'±':>6} {'decode tok/s':>13} {'±':>6} {'peak RSS MiB':>13}"
               + (f" {'accepted':>9}" if spec else ""))
    for c in cases:
        click.echo(f"{c.prompt_tokens:>7} {c.generated:>5} {c.ttft_ms:>9.1f} {c.ttft_ms_spread:>6.1f} "
                   f"{c.decode_tok_s:>13.1f} {c.decode_tok_s_spread:>6.1f} {c.peak_rss_mib:>13.0f}"
                   + (f" {c.acceptance_rate:>9.1%}" if spec else ""))
