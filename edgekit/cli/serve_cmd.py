"""``edgekit serve``: an OpenAI-compatible local API for one bundle (smart-home hubs, robot stacks)."""

from __future__ import annotations

import os
import stat

import click

from ..errors import UserInputError
from ._common import cli, speculation, speculative_options

LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


def _read_key_file(path: str) -> str:
    try:
        info = os.stat(path)
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise UserInputError(f"cannot read the API key file {path} ({getattr(e, 'strerror', None) or e}): "
                             "give a readable text file holding the key") from None
    key = text.strip()
    if not key:
        raise UserInputError(f"the API key file {path} is empty: write the key into it (one line)")
    if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        click.echo(f"warning: the API key file {path} can be read by other users: chmod 600 {path}", err=True)
    return key


def _check_key(key: str) -> str:
    # The key travels in an HTTP header: visible ASCII only, no spaces.
    if not key or not all(33 <= ord(c) <= 126 for c in key):
        raise UserInputError("invalid API key: use printable ASCII characters without spaces, "
                             "e.g. the output of `openssl rand -hex 24`")
    return key


@cli.command("serve")
@click.argument("bundle", type=click.Path(path_type=str))
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on. The default is reachable only from this machine; 0.0.0.0 opens the "
                   "server to the network (use an API key then).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535),
              help="Port to listen on (0 = any free port; the URL printed shows it).")
@click.option("--api-key", envvar="EDGEKIT_API_KEY", default=None, metavar="KEY",
              help="Require 'Authorization: Bearer KEY' on every request but /health. Prefer --api-key-file or "
                   "the EDGEKIT_API_KEY variable: a command line is visible to other users.")
@click.option("--api-key-file", default=None, metavar="FILE", type=click.Path(dir_okay=False, path_type=str),
              help="Read the API key from FILE (one line).")
@click.option("--max-queue", default=8, show_default=True, type=click.IntRange(0, 100000), metavar="N",
              help="Requests that may wait while one generates; more are refused with 429 and Retry-After.")
@click.option("--max-body", default="8MiB", show_default=True, metavar="SIZE",
              help="Largest request body accepted (413 beyond), e.g. 2MiB; a long conversation with a large "
                   "context needs more.")
@click.option("--max-context", default=None, type=click.IntRange(2), metavar="N",
              help="KV-cache size in tokens (prompt + completion) [default: the bundle's].")
@click.option("--memory-budget", default=None, metavar="SIZE",
              help="Refuse to load if the model needs more than this, e.g. 3.5GiB [default: what is free].")
@click.option("--threads", default=None, type=click.IntRange(1), metavar="N",
              help="CPU threads for the onnxruntime backend [default: onnxruntime's choice].")
@click.option("--backend", default="auto", show_default=True, metavar="B",
              help="auto (the bundle's), onnxruntime-cpu, onnxruntime-cuda or tensorrt.")
@click.option("--model-name", default=None, metavar="NAME",
              help="Model id shown to clients [default: the bundle folder's name]. Clients may send any name.")
@click.option("--thinking-budget", default=None, type=click.IntRange(0), metavar="N",
              help="Default cap on R1 reasoning tokens for requests that do not send thinking_budget (smart-home "
                   "integrations cannot): after N the model is made to answer.")
@click.option("--tool-choice", default="auto", show_default=True,
              type=click.Choice(["auto", "required", "after-user"]),
              help="Tool choice of requests with tools and none of their own (Ollama's API has none): after-user "
                   "requires a call when the last message is the user's, for small models that rarely start one "
                   "(Home Assistant).")
@click.option("--no-prefix-reuse", "no_prefix_reuse", is_flag=True,
              help="Prefill every prompt from scratch instead of keeping the KV rows it shares with the previous "
                   "request.")
@click.option("--shutdown-timeout", default=10.0, show_default=True, type=click.FloatRange(0), metavar="S",
              help="On SIGTERM or Ctrl+C, seconds the running generation may go on before it is cancelled.")
@click.option("--log-level", default="info", show_default=True, type=click.Choice(LOG_LEVELS),
              help="Server log verbosity (info logs one line per request).")
@speculative_options
@click.pass_context
def serve_cmd(ctx: click.Context, bundle: str, host: str, port: int, api_key: str | None, api_key_file: str | None,
              max_queue: int, max_body: str, max_context: int | None, memory_budget: str | None, threads: int | None,
              backend: str, model_name: str | None, thinking_budget: int | None, shutdown_timeout: float,
              log_level: str, no_prefix_reuse: bool, tool_choice: str, speculative: str | None, draft_tokens: int,
              ngram: int) -> None:
    """Serve BUNDLE over OpenAI's chat-completions API (POST /v1/chat/completions, GET /v1/models,
    GET /health, GET /metrics). One generation runs at a time; R1 reasoning comes back as
    reasoning_content. Stops cleanly on SIGTERM or Ctrl+C."""
    from ..server import is_loopback, require_extra, serve
    from ..units import parse_size

    require_extra()
    if api_key is not None and api_key_file is not None:
        source = "EDGEKIT_API_KEY" if ctx.get_parameter_source("api_key").name == "ENVIRONMENT" else "--api-key"
        raise UserInputError(f"both {source} and --api-key-file give an API key: use one of them")
    key = _check_key(_read_key_file(api_key_file) if api_key_file else api_key) \
        if (api_key is not None or api_key_file) else None
    budget = parse_size(memory_budget) if memory_budget is not None else None
    body = parse_size(max_body)
    if body < 1024:
        raise UserInputError(f"invalid --max-body {max_body}: use at least 1KiB (the default is 8MiB)")
    if not is_loopback(host) and key is None:
        click.echo(f"warning: --host {host} makes the server reachable from the network and no API key is set: "
                   "anyone who can reach this port can use the model; add --api-key-file FILE (or set "
                   "EDGEKIT_API_KEY)", err=True)

    def listening(url: str) -> None:
        click.echo(f"edgekit serve: loading {bundle} (GET {url}/health answers 503 until the model is loaded)")

    def ready(url: str, model_id: str, context: int) -> None:
        click.echo(f"edgekit serve: ready at {url}/v1  model {model_id!r}, context {context} tokens, "
                   f"queue {max_queue}, API key {'required' if key else 'not required'}")

    serve(bundle, host, port, api_key=key, max_queue=max_queue, max_context=max_context, memory_budget=budget,
          threads=threads, backend=backend, model_name=model_name, thinking_budget=thinking_budget,
          tool_choice=tool_choice, shutdown_timeout=shutdown_timeout, max_body_bytes=body,
          prefix_reuse=not no_prefix_reuse, speculative=speculation(speculative, draft_tokens, ngram),
          log_level=log_level, on_listening=listening, on_ready=ready)
    click.echo("edgekit serve: stopped", err=True)
