"""What the command modules share: the click group they register on, JSON output, and the option parsers and
progress printer more than one command uses. Command modules import from here, never from each other.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import click

from .. import __version__
from ..errors import EdgekitError, UserInputError


class _Group(click.Group):
    """Turns EdgekitError into one line + exit code, for every subcommand."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except EdgekitError as e:
            click.echo(f"error: {e}", err=True)
            ctx.exit(e.exit_code)
        except click.UsageError as e:  # click's own errors come with a usage block: keep them to one line
            command = e.ctx.command_path if e.ctx else "edgekit"
            click.echo(f"error: {e.format_message()} (see {command} --help)", err=True)
            ctx.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            ctx.exit(130)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="edgekit")
def cli() -> None:
    """edgekit: run distilled DeepSeek-R1 models on small devices."""


def echo_json(obj) -> None:
    click.echo(json.dumps(obj, indent=2, sort_keys=False))


def main() -> None:  # console-script entry point
    cli(prog_name="edgekit")


# ----- shared by several commands ---------------------------------------------------------------------------
def parse_context(text: str) -> int:
    """``--context``: a number of tokens, ``4096`` or ``32k``."""
    t = text.strip().lower()
    scale = 1024 if t.endswith("k") else 1
    digits = t[:-1] if scale > 1 else t
    if not digits.isdigit() or int(digits) == 0:
        raise UserInputError(f"invalid context {text!r}: give a positive number of tokens, e.g. 4096 or 32k")
    return int(digits) * scale


def speculative_options(f):
    """--speculative/--draft-tokens/--ngram: shared by run, chat, bench and serve."""
    f = click.option("--ngram", type=click.IntRange(1, 16), default=3, show_default=True, metavar="N",
                     help="Prompt lookup: match the last N tokens (then shorter, down to 2).")(f)
    f = click.option("--draft-tokens", type=click.IntRange(1, 16), default=5, show_default=True, metavar="K",
                     help="Speculative decoding: at most K drafted tokens checked per model step.")(f)
    return click.option("--speculative", default=None, metavar="ngram|BUNDLE",
                        help="Speculative decoding (off by default): 'ngram' drafts by prompt lookup, a path "
                             "drafts with that smaller bundle (same tokenizer).")(f)


def speculation(speculative: str | None, draft_tokens: int, ngram: int):
    """The load(speculative=...) value for the CLI options (None: off)."""
    if speculative is None:
        return None
    from ..runtime.speculative import Speculation

    return Speculation(draft="ngram" if speculative == "ngram" else Path(speculative), k=draft_tokens,
                       ngram=ngram, min_ngram=min(2, ngram))


class StageProgress:
    """Stage progress on stderr. The export stage counts bytes written (with rate and time left); others count
    steps. A terminal gets a rich bar; anything else (a log, CI, ``| tee``) a plain line every few seconds."""

    EVERY_S = 3.0
    BYTE_STAGES = ("export",)

    def __init__(self):
        import sys

        self.bar = None
        self.tasks: dict[str, int] = {}
        self.started: dict[str, float] = {}
        self.printed: dict[str, float] = {}
        if not sys.stderr.isatty():
            return
        try:
            from rich.console import Console
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

            self.bar = Progress(TextColumn("{task.description:<10}"), BarColumn(), TextColumn("{task.fields[detail]}"),
                                TimeElapsedColumn(), console=Console(stderr=True), transient=False)
        except ImportError:
            pass

    def __enter__(self):
        if self.bar:
            self.bar.__enter__()
        return self

    def __exit__(self, *exc):
        if self.bar:
            self.bar.__exit__(*exc)

    def detail(self, stage: str, done: int, total: int, now: float) -> str:
        if stage not in self.BYTE_STAGES:
            return f"{done}/{total}"
        from ..units import fmt_bytes

        elapsed = now - self.started[stage]
        text = f"{fmt_bytes(done)} of {fmt_bytes(total)} ({100 * done / max(total, 1):.0f}%)"
        if elapsed > 0.5 and done:
            rate = done / elapsed
            left = max(total - done, 0) / rate
            text += f", {fmt_bytes(int(rate))}/s, {int(left) // 60}m{int(left) % 60:02d}s left"
        return text

    def __call__(self, stage: str, done: int, total: int) -> None:
        now = time.perf_counter()
        self.started.setdefault(stage, now)
        if self.bar is None:
            if done in (0, total) or now - self.printed.get(stage, 0.0) >= self.EVERY_S:
                self.printed[stage] = now
                click.echo(f"{stage}: {self.detail(stage, done, total, now)}", err=True)
            return
        if stage not in self.tasks:
            self.tasks[stage] = self.bar.add_task(stage, total=max(total, 1), detail="")
        self.bar.update(self.tasks[stage], completed=done if total else 1,
                        detail=self.detail(stage, done, total, now))
