"""The command line: a thin click layer over the Python API.

This package is the only place that prints or exits; each command family has its own module here
(``plan_cmd``, ``build_cmd``, ...), registered on the group (:mod:`edgekit.cli._common`) when
:mod:`edgekit.cli._commands` imports them. Library errors (``edgekit.errors``) become one line on stderr and
their exit code; anything else is a bug and keeps its traceback.
"""

from . import _commands as _commands  # importing it registers every command on the group
from ._common import cli, echo_json, main

__all__ = ["cli", "echo_json", "main"]
