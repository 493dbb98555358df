"""The command line: a thin click layer over the Python API.

This package is the only place that prints or exits; each command family has its own module here
(``plan_cmd``, ``build_cmd``, ...), registered on the group at the bottom of this file. Library errors
(``edgekit.errors``) become one line on stderr and their exit code; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import json
import sys

import click

from .. import __version__
from ..errors import EdgekitError


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


# Register the command modules (each does ``@cli.command()`` on import).
from . import _commands  # noqa: E402,F401

if __name__ == "__main__":
    sys.exit(main())
